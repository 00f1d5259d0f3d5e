"""Text-only conversations and documents are ordinary samples; a max_len that cuts most samples
to nothing stops the loader at the first batch, naming the max_len the data needs."""

from __future__ import annotations

import pytest

from data_pipeline.formats import SampleRules
from data_pipeline.loader import DataQualityError
from tests.data_factory import make_loader, write_mixed_modality_shard


def epoch_keys(loader) -> list[str]:
    keys = []
    while loader.epoch == 0:
        batch = next(loader)
        if loader.epoch == 0:
            keys += batch["keys"]
    return keys


def test_text_only_samples_train_by_default_and_are_counted_when_images_are_required(tmp_path):
    has_image = write_mixed_modality_shard(tmp_path / "mixed-000000.tar")
    default = make_loader(str(tmp_path / "mixed-000000.tar"), batch_size=4, visual_tokens=16, image_size=16)
    assert sorted(epoch_keys(default)) == sorted(has_image) and default.fault_counts(epoch=0) == {}

    strict = make_loader(
        str(tmp_path / "mixed-000000.tar"),
        batch_size=4,
        visual_tokens=16,
        image_size=16,
        max_bad_fraction=1.0,
        rules=SampleRules(require_image=True),
    )
    assert sorted(epoch_keys(strict)) == sorted(k for k, v in has_image.items() if v)
    assert strict.fault_counts(epoch=0) == {"no_image": 8}


def test_a_max_len_that_cuts_most_samples_to_nothing_stops_at_the_first_batch(shards_pattern):
    # 64 visual tokens + BOS + the prompt's newline fill max_len=66: no caption token is left.
    loader = make_loader(shards_pattern, batch_size=8, max_len=66)
    with pytest.raises(DataQualityError, match=r"keep no learned token within data.max_len=66.*needs data.max_len=\d+"):
        next(loader)
    assert loader.batches_taken == 0
    fits = make_loader(shards_pattern, batch_size=8, max_len=96)
    assert len(next(fits)["keys"]) == 8
