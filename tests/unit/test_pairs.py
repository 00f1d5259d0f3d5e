"""Pair shards: the written form, side building (image / text / interleaved), collation and resume."""

from __future__ import annotations

import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.pairs import PairSpec, PairStream, write_pair_shards
from mtrain.model.build import tiny_image_processor
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer

VISUAL = 4  # visual tokens per <image> in these tests


@pytest.fixture(scope="module")
def spec() -> PairSpec:
    tokenizer = build_tiny_tokenizer()
    return PairSpec(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), VISUAL, max_len=48, image_size=32)


def stream(pattern: str, spec: PairSpec, batch_size: int = 4, shuffle_buffer: int = 8) -> PairStream:
    return PairStream(pattern, 0, 1, batch_size, spec, tiny_image_processor(32), seed=5, shuffle_buffer=shuffle_buffer)


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_sample_pairs_collate_and_resume_exactly(tmp_path, spec):
    paths = write_pair_shards(tmp_path, num_shards=2, samples_per_shard=12, seed=0)
    assert json.loads((tmp_path / "index.json").read_text()) == {
        "format": "pairs",
        "samples": {p.name: 12 for p in paths},
        "bytes": {p.name: p.stat().st_size for p in paths},
    }
    pattern = str(tmp_path / "pairs-{000000..000001}.tar")
    batches = iter(stream(pattern, spec))
    taken = [next(batches) for _ in range(5)]
    first = taken[0]
    assert first["query_input_ids"].shape[0] == 4 and first["query_pixel_values"].shape == (4, 3, 32, 32)
    assert first["positive_pixel_values"].shape == (0, 3, 32, 32)  # text positives carry no image
    assert ((first["query_input_ids"] == spec.image_token_id).sum(dim=1) == VISUAL).all()
    assert all(t == "<image>\nRepresent the image" for t in first["query_texts"])
    assert all(t.startswith("a ") and t.endswith(".") for t in first["positive_texts"])
    # Every side ends in </s>, where last-token pooling reads.
    lengths = first["positive_attention_mask"].sum(dim=1)
    assert (first["positive_input_ids"][torch.arange(4), lengths - 1] == spec.tokenizer.eos_token_id).all()

    resumed = stream(pattern, spec)
    resumed.resume_batches = 3
    again = iter(resumed)
    for expected in taken[3:]:
        got = next(again)
        assert got["keys"] == expected["keys"]
        torch.testing.assert_close(got["query_pixel_values"], expected["query_pixel_values"])


def test_text_queries_interleaved_sides_and_a_missing_side(tmp_path, spec):
    path = tmp_path / "custom-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "a", "query.txt": "find a red thing", "instruction.txt": "Retrieve images",
                      "positive.jpg": jpeg((200, 0, 0)), "positive.txt": "look: <image> it is red"})  # fmt: skip
        writer.write({"__key__": "b", "query.jpg": jpeg((0, 0, 200)), "positive.txt": "blue"})
        writer.write({"__key__": "c", "query.txt": "orphan"})
    batches = iter(stream(str(path), spec, batch_size=2, shuffle_buffer=0))  # in written order
    batch = next(batches)
    by_key = dict(zip(batch["keys"], range(2), strict=True))
    a, b = by_key["a"], by_key["b"]
    assert batch["query_texts"][a] == "Retrieve images: find a red thing"
    assert batch["positive_texts"][a] == "look: <image> it is red"
    assert batch["query_texts"][b] == "<image>\nRepresent the image"
    # The interleaved positive has its image tokens after the text before the placeholder.
    ids = batch["positive_input_ids"][a].tolist()
    assert ids.index(spec.image_token_id) > 2 and ids.count(spec.image_token_id) == VISUAL
    assert batch["positive_pixel_values"].shape[0] == 1 and batch["query_pixel_values"].shape[0] == 1
    with pytest.raises(ValueError, match="has no positive"):
        next(iter(stream(str(path), spec, batch_size=3, shuffle_buffer=0)))
