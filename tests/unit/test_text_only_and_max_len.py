"""Text-only conversations and documents are ordinary samples; a max_len that cuts most samples
to nothing stops the loader at the first batch, naming the max_len the data needs."""

from __future__ import annotations

import json
import random

import pytest
import webdataset as wds

from data_pipeline.formats import SampleRules
from data_pipeline.loader import DataQualityError
from tests.data_factory import jpeg_bytes, make_loader


def write_mixed_modality_shard(path, count: int = 32) -> dict[str, bool]:
    """Conversations and documents, every 4th one without an image; key -> has an image."""
    rng = random.Random(0)
    has_image = {}
    with wds.TarWriter(str(path)) as writer:
        for i in range(count):
            key, with_image = f"t{i:03d}", i % 4 != 0
            if i % 2:
                turns = [
                    {"from": "human", "value": ("<image>\n" if with_image else "") + "what is shown?"},
                    {"from": "gpt", "value": "a red circle."},
                ]
                sample = {"__key__": key, "json": json.dumps({"conversations": turns})}
            else:
                texts, images = (["a doc.", None], [None, "0.jpg"]) if with_image else (["only words."], [None])
                sample = {"__key__": key, "json": json.dumps({"texts": texts, "images": images})}
            if with_image:
                sample["0.jpg" if i % 2 == 0 else "jpg"] = jpeg_bytes(rng, 24)
            writer.write(sample)
            has_image[key] = with_image
    return has_image


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
