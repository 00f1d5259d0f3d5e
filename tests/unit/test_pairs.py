"""Pair shards through the staged loader: the written form, side building (image / text /
interleaved), collation, exact resume, bad data counted, hard negatives."""

from __future__ import annotations

import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.formats import SampleRules
from data_pipeline.loader import DataQualityError
from data_pipeline.pairs import PairSpec, write_pair_shards
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer
from tests.data_factory import make_loader, rest_of_epoch, write_bad_shards

VISUAL = 4  # visual tokens per <image> in these tests


@pytest.fixture(scope="module")
def spec() -> PairSpec:
    tokenizer = build_tiny_tokenizer()
    return PairSpec(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), VISUAL, max_len=48, image_size=32)


def stream(pattern: str, spec: PairSpec, batch_size: int = 4, shuffle: bool = True, **settings):
    """The staged loader with the pair form, as `spec` says (tiny tokenizer, 32 px images)."""
    return make_loader(
        pattern,
        batch_size=batch_size,
        max_len=spec.max_len,
        visual_tokens=VISUAL,
        pairs=True,
        shuffle=shuffle,
        **settings,
    )


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

    first_three = stream(pattern, spec)
    [next(first_three) for _ in range(3)]
    resumed = stream(pattern, spec)
    resumed.load_state_dict([json.loads(json.dumps(first_three.state_dict()))])
    for expected in taken[3:]:
        got = next(resumed)
        assert got["keys"] == expected["keys"]
        torch.testing.assert_close(got["query_pixel_values"], expected["query_pixel_values"])
        assert torch.equal(got["positive_input_ids"], expected["positive_input_ids"])


def test_text_queries_interleaved_sides_and_a_missing_side(tmp_path, spec):
    path = tmp_path / "custom-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write(
            {
                "__key__": "a",
                "query.txt": "find a red thing",
                "instruction.txt": "Retrieve images",
                "positive.jpg": jpeg((200, 0, 0)),
                "positive.txt": "look: <image> it is red",
            }
        )
        writer.write({"__key__": "b", "query.jpg": jpeg((0, 0, 200)), "positive.txt": "blue"})
        writer.write({"__key__": "c", "query.txt": "orphan"})
    batches = stream(str(path), spec, batch_size=2, shuffle=False, max_bad_fraction=1.0)  # in written order
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
    # The sample without a positive is counted, not crashed on.
    alone = stream(str(path), spec, batch_size=3, shuffle=False, max_bad_fraction=1.0)
    assert sorted(next(alone)["keys"]) == ["a", "b"]
    assert alone.fault_counts() == {"missing_image": 1}
    strict = stream(str(path), spec, batch_size=3, shuffle=False, bad_fraction_min_samples=1)
    with pytest.raises(DataQualityError, match="has no positive"):
        next(strict)


def test_query_classes_reach_the_batch_as_labels(tmp_path, spec):
    """KEY.label.cls (MRL-E classifier) comes through the staged loader; IGNORE_INDEX where a sample has none."""
    path = tmp_path / "labels-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "a", "query.txt": "red", "positive.txt": "a red thing", "label.cls": b"2"})
        writer.write({"__key__": "b", "query.txt": "blue", "positive.txt": "a blue thing"})
        writer.write({"__key__": "c", "query.txt": "odd", "positive.txt": "odd", "label.cls": b"two"})
    batches = stream(str(path), spec, batch_size=2, shuffle=False, max_bad_fraction=1.0)
    batch = next(batches)
    assert batch["keys"] == ["a", "b"]
    assert torch.equal(batch["labels"], torch.tensor([2, IGNORE_INDEX]))
    assert batches.fault_counts() == {"malformed_json": 1}  # a class that is not an integer is counted
    unlabelled = next(iter(stream(pattern_of(tmp_path), spec, shuffle=False)))
    assert "labels" not in unlabelled


def pattern_of(folder) -> str:
    write_pair_shards(folder / "plain", num_shards=1, samples_per_shard=4, seed=0)
    return str(folder / "plain" / "pairs-000000.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_pair_data_is_counted_not_crashed_on(tmp_path, spec, workers):
    """The loader's fault set in the pair form: corrupt image, missing side, truncated tar, ..."""
    bad = write_bad_shards(tmp_path / "bad", pairs=True)
    loader = stream(
        bad["pattern"],
        spec,
        batch_size=2,
        rules=SampleRules(max_image_pixels=200 * 200),
        num_workers=workers,
        max_bad_fraction=1.0,
    )
    keys = rest_of_epoch(loader)
    assert sorted(keys) == sorted(bad["good"])  # all good samples, each once, and the epoch went on
    assert loader.fault_counts(epoch=0) == bad["faults"]
    assert {"corrupt_image", "truncated_tar", "missing_image", "empty_shard"} <= set(bad["faults"])
    assert not bad["marker"].exists()


def test_one_pair_shard_feeds_two_ranks_of_two_workers(tmp_path, spec):
    """Fewer shards than ranks x workers: the sample-level split still gives each rank its share."""
    write_pair_shards(tmp_path, num_shards=1, samples_per_shard=12, seed=0)
    pattern = str(tmp_path / "pairs-000000.tar")
    keys = []
    for rank in range(2):
        loader = make_loader(
            pattern, rank=rank, world_size=2, batch_size=2, pairs=True, visual_tokens=VISUAL, max_len=48, num_workers=2
        )
        keys += rest_of_epoch(loader)
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 12


def test_pair_sources_mix_by_weight_and_resume_in_resampled_mode(tmp_path, spec):
    """data.sources and epoch_mode hold for pairs as for every form: both sources drawn, exact resume."""
    write_pair_shards(tmp_path / "a", num_shards=1, samples_per_shard=12, seed=0)
    with wds.TarWriter(str(tmp_path / "b.tar")) as writer:  # text-to-text pairs, keys b0..b11
        for i in range(12):
            writer.write({"__key__": f"b{i}", "query.txt": f"question {i}", "positive.txt": f"answer {i}"})
    sources = [(str(tmp_path / "a" / "pairs-000000.tar"), 0.75), (str(tmp_path / "b.tar"), 0.25)]

    def loader():
        return make_loader(sources, batch_size=4, max_len=48, visual_tokens=VISUAL, pairs=True, epoch_mode="resampled")

    reference = loader()
    expected = [next(reference) for _ in range(8)]
    keys = [key for batch in expected for key in batch["keys"]]
    from_b = sum(key.startswith("b") for key in keys)
    assert len(keys) == 32 and 0 < from_b < 16 and reference.epoch == 0  # both sources, mostly the first
    first = loader()
    [next(first) for _ in range(3)]
    resumed = loader()
    resumed.load_state_dict([json.loads(json.dumps(first.state_dict()))])
    for batch in expected[3:]:
        got = next(resumed)
        assert got["keys"] == batch["keys"] and torch.equal(got["query_pixel_values"], batch["query_pixel_values"])
