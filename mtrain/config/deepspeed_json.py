"""The DeepSpeed JSON, generated from the typed config (never kept by hand with "auto" values)."""

from __future__ import annotations

from typing import Any

from mtrain.config.schema import TrainConfig


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str) -> dict[str, Any]:
    """DeepSpeed config for `cfg` at `world_size` ranks, `precision` being 'fp32' or 'bf16'."""
    zero: dict[str, Any] = {
        "stage": cfg.zero.stage,
        "overlap_comm": cfg.zero.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": cfg.zero.reduce_bucket_size,
    }
    if cfg.zero.stage == 3:
        zero.update(
            stage3_param_persistence_threshold=cfg.zero.param_persistence_threshold,
            stage3_prefetch_bucket_size=cfg.zero.prefetch_bucket_size,
            # Without this, export would need the whole model gathered on one rank.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if cfg.zero.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if cfg.zero.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    micro = cfg.data.micro_batch_size
    accum = cfg.optim.grad_accum_steps
    return {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # mtrain logs its own metrics; DeepSpeed's periodic prints would only add noise.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
