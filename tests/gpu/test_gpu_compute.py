"""Real computation on one CUDA GPU: each objective's step in bf16 against fp32 on the CPU, packed rows
against padded documents on CUDA's attention, and a bit-exact save/resume. Skipped without a GPU.

Run by `scripts/gpu-check.sh`. Tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-9 per
operation). The random model's lm_head is scaled up so its loss (about 16) is far from ln(vocab) and
moves when a mask, a scale or a row is wrong; bf16 against fp32 it moved by at most 0.07% (CPU bf16,
the same test with DEVICE = "cpu"), so LOSS_RTOL = 1% leaves rounding a 14x margin.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config import load_config
from mtrain.engine.setup import build_task
from mtrain.model.build import build_model
from tests.conftest import launch_env, run
from tests.integration.test_checkpoint_resume import SAVE_EVERY, STEPS, losses, train_cmd
from tests.unit.test_contrastive import make_batch as pair_batch
from tests.unit.test_matryoshka_task import make_batch as caption_batch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

DEVICE = "cuda"
LOSS_RTOL = 0.01
SHARPEN = 30.0  # lm_head scale-up of the random model

OBJECTIVES = {
    "lm_packed": ["model.lora.enabled=true"],
    "m3_all_scales_mss_lora": [
        "matryoshka.tokens.mode=m3",
        "matryoshka.tokens.scales=[1,4,16,64]",
        "matryoshka.tokens.policy=all",
        "model.lora.enabled=true",
        "model.lora.strategy=shared_plus_per_scale",
    ],
    "mqt": ["matryoshka.tokens.mode=mqt", "matryoshka.tokens.scales=[2,8,32,64]", "matryoshka.tokens.mqt_stage=2"],
    "contrastive_gradcache_mrl": [
        "task.objective=contrastive",
        "model.lora.enabled=true",
        "task.contrastive.chunk_size=2",
        "matryoshka.dims.dims=[16,32,64]",
        "matryoshka.dims.policy=mrl",
    ],
}


def to_device(value, device: str = DEVICE):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(item, device) for item in value)
    return value


def packed_caption_batch(built) -> dict:
    """The three captions of `caption_batch` packed into one row; positions restart per document."""
    rows = caption_batch(built)
    ids, labels, positions = [], [], []
    for row in range(rows["input_ids"].shape[0]):
        keep = rows["attention_mask"][row].bool()
        ids.append(rows["input_ids"][row][keep])
        labels.append(rows["labels"][row][keep])
        positions.append(torch.arange(int(keep.sum())))
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions)[None],
        "attention_mask": torch.ones(1, sum(len(i) for i in ids), dtype=torch.long),
        "pixel_values": rows["pixel_values"],
    }


def objective_step(objective: str, dtype: torch.dtype, device: str, state: dict | None = None):
    """Loss of one step and the trained gradients; the weights are `state` when given (fp32 reference)."""
    cfg = load_config(None, [*OBJECTIVES[objective], "model.lora.dropout=0.0", "model.attn_implementation=sdpa"])
    built = build_model(cfg.model, dtype, None, seed=0, tokens=cfg.matryoshka.tokens)
    task = build_task(cfg, built, rank=0)
    if state is not None:
        task.load_state_dict(state)  # the fp32 weights, rounded to bf16
    else:
        with torch.no_grad():
            for name, param in task.named_parameters():
                if "lora_B" in name:  # LoRA B starts at zero: give the adapters a delta so routing matters
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
            for name, param in task.state_dict().items():
                if "lm_head" in name:  # confident logits: a random model's loss would sit at ln(vocab) whatever happens
                    param.mul_(SHARPEN)
    task = task.to(device).train()
    if cfg.task.objective == "contrastive":
        batch = pair_batch(built)
    elif objective == "lm_packed":
        batch = packed_caption_batch(built)
    else:
        batch = caption_batch(built)
    batch = to_device(batch, device)
    if hasattr(task, "begin_step"):
        task.begin_step(1)
    loss, _ = task(batch)
    loss.backward()
    grads = {name: p.grad for name, p in task.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach().float().cpu(), grads, {k: v.detach().cpu() for k, v in task.state_dict().items()}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_bf16_step_on_the_gpu_matches_fp32_on_the_cpu(objective):
    reference, _, state = objective_step(objective, torch.float32, "cpu")
    loss, grads, _ = objective_step(objective, torch.bfloat16, DEVICE, state=state)
    assert math.isfinite(float(loss)) and math.isfinite(float(reference))
    assert abs(float(loss) - float(reference)) <= LOSS_RTOL * abs(float(reference)), (float(loss), float(reference))
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads.values())
    assert all(g.device.type == torch.device(DEVICE).type for g in grads.values())


@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_packed_rows_equal_padded_documents_on_cuda_attention(attention):
    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn")
    cfg = load_config(None, ["model.freeze.language_model=false", f"model.attn_implementation={attention}"])
    built = build_model(cfg.model, torch.bfloat16, None, seed=0)
    model = built.model.to(DEVICE).train()
    padded, packed = to_device(caption_batch(built)), to_device(packed_caption_batch(built))

    def token_losses(batch: dict, **inputs) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], use_cache=False, **inputs)
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits.logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
        return losses[targets != IGNORE_INDEX]

    alone = token_losses(padded, attention_mask=padded["attention_mask"])
    together = token_losses(packed, position_ids=packed["position_ids"])
    # Same learned tokens in the same order; each document attends only within itself.
    assert alone.shape == together.shape
    torch.testing.assert_close(together.mean(), alone.mean(), rtol=LOSS_RTOL, atol=0.0)
    torch.testing.assert_close(together, alone, rtol=0.05, atol=0.05)


def test_save_and_resume_on_one_gpu_is_bit_exact(tmp_path, shards_pattern):
    env = {**launch_env(), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS reductions
    device = [f"run.device={DEVICE}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(train_cmd(1, straight, shards_pattern, *device), cwd=tmp_path, env=env).returncode == 0
    crashed = run(
        train_cmd(1, killed, shards_pattern, *device),
        cwd=tmp_path,
        env={**env, "MTRAIN_FAULT_INJECT": f"saved@{SAVE_EVERY}"},
    )
    assert crashed.returncode != 0
    resumed = run(train_cmd(1, killed, shards_pattern, *device), cwd=tmp_path, env=env)
    assert resumed.returncode == 0
    assert f"at step {SAVE_EVERY} (exact load, RNG restored)" in resumed.stderr
    expected, got = losses(straight), losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        assert got[step] == expected[step], step
