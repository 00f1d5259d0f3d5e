"""The DeepSpeed JSON, generated from the typed config (never kept by hand with "auto" values)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrain.config.schema import ModelConfig, TrainConfig, ZeroConfig


@dataclass(frozen=True)
class ZeroSizes:
    """ZeRO's size settings in elements, each the config's value or sized to the language model's width."""

    param_persistence_threshold: int
    """Parameters with fewer elements stay replicated on every rank (ZeRO-3)."""
    reduce_bucket_size: int
    """Elements per gradient-reduction bucket."""
    prefetch_bucket_size: int
    """Elements of parameters gathered ahead of use (ZeRO-3)."""


BUCKET_FLOOR = 50_000_000
"""Fewest elements per ZeRO bucket: DeepSpeed's own default bucket (100 MB in bf16), a size whose
collectives run at bandwidth rather than latency on NVLink and InfiniBand. At 1e7 the 8x-wider tiny
model stepped 0.87x as fast as at 5e7 (benchmarks/zero_defaults.py, issue 20's note)."""


def zero_sizes(zero: ZeroConfig, hidden_size: int) -> ZeroSizes:
    """ZeRO's sizes for a language model of hidden size h, where the config leaves a value null:

    - persistence threshold 0: every parameter is sharded. A parameter under the threshold is
      "persistent": DeepSpeed re-partitions it at every optimizer step and gathers it back in
      `_post_step` with one all-gather per parameter, all waited for before the next step begins
      (LLaVA-1.5-7B at Hugging Face's 10h or DeepSpeed's 1e5: about 310 norms and biases, so 310
      latency-bound collectives, tens of microseconds each on NCCL and milliseconds on gloo, that
      nothing overlaps). Sharded, the same small parameters ride in the prefetch's coalesced
      gathers during forward, and no rank holds a replica.
    - reduce bucket h^2 and prefetch bucket 0.9h^2, as Hugging Face's "auto" sizes them, but at
      least `BUCKET_FLOOR` elements, so a small model does not split its gathers and reductions into
      many tiny collectives. From h of about 7,100 up the floor no longer applies (LLaVA-1.5-7B, h = 4,096,
      gets DeepSpeed's 5e7 buckets: 0.13 GiB per GPU more than HF's h^2, `mtrain plan`).
    """
    threshold, reduce, prefetch = zero.param_persistence_threshold, zero.reduce_bucket_size, zero.prefetch_bucket_size
    return ZeroSizes(
        param_persistence_threshold=0 if threshold is None else threshold,
        reduce_bucket_size=max(hidden_size * hidden_size, BUCKET_FLOOR) if reduce is None else reduce,
        prefetch_bucket_size=max(int(0.9 * hidden_size * hidden_size), BUCKET_FLOOR) if prefetch is None else prefetch,
    )


def language_model_width(model: ModelConfig) -> int:
    """The language model's hidden size, from the config alone (the DeepSpeed JSON exists before the model)."""
    if not model.path:
        return model.tiny.hidden_size
    from transformers import AutoConfig  # noqa: PLC0415

    # `get_text_config`: the language model's config inside a multimodal one (as HF's "auto" reads it).
    return AutoConfig.from_pretrained(Path(model.path), local_files_only=True).get_text_config().hidden_size


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str) -> dict[str, Any]:
    """DeepSpeed config for `cfg` at `world_size` ranks, `precision` being 'fp32' or 'bf16'."""
    sizes = zero_sizes(cfg.zero, language_model_width(cfg.model))
    zero: dict[str, Any] = {
        "stage": cfg.zero.stage,
        "overlap_comm": cfg.zero.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": sizes.reduce_bucket_size,
    }
    if cfg.zero.stage == 3:
        zero.update(
            stage3_param_persistence_threshold=sizes.param_persistence_threshold,
            stage3_prefetch_bucket_size=sizes.prefetch_bucket_size,
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
