"""The 2-rank ZeRO-3 runs the families share: M3 at scales [1,4,16] in one pass, MSS LoRA (a shared adapter
plus one per scale) and packed rows through the real loader (`train_m3_mss_packed`, for the single-image
families gemma3, qwen2_vl and qwen2_5_vl; the anyres ones train configs/tiny_onevision.yaml), then a look at
the run: each step's loss against its per-scale losses, the export against the checkpoint's own task, and
`mtrain generate`'s answers from both (`generated_answers`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import mtrain_train, read_metrics, run

SCALES = (1, 4, 16)


def train_m3_mss_packed(tmp_path: Path, shards_pattern: str, preset: str, steps: int) -> tuple[Path, list[dict]]:
    """Train `preset` for `steps` on 2 ranks; returns the run folder and its metrics, one a step, each with
    every scale's loss."""
    run_dir = tmp_path / "run"
    cmd = mtrain_train(
        run_dir, shards_pattern,
        f"model.preset={preset}", f"run.max_steps={steps}", "optim.warmup_steps=2",
        "zero.param_persistence_threshold=0", "data.packing=true", "matryoshka.tokens.layout=packed",
        "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16]", "matryoshka.tokens.policy=all",
        "model.lora.strategy=shared_plus_per_scale",
        ranks=2,
    )  # fmt: skip
    proc = run(cmd, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0

    metrics = read_metrics(run_dir)
    assert len(metrics) == steps
    assert all(f"loss/scale_{s}" in m for m in metrics for s in SCALES)  # every scale, every step
    return run_dir, metrics


def assert_loss_is_the_mean_of_the_scale_losses(metrics: list[dict]) -> None:
    """Every step's loss, over both ranks' tokens, is the mean of its per-scale losses (equal scale weights):
    the one-pass step trains each scale as its own forward would (one process: the family's unit test)."""
    for step in metrics:
        mean = sum(step[f"loss/scale_{s}"] for s in SCALES) / len(SCALES)
        assert step["loss"] == pytest.approx(mean, rel=1e-4), step


def load_export(run_dir: Path, model_class: str):
    """The exported model as stock transformers loads it, of class `model_class`; the export also holds the
    shared and per-scale adapters."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(run_dir / "export" / "model", local_files_only=True)
    assert type(model).__name__ == model_class
    assert sorted(p.name for p in (run_dir / "export" / "adapter").iterdir() if p.is_dir()) == [
        "scale_1", "scale_16", "scale_4", "shared",
    ]  # fmt: skip
    return model.eval()


def checkpoint_task(run_dir: Path, steps: int) -> tuple[Any, Any]:
    """(built model, task) of the run's last checkpoint in this process: its config.yaml, and the ZeRO-3
    shards consolidated into the task's weights."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mtrain.config import load_config
    from mtrain.model.build import build_model
    from mtrain.task.registry import build_task

    checkpoint = run_dir / "checkpoints" / f"step_{steps:08d}"
    cfg = load_config(checkpoint / "config.yaml")
    built = build_model(cfg.model, torch.float32, None, cfg.run.seed, cfg.matryoshka.tokens)
    task = build_task(cfg, built, rank=0)
    task.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))
    return built, task.eval()


def generated_answers(run_dir: Path) -> list[str]:
    """`mtrain generate`'s answers (`run_generate`) about one picture at scale 4 from the run's export (stock
    loading through `MatryoshkaModel.from_export`) and from its checkpoints (loaded as `mtrain eval` loads
    them, the scale adapters routed as in training)."""
    from PIL import Image

    from mtrain.eval.generation import run_generate

    picture = run_dir / "picture.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(picture)
    return [
        run_generate(str(source), str(picture), "What is drawn?", scale=4, max_new_tokens=4)
        for source in (run_dir / "export", run_dir / "checkpoints")
    ]
