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


def zero_sizes(zero: ZeroConfig, hidden_size: int) -> ZeroSizes:
    """What Hugging Face's DeepSpeed integration fills in for "auto" (10h, h^2 and 0.9h^2 for a hidden
    size h), where the config leaves a value null: buckets and replication scale with the layers, instead
    of DeepSpeed's fixed defaults (1e5 and 5e7) that replicate all of a small model and over-buffer a large one."""
    threshold, reduce, prefetch = zero.param_persistence_threshold, zero.reduce_bucket_size, zero.prefetch_bucket_size
    return ZeroSizes(
        param_persistence_threshold=10 * hidden_size if threshold is None else threshold,
        reduce_bucket_size=hidden_size * hidden_size if reduce is None else reduce,
        prefetch_bucket_size=int(0.9 * hidden_size * hidden_size) if prefetch is None else prefetch,
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
