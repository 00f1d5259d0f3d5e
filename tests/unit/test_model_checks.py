"""Model folders are checked before any process group forms: the family is supported, the scales fit
its grid, and a tokenizer without a pad token pads with eos (or is refused when it has none)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtrain.config import load_config
from mtrain.launch.model_checks import model_problems
from mtrain.model.families.llava import tiny_llava_config
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer, pad_with_eos_or_unk
from tests.conftest import REPO, launch_env

pytestmark = pytest.mark.timeout(180)


def save_folder(folder, config, tokenizer=None):
    """A model folder as save_pretrained leaves it, less the weights (the checks never read them)."""
    config.save_pretrained(folder)
    (tokenizer or build_tiny_tokenizer()).save_pretrained(folder)
    return folder


def tiny_llava_folder(folder, tokenizer=None):
    tokenizer = tokenizer or build_tiny_tokenizer()
    tiny = load_config(None, []).model.tiny
    config = tiny_llava_config(tiny, 512, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id or 0)
    return save_folder(folder, config, tokenizer)


def folder_config(folder, *overrides: str):
    return load_config(None, ["model.preset=none", f"model.path={folder}", *overrides])


def test_an_unsupported_folder_is_refused_before_any_process_group(tmp_path, shards_pattern, capsys):
    from transformers import MllamaConfig

    from mtrain.cli import main

    folder = save_folder(tmp_path / "mllama", MllamaConfig())
    refusal = f"model.path={str(folder)!r} is a 'mllama' model; mtrain supports the model families llava"
    args = [str(REPO / "configs/tiny.yaml"), "model.preset=none", f"model.path={folder}"]
    args += [f"run.dir={tmp_path / 'run'}", f"data.shards={shards_pattern}"]
    # `train` in a fresh interpreter: it reports whether a process group formed and how long main() took.
    code = (
        "import sys, time\nimport torch.distributed as dist\nfrom mtrain.cli import main\n"
        "start = time.perf_counter()\nrc = main(sys.argv[1:])\n"
        "print(f'seconds={time.perf_counter() - start:.2f} group={dist.is_initialized()}')\nsys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", *args], capture_output=True, text=True, timeout=120, env=launch_env()
    )
    assert proc.returncode == 2 and refusal in proc.stderr, proc.stderr
    seconds, group = proc.stdout.split()
    assert group == "group=False"
    assert float(seconds.split("=")[1]) < 10.0  # imports, config and folder read (1-2 s measured); no rendezvous
    assert not (tmp_path / "run").exists()
    # `mtrain validate`, which every launcher runs before spawning anything, refuses it the same way.
    assert main(["validate", *args]) == 2
    assert refusal in capsys.readouterr().err


def test_scales_that_do_not_fit_the_folders_grid_are_named(tmp_path):
    folder = tiny_llava_folder(tmp_path / "llava")
    assert model_problems(folder_config(folder, "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,16]")) == []
    (problem,) = model_problems(folder_config(folder, "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,9]"))
    assert problem.startswith(f"model.path={str(folder)!r}: matryoshka.tokens.scales: [9] do not fit")
    (problem,) = model_problems(folder_config(folder, "model.image_size=[32,64]"))
    assert "model.image_size=[32, 64] is for Qwen models; a llava tower takes 32x32 images" in problem


def test_a_missing_pad_token_pads_with_eos_or_is_refused(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    assert model_problems(folder_config(tiny_llava_folder(tmp_path / "eos", tokenizer))) == []
    note = pad_with_eos_or_unk(tokenizer)
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert note == f"the tokenizer has no pad token; padding with '</s>' (id {tokenizer.eos_token_id}), never learned"
    assert pad_with_eos_or_unk(tokenizer) == ""
    bare = build_tiny_tokenizer()
    bare.pad_token = bare.eos_token = bare.unk_token = None
    folder = tiny_llava_folder(tmp_path / "bare", bare)
    (problem,) = model_problems(folder_config(folder))
    assert "its tokenizer has no pad token and no eos or unk token to pad with" in problem
