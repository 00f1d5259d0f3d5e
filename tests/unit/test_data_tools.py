"""`mtrain data validate` / `inspect` at scale: many paths, globs, brace patterns and URLs;
streaming in bounded memory; a config's tokenizer and visual tokens; pair shards."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

from data_pipeline.check import iter_problems
from data_pipeline.formats import SampleRules
from data_pipeline.pairs import write_pair_shards
from mtrain.cli import main
from tests.conftest import REPO, launch_env
from tests.shard_server import serve_folder


def test_validate_and_inspect_take_many_globs_patterns_and_urls(sample_shards, tmp_path, capsys):
    assert main(["data", "validate", str(sample_shards / "*.tar")]) == 0
    assert "4 shard(s): 0 bad" in capsys.readouterr().err
    with serve_folder(sample_shards) as (url, _):
        args = [
            str(sample_shards / "shard-00000[01].tar"),
            f"{url}/shard-000002.tar",
            f"pipe:cat {sample_shards}/shard-000003.tar",
        ]
        assert main(["data", "validate", *args]) == 0
        assert "4 shard(s): 0 bad" in capsys.readouterr().err
        assert main(["data", "inspect", *args]) == 0
    out = capsys.readouterr().out
    assert "shards: 4  samples: 192  bad: 0" in out and "caption=192" in out


def test_inspect_counts_tokens_with_the_configs_tokenizer_and_visual_tokens(sample_shards, capsys):
    tiny = str(REPO / "configs/tiny.yaml")
    shard = str(sample_shards / "shard-000000.tar")
    assert main(["data", "inspect", shard]) == 0
    assert "(64 visual tokens per image)" in capsys.readouterr().out
    assert main(["data", "inspect", shard, "--config", tiny, "model.tiny.image_size=16", "data.max_len=20"]) == 0
    out = capsys.readouterr().out
    assert "(16 visual tokens per image)" in out and "over data.max_len=20: 48 of 48 samples" in out


def test_validate_tokenizes_with_the_configs_tokenizer_visual_tokens_and_max_len(sample_shards, capsys):
    tiny = str(REPO / "configs/tiny.yaml")
    shard = str(sample_shards / "shard-000000.tar")
    # 64 visual tokens + a caption need 71 tokens: at max_len=66 the caption is cut away entirely.
    assert main(["data", "validate", shard, "--config", tiny, "data.max_len=66"]) == 1
    captured = capsys.readouterr()
    assert "1 shard(s): 48 bad" in captured.err
    assert captured.out.count("\tnothing_learned\t") == 48
    assert "within data.max_len=66; it needs 71 tokens" in captured.out
    # The same max_len with 16 visual tokens per image (16 px images) leaves every caption whole.
    assert main(["data", "validate", shard, "--config", tiny, "model.tiny.image_size=16", "data.max_len=66"]) == 0
    assert "1 shard(s): 0 bad" in capsys.readouterr().err
    assert main(["data", "validate", shard]) == 0  # without a config only the members are checked


def test_pair_shards_are_understood(tmp_path, capsys):
    paths = write_pair_shards(tmp_path / "pairs", num_shards=1, samples_per_shard=6, seed=0)
    assert main(["data", "validate", str(paths[0])]) == 0
    assert main(["data", "inspect", str(paths[0])]) == 0
    assert "pair=6" in capsys.readouterr().out
    with tarfile.open(paths[0]) as tar:  # drop one pair's positive side
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(paths[0], "w") as tar:
        for info, data in members:
            if not (info.name.startswith(members[0][0].name.split(".")[0]) and ".positive." in info.name):
                tar.addfile(info, io.BytesIO(data))
    problems = list(iter_problems([str(paths[0])], SampleRules()))
    assert len(problems) == 1 and "has no positive" in problems[0].detail


def write_photo_shard(path, samples: int = 24) -> None:
    """Caption pairs with 384x384 JPEGs: 442 kB each once decoded, so keeping them would show."""
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            image = io.BytesIO()
            Image.effect_noise((384, 384), 40 + i).convert("RGB").save(image, format="JPEG", quality=60)
            for name, data in ((f"p{i:04d}.jpg", image.getvalue()), (f"p{i:04d}.txt", b"noise.")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def validate_peak_rss_mb(pattern: str) -> float:
    """Peak resident memory of `mtrain data validate PATTERN` in its own process."""
    code = (
        "import resource, sys; from mtrain.cli import main; rc = main(['data', 'validate', sys.argv[1]]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code, pattern], env=launch_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


def test_validate_peak_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    write_photo_shard(tmp_path / "photo-0000.tar")
    for i in range(1, 12):
        shutil.copy(tmp_path / "photo-0000.tar", tmp_path / f"photo-{i:04d}.tar")
    one = validate_peak_rss_mb(str(tmp_path / "photo-0000.tar"))
    twelve = validate_peak_rss_mb(str(tmp_path / "photo-*.tar"))
    print(f"validate peak RSS: {one:.0f} MB for 1 shard, {twelve:.0f} MB for 12 (decoded images: 10.6 MB per shard)")
    assert twelve < one + 8  # keeping the decoded images of 11 more shards would add over 100 MB


def test_data_index_writes_counts_and_sizes_the_loader_trusts(sample_shards, tmp_path, capsys):
    import json

    from data_pipeline.shards import ShardReader, expand_shards, shard_counts

    folder = tmp_path / "shards"
    shutil.copytree(sample_shards, folder)
    (folder / "index.json").unlink()
    assert main(["data", "index", str(folder), "--form", "caption"]) == 0
    index = json.loads((folder / "index.json").read_text())
    assert index["format"] == "caption" and set(index["samples"].values()) == {48} and len(index["bytes"]) == 4
    assert shard_counts(expand_shards(str(folder / "*.tar")), ShardReader()) == ([48] * 4, 0)


def test_validate_with_a_config_renders_conversations_with_its_chat_template():
    """`data validate/inspect --config` tokenize conversations as training does: through the config's
    chat template (the tokenizer's, or `model.chat_template`), not the fixed prefixes used without one."""
    import argparse

    from mtrain.cli import _data_rules, _data_tokens
    from mtrain.model.tokenizer import build_tiny_tokenizer

    args = argparse.Namespace(require_image=False, max_image_pixels=None)
    tiny = str(REPO / "configs/tiny.yaml")
    assert _data_rules(args, _data_tokens([tiny])).chat.template == build_tiny_tokenizer().chat_template
    custom = "{% for m in messages %}{{ m.role }}: {{ m.content }} {% endfor %}"
    assert _data_rules(args, _data_tokens([tiny, f'model.chat_template="{custom}"'])).chat.template == custom
    assert _data_rules(args, None).chat is None


@pytest.mark.parametrize("preset", ["tiny-llava-onevision", "tiny-gemma3", "tiny-qwen2.5-vl"])
def test_data_tools_tokenize_with_the_presets_own_tokenizer_and_image_token(preset):
    """`data validate/inspect --config` with a preset: that preset's tokenizer (chat template, image token and
    markers), as training builds it; the OneVision and Gemma 3 presets got the LLaVA preset's."""
    from mtrain.cli import _data_tokens
    from mtrain.config import load_config
    from mtrain.model.build import build_model

    overrides = [f"model.preset={preset}", "matryoshka.tokens.mode=none"]
    data = _data_tokens([str(REPO / "configs/tiny.yaml"), *overrides])
    built = build_model(load_config(str(REPO / "configs/tiny.yaml"), overrides).model, torch.float32, None, seed=0)
    assert data.tokenizer.chat_template == built.tokenizer.chat_template
    assert data.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    assert (data.image_token_id, data.image_markers) == (built.image_token_id, built.family.image_markers)


def test_validate_counts_native_resolution_images_by_their_own_size(tmp_path, capsys):
    """At Qwen's native resolution `data validate --config` counts each image as training does, from its header:
    with data.max_len=33, a caption of a 16x16 image (4 tokens, 11 in all) fits, one of a 64x32 image (32 tokens,
    the reference grid) does not; counted at the reference grid, both would be cut."""
    import webdataset as wds

    shard = str(tmp_path / "native-000000.tar")
    with wds.TarWriter(shard) as sink:
        for key, size in [("small", (16, 16)), ("large", (64, 32))]:
            buffer = io.BytesIO()
            Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
            sink.write({"__key__": key, "png": buffer.getvalue(), "txt": b"a shape."})
    config = [str(REPO / "configs/tiny.yaml"), "model.preset=tiny-qwen2-vl", "matryoshka.tokens.mode=none"]
    assert (
        main(["data", "validate", shard, "--config", *config, "model.image_pixels=[256,2048]", "data.max_len=33"]) == 1
    )
    problems = capsys.readouterr().out
    assert "large" in problems and "nothing_learned" in problems and "small" not in problems
