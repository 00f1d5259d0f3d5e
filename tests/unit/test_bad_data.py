"""Bad data is skipped, counted by reason, never unpickled; too much of it stops the job clearly."""

from __future__ import annotations

import pytest

from data_pipeline.formats import SampleRules
from data_pipeline.loader import DataQualityError
from tests.data_factory import make_loader, rest_of_epoch, write_bad_shards

RULES = SampleRules(max_image_pixels=200 * 200)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_case_is_counted_and_every_good_sample_delivered(tmp_path, workers):
    bad = write_bad_shards(tmp_path / "bad")
    loader = make_loader(bad["pattern"], batch_size=2, rules=RULES, num_workers=workers, max_bad_fraction=1.0)
    keys = rest_of_epoch(loader)
    assert sorted(keys) == sorted(bad["good"])  # all good samples, each once, and the epoch went on
    assert loader.fault_counts(epoch=0) == bad["faults"]
    metrics = loader.metrics()
    assert metrics["data/bad/unsafe_path"] == 2 and metrics["data/bad/truncated_tar"] >= 1
    assert not bad["marker"].exists()  # the .pyd/.pickle payload would have created it


def test_faults_are_counted_per_rank_and_add_up(tmp_path):
    bad = write_bad_shards(tmp_path / "bad")
    totals: dict[str, int] = {}
    keys: list[str] = []
    for rank in range(2):
        loader = make_loader(bad["pattern"], rank=rank, world_size=2, batch_size=2, rules=RULES, max_bad_fraction=1.0)
        keys += rest_of_epoch(loader)
        for reason, count in loader.fault_counts(epoch=0).items():
            totals[reason] = totals.get(reason, 0) + count
    assert totals == bad["faults"]
    assert sorted(keys) == sorted(bad["good"])


def test_too_much_bad_data_stops_with_shard_and_key(tmp_path):
    bad = write_bad_shards(tmp_path / "bad")
    loader = make_loader(bad["pattern"], batch_size=2, rules=RULES, max_bad_fraction=0.2, bad_fraction_min_samples=5)
    with pytest.raises(
        DataQualityError, match=r"over data.max_bad_fraction=0.2; last: \w+ in shard .*bad-00000\d.tar, key"
    ):
        for _ in range(20):
            next(loader)
