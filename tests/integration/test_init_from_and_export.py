"""Stage 1 (projector + lm_head) then stage 2 (LoRA) with `checkpoint.init_from`; both exports load
in stock transformers / PEFT and give mtrain's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import mtrain_train, read_metrics, run

pytestmark = pytest.mark.timeout(600)


def train_cmd(run_dir: Path, shards: str, steps: int, *extra: str) -> list[str]:
    return mtrain_train(run_dir, shards, f"run.max_steps={steps}", "optim.warmup_steps=2", *extra)


def mtrain_model(checkpoint: Path) -> torch.nn.Module:
    """The model as mtrain builds it for training, with the checkpoint's weights (no export involved)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mtrain.config import load_config
    from mtrain.model.build import build_model
    from mtrain.task.language_modeling import LanguageModelingTask

    cfg = load_config(checkpoint / "config.yaml")
    built = build_model(cfg.model, torch.float32, None, cfg.run.seed)
    task = LanguageModelingTask(built.model, built.image_token_id)
    task.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))
    return task.model.eval()


def inputs(tokenizer) -> dict[str, torch.Tensor]:
    ids = (
        [tokenizer.bos_token_id]
        + [tokenizer.convert_tokens_to_ids("<image>")] * 64
        + tokenizer("a red circle").input_ids
    )
    torch.manual_seed(0)
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, 32, 32)}


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def test_stage1_then_stage2_with_init_from_and_stock_loaders(tmp_path, shards_pattern):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from mtrain.checkpoint.export import export_checkpoint

    # Stage 1: the projector and lm_head train, no LoRA.
    stage1 = tmp_path / "stage1"
    proc = run(train_cmd(stage1, shards_pattern, 10, "model.lora.enabled=false"), cwd=tmp_path)
    assert proc.returncode == 0
    stage1_metrics = read_metrics(stage1)

    # Stage 2: LoRA on top of stage 1's weights; optimizer, schedule and data start fresh.
    stage2 = tmp_path / "stage2"
    proc = run(train_cmd(stage2, shards_pattern, 3, f"checkpoint.init_from={stage1 / 'checkpoints'}"), cwd=tmp_path)
    assert proc.returncode == 0
    assert "init_from: weights from" in proc.stderr and "resumed" not in proc.stderr
    stage2_metrics = read_metrics(stage2)
    assert [m["step"] for m in stage2_metrics] == [1, 2, 3]
    assert stage2_metrics[0]["lr"] == stage1_metrics[0]["lr"]  # a fresh warmup
    # Stage 2 starts where stage 1 ended, far below a fresh model's loss.
    assert stage2_metrics[0]["loss"] < stage1_metrics[0]["loss"] - 0.5
    assert abs(stage2_metrics[0]["loss"] - stage1_metrics[-1]["loss"]) < 0.3

    # Stock transformers loads stage 1's export and gives mtrain's logits.
    export1 = stage1 / "export"
    assert sorted(json.loads((export1 / "mtrain.json").read_text())["folders"]) == ["model"]
    tokenizer = AutoTokenizer.from_pretrained(export1 / "model")
    batch = inputs(tokenizer)
    stock = AutoModelForImageTextToText.from_pretrained(export1 / "model").eval()
    expected = logits(mtrain_model(stage1 / "checkpoints" / "step_00000010"), batch)
    torch.testing.assert_close(logits(stock, batch), expected, rtol=1e-5, atol=1e-5)

    # Stage 2's export: merged model, and the adapter on its base with stock PEFT, both give mtrain's logits.
    export2 = stage2 / "export"
    metadata = json.loads((export2 / "mtrain.json").read_text())
    assert sorted(metadata["folders"]) == ["adapter", "base", "model"]
    assert metadata["matryoshka"]["token_mode"] == "none" and metadata["matryoshka"]["strategy"] == "shared"
    assert not list(export2.rglob("*.bin")) and not list(export2.rglob("*.pt"))  # safetensors only
    expected = logits(mtrain_model(stage2 / "checkpoints" / "step_00000003"), batch)
    merged = AutoModelForImageTextToText.from_pretrained(export2 / "model").eval()
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-4, atol=1e-4)
    base = AutoModelForImageTextToText.from_pretrained(export2 / "base").eval()
    assert (logits(base, batch) - expected).abs().max() > 1e-3  # the adapter matters
    adapted = PeftModel.from_pretrained(base, export2 / "adapter").eval()
    torch.testing.assert_close(logits(adapted, batch), expected, rtol=1e-4, atol=1e-4)

    # The adapter-only export reads only trainable parameters and writes the same adapter.
    from safetensors.torch import load_file

    only = export_checkpoint(stage2 / "checkpoints", tmp_path / "adapter-only", adapter_only=True)
    a = load_file(only / "adapter" / "adapter_model.safetensors")
    b = load_file(export2 / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (only / "model").exists()
