"""`mtrain data build pair`: JSONL of (query, positive) sides to pair shards that plain webdataset reads."""

import json

import webdataset as wds

from data_pipeline.build import build_shards
from data_pipeline.sample_data import draw_shape


def test_pair_jsonl_builds_readable_pair_shards(tmp_path):
    import random

    rng = random.Random(0)
    lines = []
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "cross")]):
        draw_shape(colour, shape, rng).save(tmp_path / f"{i}.jpg", quality=90)
        lines.append(
            {"query_image": f"{i}.jpg", "positive_text": f"a {colour} {shape}", "instruction": "Represent the image"}
        )
    lines.append({"query_text": "no positive side"})  # bad: skipped and reported, not fatal
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))

    report = build_shards("pair", tmp_path / "pairs.jsonl", tmp_path / "out", max_skipped_fraction=0.5)
    assert report.samples == 3 and len(report.skipped) == 1 and "positive" in report.skipped[0]
    assert report.images_copied == 3 and report.images_reencoded == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["format"] == "pair" and sum(index["samples"].values()) == 3

    samples = list(wds.WebDataset([str(p) for p in sorted((tmp_path / "out").glob("*.tar"))], shardshuffle=False))
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [
        ["instruction.txt", "positive.txt", "query.jpg"]
    ] * 3
    assert samples[1]["positive.txt"] == b"a blue square"


def test_pair_jsonl_with_hard_negatives_builds_and_loads(tmp_path):
    """negative_image / negative_text become `negative.*` members; the loader batches them as negative_*."""
    import random

    from tests.data_factory import make_loader

    rng = random.Random(1)
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "cross")]):
        draw_shape(colour, shape, rng).save(tmp_path / f"{i}.jpg", quality=90)
    lines = [
        {"query_image": "0.jpg", "positive_text": "a red circle", "negative_text": "a red square"},
        {"query_text": "a blue square", "positive_image": "1.jpg", "negative_image": "2.jpg"},
        {"query_image": "2.jpg", "positive_text": "a green cross"},  # no negative: still a good pair
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    report = build_shards("pair", tmp_path / "pairs.jsonl", tmp_path / "out")
    assert report.samples == 3 and not report.skipped
    samples = list(wds.WebDataset([str(p) for p in sorted((tmp_path / "out").glob("*.tar"))], shardshuffle=False))
    assert samples[0]["negative.txt"] == b"a red square" and "negative.jpg" in samples[1]
    assert not any(k.startswith("negative") for k in samples[2])
    from data_pipeline.check import iter_samples
    from data_pipeline.formats import SampleRules

    checked = list(iter_samples(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")), SampleRules()))
    assert [problem for _, _, problem in checked] == [None] * 3  # `mtrain data validate` reads negatives too
    assert len(checked[1][1].images) == 2  # the positive image and the negative image

    loader = make_loader(
        str(tmp_path / "out" / "*.tar"), batch_size=3, max_len=48, visual_tokens=4, pairs=True, shuffle=False
    )
    batch = next(loader)
    assert batch["negative_rows"] == [True, True, False]
    assert batch["negative_input_ids"].shape[0] == 2 and batch["negative_pixel_values"].shape[0] == 1
    assert batch["negative_texts"] == ["a red square", "<image>"]
    assert batch["query_input_ids"].shape[0] == 3 and loader.fault_counts() == {}
