"""Stage 1 (projector + lm_head) then stage 2 (LoRA) with `checkpoint.init_from`; both exports load
in stock transformers / PEFT and give mtrain's logits."""

from __future__ import annotations

import dataclasses
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


MQT = ("matryoshka.tokens.mode=mqt", "matryoshka.tokens.mqt_queries=16", "matryoshka.tokens.scales=[4,16]")
MSS = ("model.lora.strategy=shared_plus_per_scale", "model.freeze.projector=true", "checkpoint.export_at_end=false")


def fp32_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def projector_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The MQT projector's parameters in a checkpoint, named from the projector down (PEFT adds a prefix)."""
    state = fp32_state(checkpoint)
    return {
        name[name.index("multi_modal_projector") :]: t for name, t in state.items() if "multi_modal_projector" in name
    }


def adapter_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every LoRA weight of every adapter in a checkpoint's `adapter/` folder, keyed by adapter and weight."""
    from safetensors.torch import load_file

    return {
        f"{folder.parent.name}/{name}": tensor
        for folder in sorted((checkpoint / "adapter").glob("*/adapter_model.safetensors"))
        for name, tensor in load_file(folder).items()
        if "lora_" in name
    }


def test_mqt_projector_and_scale_adapters_survive_export_and_init_from(tmp_path, shards_pattern):
    """Stage 1 trains an MQT projector; stage 2 starts from it with scale-specific LoRA (and resumes once); stage 3
    starts from stage 2 keeping every scale adapter frozen. Nothing trained is lost on the way, bit for bit."""
    from transformers import AutoModelForImageTextToText

    from mtrain.config import load_config
    from mtrain.model.build import build_model
    from mtrain.task.language_modeling import LanguageModelingTask

    # Stage 1: the query transformer and lm_head train at all M queries, no LoRA.
    stage1 = tmp_path / "stage1"
    stage1_cmd = train_cmd(stage1, shards_pattern, 2, "model.lora.enabled=false", "matryoshka.tokens.mqt_stage=1", *MQT)
    assert run(stage1_cmd, cwd=tmp_path).returncode == 0
    checkpoint1 = stage1 / "checkpoints" / "step_00000002"
    trained = projector_weights(checkpoint1)
    assert len(trained) > 10 and "multi_modal_projector.queries" in trained

    # Stock transformers loads the export's registered class with the trained projector and gives mtrain's logits.
    export = stage1 / "export" / "model"
    assert json.loads((export / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"]
    stock = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
    assert type(stock).__module__.startswith("transformers_modules")  # the folder's code, not mtrain's
    cfg = load_config(checkpoint1 / "config.yaml")
    built = build_model(cfg.model, torch.float32, None, cfg.run.seed, cfg.matryoshka.tokens)
    task = LanguageModelingTask(built.model, built.image_token_id)
    task.load_state_dict(fp32_state(checkpoint1))
    torch.manual_seed(0)
    ids = [1] + [built.image_token_id] * 16 + [100, 101, 102]
    batch = {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, 32, 32)}
    torch.testing.assert_close(logits(stock, batch), logits(task.model.eval(), batch), rtol=1e-5, atol=1e-5)

    # Stage 2 from stage 1's weights, with shared + per-scale LoRA and a frozen projector: stage 1's projector.
    stage2 = tmp_path / "stage2"
    init1 = f"checkpoint.init_from={stage1 / 'checkpoints'}"
    assert run(train_cmd(stage2, shards_pattern, 1, init1, *MQT, *MSS), cwd=tmp_path).returncode == 0
    kept = projector_weights(stage2 / "checkpoints" / "step_00000001")
    assert kept.keys() == trained.keys() and all(torch.equal(kept[name], trained[name]) for name in trained)
    # Resumed for a second step, the run still holds stage 1's projector.
    proc = run(train_cmd(stage2, shards_pattern, 2, init1, *MQT, *MSS), cwd=tmp_path)
    assert proc.returncode == 0 and "resumed from" in proc.stderr + proc.stdout
    checkpoint2 = stage2 / "checkpoints" / "step_00000002"
    kept = projector_weights(checkpoint2)
    assert all(torch.equal(kept[name], trained[name]) for name in trained)
    adapters = adapter_weights(checkpoint2)
    assert {name.split("/")[0] for name in adapters} == {"shared", "scale_4", "scale_16"}

    # Stage 3 keeps every adapter of stage 2, frozen (init_from_adapters=freeze): after a step they are stage 2's.
    stage3 = tmp_path / "stage3"
    init2 = f"checkpoint.init_from={stage2 / 'checkpoints'}"
    frozen = "checkpoint.init_from_adapters=freeze"
    assert run(train_cmd(stage3, shards_pattern, 1, init2, frozen, *MQT, *MSS), cwd=tmp_path).returncode == 0
    checkpoint3 = stage3 / "checkpoints" / "step_00000001"
    after = adapter_weights(checkpoint3)
    assert after.keys() == adapters.keys() and all(torch.equal(after[name], adapters[name]) for name in adapters)
    kept = projector_weights(checkpoint3)
    assert all(torch.equal(kept[name], trained[name]) for name in trained)

    # init_from_adapters=train (the default) loads the same adapters, trainable.
    from mtrain.checkpoint.init_from import init_from_folder, init_from_start, load_kept_adapters

    cfg3 = load_config(checkpoint3 / "config.yaml")
    start = init_from_start(init_from_folder(str(stage2 / "checkpoints"), stage3, create=False), "train")
    model_cfg = dataclasses.replace(cfg3.model, preset="none", path=str(start.model))
    model = build_model(model_cfg, torch.float32, None, cfg3.run.seed, cfg3.matryoshka.tokens).model
    assert load_kept_adapters(model, start.adapters, frozen=False) == ["scale_16", "scale_4", "shared"]
    lora = {name: param for name, param in model.named_parameters() if ".lora_" in name}
    assert lora and all(param.requires_grad for param in lora.values())
    for key, tensor in adapters.items():
        adapter, name = key.split("/")
        loaded = name.replace(".weight", f".{adapter}.weight")
        assert torch.equal(lora[loaded], tensor), key
