"""From a validated config to a running DeepSpeed engine: device, precision, model, optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mtrain.config.schema import TrainConfig
from mtrain.engine.schedule import warmup_cosine_scheduler
from mtrain.model.build import BuiltModel
from mtrain.task.registry import build_task


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32" or "bf16"
    backend: str  # "gloo" or "nccl"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def resolve_placement(cfg: TrainConfig) -> Placement:
    device = cfg.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = cfg.run.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    return Placement(device, precision, backend)


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and norm weights (1-D tensors) take no weight decay."""
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) < 2 or name.endswith(".bias")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, biases and norms without weight decay.

    A torch optimizer, not DeepSpeed's "optimizer" section (that JIT-compiles fused Adam on CPU).
    With the optimizer offloaded, the step runs on CPU tensors, where DeepSpeed accepts only its
    vectorised CPU Adam (a C++ op built once per machine with g++, then cached; see README).
    """
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.zero.offload_optimizer == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415

        return DeepSpeedCPUAdam(
            groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, adamw_mode=True
        )
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def initialize_engine(cfg: TrainConfig, built: BuiltModel, ds_config: dict[str, Any], rank: int = 0) -> Any:
    """Wrap the task module in a DeepSpeed engine with AdamW and the warmup-cosine schedule."""
    import deepspeed  # noqa: PLC0415

    task = build_task(cfg, built, rank)
    optimizer = build_optimizer(task, cfg)
    scheduler = warmup_cosine_scheduler(optimizer, cfg.optim.warmup_steps, cfg.run.max_steps, cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine
