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
