"""The Trainer: a loop of small step methods around one DeepSpeed engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from mtrain.config.schema import TrainConfig
from mtrain.launch.env import WorldInfo
from mtrain.metrics.progress import Progress
from mtrain.metrics.sinks import MetricSink


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        world: WorldInfo,
        engine: Any,
        batches: Iterator[dict[str, Any]],
        sink: MetricSink,
        device: str,
    ) -> None:
        self.cfg = cfg
        self.world = world
        self.engine = engine
        self.batches = batches
        self.sink = sink
        self.device = device
        self.step = 0
        self.tokens_seen = 0
        self.samples_seen = 0

    # ── the loop ──────────────────────────────────────────────────────────────────────────────
    def train(self, on_step_end: Any = None) -> list[dict[str, float]]:
        """Run until `run.max_steps`; returns the logged metrics. `on_step_end(trainer)` may save."""
        history: list[dict[str, float]] = []
        progress = Progress(self.cfg.run.max_steps, self.step, self.world.is_main and self.cfg.logging.progress)
        try:
            while self.step < self.cfg.run.max_steps:
                metrics = self.train_step()
                progress.update(metrics["loss"], metrics["tokens_per_s"])
                if self.step % self.cfg.logging.log_every == 0 or self.step == self.cfg.run.max_steps:
                    self.sink.log(self.step, metrics)
                    history.append({"step": self.step, **metrics})
                if on_step_end is not None:
                    on_step_end(self)
        finally:
            progress.close()
        return history

    def train_step(self) -> dict[str, float]:
        """One optimizer step: `grad_accum_steps` micro-batches, then DeepSpeed's step."""
        started = time.perf_counter()
        lr = self.engine.get_lr()[0]  # the lr this step uses, read before the scheduler advances
        losses, tokens, samples = [], 0, 0
        for _ in range(self.cfg.optim.grad_accum_steps):
            batch = self.to_device(next(self.batches))
            loss, counts = self.forward_backward(batch)
            losses.append(loss)
            tokens += int(counts["tokens"])
            samples += batch["input_ids"].shape[0]
        grad_norm = self.engine.get_global_grad_norm()
        self.step += 1
        totals = self.all_reduce_sum(torch.tensor([sum(losses) / len(losses), tokens, samples], dtype=torch.float64))
        loss = float(totals[0]) / self.world.world_size
        self.tokens_seen += int(totals[1])
        self.samples_seen += int(totals[2])
        elapsed = time.perf_counter() - started
        return self.data_metrics() | {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": float(totals[1]),
            "tokens_per_s": float(totals[1]) / elapsed,
            "samples_per_s": float(totals[2]) / elapsed,
            "step_time_s": elapsed,
        }

    def forward_backward(self, batch: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
        """Forward through the task module, backward, and the engine's (accumulating) step."""
        loss, counts = self.engine(batch)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach()), counts

    @torch.no_grad()
    def evaluate(self, batches: Iterator[dict[str, Any]], num_batches: int) -> float:
        """Mean loss over `num_batches` batches, averaged over ranks, without updating weights."""
        self.engine.eval()
        total = 0.0
        for _ in range(num_batches):
            loss, _ = self.engine(self.to_device(next(batches)))
            total += float(loss)
        self.engine.train()
        return (
            float(self.all_reduce_sum(torch.tensor([total / num_batches], dtype=torch.float64))[0])
            / self.world.world_size
        )

    # ── helpers ───────────────────────────────────────────────────────────────────────────────
    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dtype = self.engine.module.model.dtype if hasattr(self.engine.module.model, "dtype") else None
        moved = {}
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point() and dtype is not None:
                    value = value.to(dtype)
            moved[name] = value
        return moved

    def data_metrics(self) -> dict[str, float]:
        """The loader's counters (bad samples by reason, samples, dropped), summed over ranks."""
        if not hasattr(self.batches, "metrics"):
            return {}
        local = self.batches.metrics()  # the same keys in the same order on every rank
        totals = self.all_reduce_sum(torch.tensor(list(local.values()), dtype=torch.float64))
        return dict(zip(local, totals.tolist(), strict=True))

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world.world_size > 1:
            # gloo reduces CPU tensors; nccl needs them on the GPU.
            on_device = values.to(self.device)
            dist.all_reduce(on_device)
            return on_device.cpu()
        return values

    # ── state ─────────────────────────────────────────────────────────────────────────────────
    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.samples_seen = state["samples_seen"]
