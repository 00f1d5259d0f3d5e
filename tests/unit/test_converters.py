"""`mtrain data build`: every converter with good and bad records. Bad records are reported with
their line (or row, or index) and id, skipped and never written; the build fails past the skip
limit; JSON lists and JSONL both read; each sample names its source record."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest
import webdataset as wds

from data_pipeline.build import build_shards
from data_pipeline.check import validate_shards
from data_pipeline.formats import SampleFault, SampleRules, build_sample
from mtrain.cli import main
from tests.data_factory import jpeg_bytes


@pytest.fixture
def images(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(rng))
    return folder


def jsonl(path, records) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def read_back(report) -> list[dict]:
    return list(wds.WebDataset(report.shards, shardshuffle=False).decode("pil"))


def check_report(report, samples: int, skipped: dict[str, str]) -> None:
    """`samples` were written, and each skipped input was reported at its place (line, index or row,
    in order) with its reason ("" where the reason is not checked)."""
    assert report.samples == samples
    assert [line.split(":")[0] for line in report.skipped] == list(skipped)
    for line, reason in zip(report.skipped, skipped.values(), strict=True):
        assert reason in line, line


def built_samples(report) -> list:
    """Every written sample through the loader's own sample builder (raises on a bad one)."""
    out = []
    for shard in report.shards:
        for raw in wds.WebDataset(shard, shardshuffle=False):
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            out.append(build_sample(raw["__key__"], members, SampleRules()))
    return out


def test_openai_messages_and_sharegpt_system_turns(tmp_path, images):
    good_messages = {
        "id": "m1",
        "messages": [
            {"role": "system", "content": "You describe shapes."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "0.jpg"}},
                    {"type": "text", "text": "What is it?"},
                ],
            },
            {"role": "assistant", "content": "A red circle."},
        ],
    }
    records = [
        good_messages,
        {"id": "m2", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        "{not json",  # line 3
        {"id": "m4", "messages": [{"role": "user", "content": "no answer"}]},  # nothing to learn
        {
            "id": "m5",
            "messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}],
        },
        {
            "id": "m6",
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "missing.jpg"}]},
                {"role": "assistant", "content": "x"},
            ],
        },
    ]
    jsonl(tmp_path / "messages.jsonl", records)
    report = build_shards(
        "conversation", tmp_path / "messages.jsonl", tmp_path / "m", image_dir=images, max_skipped_fraction=1.0
    )
    check_report(report, 2, {
        "messages.jsonl line 3": "not JSON",
        "messages.jsonl line 4 (id m4)": "nothing to learn",
        "messages.jsonl line 5 (id m5)": "",
        "messages.jsonl line 6 (id m6)": "missing.jpg",
    })  # fmt: skip
    first, second = built_samples(report)
    text = "".join(getattr(s, "text", "<image>") for s in first.segments)
    assert text.startswith("You describe shapes.\nUSER: <image>\nWhat is it?\nASSISTANT: A red circle.")
    assert len(first.images) == 1 and not second.images  # a text-only conversation is kept
    assert first.source == "messages.jsonl line 1 (id m1)"

    # ShareGPT with a system turn, as a JSON list; roles spelled either way.
    sharegpt = [
        {"id": "s1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "s2", "image": "1.jpg", "conversations": [{"from": "user", "value": "<image>\nShape?"}, {"from": "assistant", "value": "A square."}]},
        {"id": "s3", "conversations": [{"from": "narrator", "value": "?"}, {"from": "gpt", "value": "x"}]},
        {"id": "s4", "image": "1.jpg", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "s5", "conversations": "not a list"},
    ]  # fmt: skip
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt))
    report = build_shards(
        "conversation", tmp_path / "sharegpt.json", tmp_path / "s", image_dir=images, max_skipped_fraction=1.0
    )
    check_report(report, 2, {"sharegpt.json index 2 (id s3)": "unknown role 'narrator'",
                             "sharegpt.json index 3 (id s4)": "2 <image> placeholder(s) for 1 image(s)",
                             "sharegpt.json index 4 (id s5)": ""})  # fmt: skip
    system, with_image = built_samples(report)
    assert system.segments[0].text == "Be brief." and not system.segments[0].learned
    assert len(with_image.images) == 1
    written = [s["json"]["metadata"]["id"] for s in read_back(report)]
    assert written == ["s1", "s2"]  # malformed entries are never written


def test_mmc4_images_go_before_their_matched_sentence(tmp_path, images):
    records = [
        {
            "url": "http://example.com/a",
            "text_list": ["A page about shapes.", "Here is a circle.", "And a square."],
            "image_info": [{"image_name": "0.jpg", "matched_text_index": 1}, {"image_name": "1.jpg", "matched_text_index": 2}],
        },
        {"text_list": ["only text"], "image_info": []},
        {"text_list": ["x"], "image_info": [{"image_name": "0.jpg", "matched_text_index": 5}]},
        {"text_list": ["x"], "image_info": [{"image_name": "nope.jpg", "matched_text_index": 0}]},
        {"image_info": []},
    ]  # fmt: skip
    jsonl(tmp_path / "mmc4.jsonl", records)
    report = build_shards("mmc4", tmp_path / "mmc4.jsonl", tmp_path / "out", image_dir=images, max_skipped_fraction=1.0)
    check_report(report, 2, {
        "mmc4.jsonl line 3": "outside text_list", "mmc4.jsonl line 4": "nope.jpg", "mmc4.jsonl line 5": "text_list",
    })  # fmt: skip
    doc = read_back(report)[0]["json"]
    assert doc["texts"] == ["A page about shapes.", None, "Here is a circle.", None, "And a square."]
    assert doc["images"] == [None, "0.jpg", None, "1.jpg", None]
    assert json.loads((tmp_path / "out" / "index.json").read_text())["format"] == "interleaved"


def test_obelics_parquet_with_local_image_paths(tmp_path, images):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = {
        "texts": [["A circle:", None, "the end."], [None], ["x", None]],
        "images": [[None, "0.jpg", None], ["1.jpg"], [None, "http://example.com/a.jpg"]],
        "metadata": [json.dumps({"page": 1}), "{}", "{}"],
    }
    pq.write_table(pa.table(rows), tmp_path / "obelics.parquet")
    report = build_shards(
        "interleaved", tmp_path / "obelics.parquet", tmp_path / "out", image_dir=images, max_skipped_fraction=1.0
    )
    check_report(report, 1, {"obelics.parquet row 1": "no text to learn", "obelics.parquet row 2": "is a URL"})
    assert read_back(report)[0]["json"]["metadata"] == {"page": 1}


def test_interleaved_images_may_name_the_full_member(tmp_path):
    members = {"json": json.dumps({"texts": ["a", None], "images": [None, "k1.0.jpg"]}).encode(), "0.jpg": b""}
    assert [getattr(s, "member", None) for s in build_sample("k1", members, SampleRules()).segments] == [None, "0.jpg"]
    members["json"] = json.dumps({"texts": ["a", None], "images": [None, "k1.1.jpg"]}).encode()
    with pytest.raises(SampleFault, match="missing_image"):
        build_sample("k1", members, SampleRules())


def test_a_wrong_image_folder_fails_the_build_and_validate_names_the_source(tmp_path, images, capsys):
    records = [{"id": f"c{i}", "image": f"{i % 4}.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A shape."}]} for i in range(20)]  # fmt: skip
    jsonl(tmp_path / "llava.jsonl", records)  # JSONL where LLaVA ships a JSON list: both are read
    code = main(
        [
            "data",
            "build",
            "conversation",
            str(tmp_path / "llava.jsonl"),
            "--out",
            str(tmp_path / "bad"),
            "--images",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "20 of 20 input records skipped" in err and "llava.jsonl line 1 (id c0)" in err
    assert (
        main(
            [
                "data",
                "build",
                "conversation",
                str(tmp_path / "llava.jsonl"),
                "--out",
                str(tmp_path / "good"),
                "--images",
                str(images),
            ]
        )
        == 0
    )
    assert "20 input record(s): 20 written" in capsys.readouterr().out

    # A sample that goes bad after the build (here: its image removed) is named by its source record.
    report_shards = sorted(str(p) for p in (tmp_path / "good").glob("*.tar"))
    with tarfile.open(report_shards[0]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(report_shards[0], "w") as tar:
        for info, data in members:
            if not info.name.endswith(".jpg") or "0000003" not in info.name:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    problems = validate_shards(report_shards, SampleRules())
    assert len(problems) == 1 and problems[0].reason == "missing_image"
    assert "[from llava.jsonl line 4 (id c3)]" in problems[0].detail
