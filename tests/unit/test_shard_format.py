"""Shard format: `data build` for all three forms, plain webdataset reads them, inspect and validate."""

from __future__ import annotations

import json

import webdataset as wds

from data_pipeline.build import build_shards
from data_pipeline.check import validate_shards
from data_pipeline.formats import SampleRules
from data_pipeline.shards import expand_shards
from mtrain.cli import main
from tests.data_factory import write_bad_shards, write_inputs


def build_all(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    out = {}
    out["interleaved"] = build_shards(  # 1 of 8 documents names a missing image: allowed here
        "interleaved", inputs["interleaved"], tmp_path / "docs", shard_bytes=4000, max_skipped_fraction=0.2
    )
    out["conversation"] = build_shards(
        "conversation", inputs["conversation"], tmp_path / "conv", image_dir=inputs["images"]
    )
    out["caption"] = build_shards("caption", inputs["caption"], tmp_path / "cap")
    out["caption_csv"] = build_shards("caption", inputs["caption_csv"], tmp_path / "csv")
    return inputs, out


def test_build_writes_every_form_readable_by_plain_webdataset(tmp_path):
    inputs, reports = build_all(tmp_path)
    docs = reports["interleaved"]
    assert docs.samples == 7 and len(docs.skipped) == 1 and "missing.jpg" in docs.skipped[0]
    assert len(docs.shards) >= 2  # the 4000-byte target splits the documents over several shards
    assert docs.images_reencoded == 1 and docs.images_copied == 6  # only the BMP is re-encoded
    index = json.loads((tmp_path / "docs" / "index.json").read_text())
    assert index["format"] == "interleaved" and sum(index["samples"].values()) == 7

    for name, report in reports.items():
        samples = list(wds.WebDataset(report.shards, shardshuffle=False).decode("pil"))
        assert len(samples) == report.samples, name
        first = samples[0]
        if name == "interleaved":
            meta = first["json"]
            assert meta["texts"][1] is None and meta["images"][1] == "0.jpg"
            assert first["0.jpg"].size == (48, 48)
        elif name == "conversation":
            assert first["json"]["conversations"][0]["value"].startswith("<image>")
            assert first["jpg"].size == (48, 48)
        else:
            assert first["txt"].startswith(("a picture", "caption")) and first["jpg"].size == (48, 48)
    # JPEGs are copied byte for byte.
    raw = next(iter(wds.WebDataset(reports["caption"].shards, shardshuffle=False)))
    assert raw["jpg"] == (inputs["caption"] / "p0.jpg").read_bytes()


def test_validate_reports_every_bad_member_and_exits_1(tmp_path, capsys):
    bad = write_bad_shards(tmp_path / "bad")
    rules = SampleRules(max_image_pixels=200 * 200)
    problems = validate_shards(expand_shards(bad["pattern"]), rules)
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.reason] = counts.get(problem.reason, 0) + 1
    assert counts == bad["faults"]
    assert any(p.key == "b_corrupt" and p.shard.endswith("bad-000000.tar") for p in problems)

    assert main(["data", "validate", bad["pattern"], "--max-image-pixels", str(200 * 200)]) == 1
    out = capsys.readouterr().out
    assert "b_json\tmalformed_json" in out and "truncated_tar" in out and "empty_shard" in out
    assert not bad["marker"].exists()


def test_cli_build_inspect_validate_good_shards(tmp_path, capsys):
    inputs = write_inputs(tmp_path / "in")
    assert (
        main(
            [
                "data",
                "build",
                "conversation",
                str(inputs["conversation"]),
                "--out",
                str(tmp_path / "c"),
                "--images",
                str(inputs["images"]),
                "--shard-size",
                "8kB",
            ]
        )
        == 0
    )
    shards = sorted(str(p) for p in (tmp_path / "c").glob("*.tar"))
    assert len(shards) >= 2
    pattern = "::".join(shards)
    assert main(["data", "validate", pattern]) == 0
    assert main(["data", "inspect", pattern]) == 0
    out = capsys.readouterr().out
    assert "samples: 6" in out and "conversation=6" in out and "images per sample: 1:6" in out
    assert "p50=" in out and "«shape 0" in out and "[image jpg 48x48]" in out
