"""The loader under 2 real ranks (torchrun, gloo): exact resume, key ledger, ranks in step, pairs."""

from __future__ import annotations

import json

import pytest

from data_pipeline.pairs import write_pair_shards
from tests.conftest import REPO, run, torchrun
from tests.data_factory import write_mixed_shards

pytestmark = pytest.mark.timeout(300)


def test_two_ranks_resume_ledger_and_stay_in_step(tmp_path, shards_pattern):
    mixed = write_mixed_shards(tmp_path / "mixed", [20, 17, 9, 14])
    unequal = write_mixed_shards(tmp_path / "unequal", [2, 41, 5, 1, 13], seed=1)
    write_pair_shards(tmp_path / "pairs", num_shards=3, samples_per_shard=16, seed=2)  # 3 shards < 2 ranks x 2 workers
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        *torchrun(),
        str(REPO / "tests/distributed/loader_ranks.py"),
        mixed,
        shards_pattern,
        unequal,
        str(tmp_path / "pairs" / "pairs-{000000..000002}.tar"),
        str(out),
    ]
    proc = run(cmd, cwd=tmp_path, timeout=240)  # a hang at an epoch end fails here, not forever
    assert proc.returncode == 0
    summaries = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    print(summaries)
    assert summaries[0]["ledger"] == {"two_to_one": 192, "one_to_two": 192, "keys": 192}
    for summary in summaries:
        assert min(summary["resume_epochs"]) >= 2  # the resumed stretch crossed epoch ends
        assert summary["resampled_batches"] == 10
    # The 5 unindexed shards were scanned once over both ranks, not once per rank.
    assert sorted(s["shared_scans"] for s in summaries) == [2, 3]
    # Pair shards: 48 pairs, each exactly once across 2 -> 1 -> 2 ranks (12 taken by each rank, 16 by one).
    # (Before the leftovers were dealt evenly, the rank ahead dropped one pair at the epoch's end.)
    assert summaries[0]["pairs"] == {"keys": 48, "seen": 48, "dropped": 0, "stretches": [12, 16]}
    # Same batches per epoch on both ranks although the shards hold 2, 41, 5, 1 and 13 documents.
    assert summaries[0]["in_step"][:3] == summaries[1]["in_step"][:3]
    assert all(count > 0 for count in summaries[0]["in_step"][:3])
