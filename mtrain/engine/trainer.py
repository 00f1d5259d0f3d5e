"""The Trainer: a loop of small step methods around one DeepSpeed engine."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
import torch.distributed as dist

from mtrain.config.schema import TrainConfig
from mtrain.engine.data import Batches
from mtrain.launch.env import WorldInfo
from mtrain.metrics.flops import trainer_flops_per_token
from mtrain.metrics.progress import Progress
from mtrain.metrics.sinks import MetricSink
from mtrain.task.base import Task, TokenNorm


@dataclass
class Accumulated:
    """One step's micro-batches, summed on the device: losses, the task's metrics, samples, time waiting for data."""

    losses: list[torch.Tensor] = field(default_factory=list)
    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0
    data_wait_s: float = 0.0
    keys: list[str] = field(default_factory=list)  # the samples' keys, to name them if the step goes non-finite

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], samples: int, keys: list[str]) -> None:
        self.losses.append(loss)
        self.samples += samples
        self.keys += keys
        for name, value in metrics.items():
            value = torch.as_tensor(value).detach()
            self.totals[name] = self.totals[name] + value if name in self.totals else value


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite."""


def nan_loss_injected(step: int) -> bool:
    """`MTRAIN_FAULT_INJECT=nan_loss@STEP` makes that step's loss NaN (tests of the non-finite check only)."""
    name, _, at_step = os.environ.get("MTRAIN_FAULT_INJECT", "").partition("@")
    return name == "nan_loss" and at_step.isdigit() and int(at_step) == step


@dataclass
class Unchecked:
    """A step not yet checked for a non-finite loss or gradient norm: its flag stays on the device until read."""

    step: int
    nonfinite: torch.Tensor
    keys: list[str]


def batch_to_device(batch: dict[str, Any], device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to `device`, floating-point ones (pixels) in `dtype`; host lists stay (training and `mtrain eval`)."""
    moved = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        moved[name] = value
    return moved


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        world: WorldInfo,
        engine: Any,
        batches: Batches,
        sink: MetricSink,
        device: str,
    ) -> None:
        self.cfg = cfg
        self.world = world
        self.engine = engine
        self.batches = batches
        self.task: Task = engine.module
        self.sink = sink
        self.device = device
        self.step = 0
        self.tokens_seen = 0
        self.samples_seen = 0
        # This rank's tokens and samples since the last reduce over ranks (steps that log nothing).
        self.unreduced = self.zero_counts()
        # Steps whose non-finite flag is not read yet: read together on log steps and before saves.
        self.unchecked: list[Unchecked] = []
        self.nonfinite_skipped = 0
        # Model FLOPs per counted token, for the logged TFLOPs and MFU (see mtrain/metrics/flops.py).
        self.flops_per_token = trainer_flops_per_token(cfg, engine.module)
        self.process = psutil.Process()  # this rank's, for the logged memory

    # ── the loop ──────────────────────────────────────────────────────────────────────────────
    def train(self, on_step_end: Callable[[Trainer], None] | None = None) -> list[dict[str, float]]:
        """Run until `run.max_steps`; returns the logged metrics. `on_step_end(trainer)` may save."""
        history: list[dict[str, float]] = []
        progress = Progress(self.cfg.run.max_steps, self.step, self.world.is_main and self.cfg.logging.progress)
        try:
            while self.step < self.cfg.run.max_steps:
                metrics = self.train_step(log=self.is_log_step(self.step + 1))
                progress.update(metrics)
                if metrics is not None:
                    self.sink.log(self.step, metrics)
                    history.append({"step": self.step, **metrics})
                if on_step_end is not None:
                    on_step_end(self)
        finally:
            progress.close()
        return history

    def is_log_step(self, step: int) -> bool:
        return step % self.cfg.logging.log_every == 0 or step == self.cfg.run.max_steps

    def train_step(self, log: bool = True) -> dict[str, float] | None:
        """One optimizer step: `grad_accum_steps` micro-batches, then DeepSpeed's step.

        Returns this step's metrics, reduced over ranks, when `log`; otherwise None. Steps that are
        not logged make no collective and no host sync of their own beyond the token count of the
        loss (`step_token_norm`): their token and sample counts and non-finite flags wait on the
        device until the next log step reduces them all in one collective (`step_metrics`).
        """
        started = time.perf_counter()
        lr = self.engine.get_lr()[0]  # the lr this step uses, read before the scheduler advances
        accumulated = self.accumulate()
        self.step += 1
        self.count_unreduced(accumulated)
        self.unchecked.append(Unchecked(self.step, self.nonfinite_flag(accumulated), accumulated.keys))
        if not log:
            return None
        return self.step_metrics(accumulated, lr, started)

    def nonfinite_flag(self, accumulated: Accumulated) -> torch.Tensor:
        """1 when a micro-batch loss or the step's gradient norm is NaN or infinite; computed on the device, not read."""
        losses = torch.stack(accumulated.losses).float()
        flag = (~torch.isfinite(losses)).any()
        grad_norm = self.engine.get_global_grad_norm()  # a device tensor (or DeepSpeed's float inf on overflow)
        if grad_norm is not None:
            flag = flag | ~torch.isfinite(torch.as_tensor(grad_norm).to(losses.device, torch.float32))
        return flag.to(torch.float64)

    def check_finite(self) -> None:
        """Read the flags of the steps since the last check (one read, one collective); every rank calls it.

        Saves call it; log steps reduce the flags with the step's metrics instead (`step_metrics`).
        """
        if self.unchecked:
            self.settle_nonfinite(self.all_reduce_sum(self.take_unchecked()))

    def take_unchecked(self) -> torch.Tensor:
        """This rank's flags of the unchecked steps, one per step, on the host (the read), to sum over ranks."""
        return torch.stack([u.nonfinite for u in self.unchecked]).cpu()

    def settle_nonfinite(self, flags: torch.Tensor) -> None:
        """Act on the unchecked steps' flags summed over ranks, then forget those steps.

        `run.nonfinite=stop` raises, naming the first bad step and this rank's samples of it.
        `skip` counts it: under ZeRO-3 DeepSpeed has not applied a step whose gradient norm was
        non-finite, so the weights stay finite.
        """
        bad = [u for u, flag in zip(self.unchecked, flags.tolist(), strict=True) if flag > 0]
        self.unchecked = []
        if not bad:
            return
        if self.cfg.run.nonfinite == "skip":
            self.nonfinite_skipped += len(bad)
            print(
                f"mtrain: skipped {len(bad)} step(s) with a non-finite loss or gradient norm: {[u.step for u in bad]}"
            )
            return
        first = bad[0]
        raise NonFiniteError(
            f"non-finite loss or gradient norm at step {first.step} (rank {self.world.rank}'s samples: "
            f"{', '.join(first.keys[:16])}); lower optim.lr, check those samples, or set run.nonfinite=skip"
        )

    def accumulate(self) -> Accumulated:
        """Every micro-batch of the step: fetch all, count their tokens, then move, forward and backward each;
        losses and metrics summed on the device."""
        accumulated = Accumulated()
        fetch_started = time.perf_counter()
        raw_batches = [next(self.batches) for _ in range(self.cfg.optim.grad_accum_steps)]  # host tensors
        accumulated.data_wait_s = time.perf_counter() - fetch_started
        self.task.token_norm = self.step_token_norm(raw_batches)
        try:
            for micro_batch, raw_batch in enumerate(raw_batches):
                self.task.begin_step(self.step, micro_batch)  # draws keyed by (seed, step, micro-batch), ranks alike
                batch = self.to_device(raw_batch)
                loss, metrics = self.forward_backward(batch)
                keys = list(batch.get("keys", []))
                accumulated.add(loss, metrics, samples=len(keys) or batch["input_ids"].shape[0], keys=keys)
        finally:
            self.task.token_norm = None  # evaluation and anything outside a step take each batch's own mean
        return accumulated

    def step_token_norm(self, raw_batches: list[dict[str, Any]]) -> TokenNorm | None:
        """The step's learned tokens over every micro-batch and rank: one all-reduce before the first backward.

        Counted on the loader's host tensors and reduced on the device without a read back, so the
        step waits on no device work. The returned losses then log as the step's true token mean
        (`step_metrics` averages them over micro-batches and ranks: the divisor cancels).
        """
        if self.cfg.task.token_normalisation != "global":
            return None
        counts = []
        for micro_batch, raw_batch in enumerate(raw_batches):
            self.task.begin_step(self.step, micro_batch)  # the draws decide the scale each token trains at
            count = self.task.learned_tokens(raw_batch)
            if count is None:
                return None
            counts.append(count)
        total = torch.stack(counts).sum(0).to(self.device, torch.float64)
        if self.world.world_size > 1:
            dist.all_reduce(total)
        divisor = self.engine.gradient_accumulation_steps() * self.engine.dp_world_size
        return TokenNorm(total.float(), float(divisor))

    def count_unreduced(self, accumulated: Accumulated) -> None:
        """This rank's tokens and samples, kept on the device until the next reduce."""
        self.unreduced["tokens"] += accumulated.totals["tokens"].to(self.unreduced["tokens"].device, torch.float64)
        self.unreduced["samples"] += accumulated.samples

    def step_metrics(self, accumulated: Accumulated, lr: float, started: float) -> dict[str, float]:
        """The step's loggable metrics: one all-reduce of every sum and of the non-finite flags of the
        steps since the last check (acted on first: `stop` raises before anything is logged), then the
        task's own summary."""
        totals = {name: value.to("cpu", torch.float64) for name, value in accumulated.totals.items()}
        totals["samples"] = torch.tensor(accumulated.samples, dtype=torch.float64)
        totals["loss"] = (sum(accumulated.losses) / len(accumulated.losses)).to("cpu", torch.float64)
        totals["data_wait_s"] = torch.tensor(accumulated.data_wait_s, dtype=torch.float64)
        data_counters = self.data_counters()
        unchecked = {"nonfinite_flags": self.take_unchecked()}  # this step's at least: never empty here
        totals = self.all_reduce_sums(totals | data_counters | self.take_unreduced() | unchecked)  # one collective
        self.settle_nonfinite(totals.pop("nonfinite_flags"))
        self.add_counted(totals)
        elapsed = time.perf_counter() - started
        grad_norm = self.engine.get_global_grad_norm()
        tokens, samples = float(totals["tokens"]), float(totals["samples"])
        metrics = {name: float(totals[name]) for name in data_counters} | {
            "loss": float(totals["loss"]) / self.world.world_size,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "step_time_s": elapsed,
            "nonfinite_steps_skipped": float(self.nonfinite_skipped),
            # Mean over ranks of the time spent inside next(batches), as a share of the step.
            "data_wait_frac": float(totals["data_wait_s"]) / self.world.world_size / elapsed,
            **self.resource_metrics(tokens, elapsed),
        }
        return metrics | self.task.summarize(totals)

    def forward_backward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task's forward and backward through the engine (GradCache runs several), then the engine's
        (accumulating) step."""
        forward = self.engine
        if nan_loss_injected(self.step + 1):
            forward = lambda b: (lambda loss, metrics: (loss * float("nan"), metrics))(*self.engine(b))  # noqa: E731
        loss, metrics = self.task.forward_backward(batch, forward=forward, backward=self.engine.backward)
        self.engine.step()
        # Kept on the device: a float() here would wait for the step on a GPU every micro-batch.
        return loss.detach(), metrics

    # ── evaluation ────────────────────────────────────────────────────────────────────────────
    @torch.no_grad()
    def resource_metrics(self, tokens: float, elapsed: float) -> dict[str, float]:
        """This process's memory, and model TFLOPs per rank (MFU when `logging.peak_tflops` is set)."""
        metrics = {"memory/rss_gb": self.process.memory_info().rss / 2**30}
        if self.device == "cuda":
            metrics["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        tflops = tokens * self.flops_per_token / elapsed / self.world.world_size / 1e12
        metrics["tflops_per_rank"] = tflops
        if self.cfg.logging.peak_tflops:
            metrics["mfu"] = tflops / self.cfg.logging.peak_tflops
        return metrics

    # ── helpers ───────────────────────────────────────────────────────────────────────────────
    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tensors to this rank's device, floating-point ones (pixels) in the model's dtype; host lists stay."""
        return batch_to_device(batch, self.device, self.task.input_dtype)

    def all_reduce_sums(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum every named tensor over ranks with one collective (names and shapes agree across ranks)."""
        names = sorted(totals)
        flat = self.all_reduce_sum(torch.cat([totals[n].reshape(-1) for n in names]))
        out, offset = {}, 0
        for name in names:
            size = totals[name].numel()
            out[name] = flat[offset : offset + size].reshape(totals[name].shape)
            offset += size
        return out

    def data_counters(self) -> dict[str, torch.Tensor]:
        """The loader's counters (bad samples by reason, samples, dropped), to be summed over ranks."""
        # The same keys on every rank: all_reduce_sums orders them by name.
        return {name: torch.tensor(value, dtype=torch.float64) for name, value in self.batches.metrics().items()}

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world.world_size > 1:
            # gloo reduces CPU tensors; nccl needs them on the GPU.
            on_device = values.to(self.device)
            dist.all_reduce(on_device)
            return on_device.cpu()
        return values

    def zero_counts(self) -> dict[str, torch.Tensor]:
        return {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in ("tokens", "samples")}

    def take_unreduced(self) -> dict[str, torch.Tensor]:
        """This rank's counts since the last reduce, named for `add_counted`, and reset to zero."""
        taken = {f"unreduced_{name}": value.cpu() for name, value in self.unreduced.items()}
        self.unreduced = self.zero_counts()
        return taken

    def add_counted(self, reduced: dict[str, torch.Tensor]) -> None:
        self.tokens_seen += int(reduced["unreduced_tokens"])
        self.samples_seen += int(reduced["unreduced_samples"])

    # ── state ─────────────────────────────────────────────────────────────────────────────────
    def state_dict(self) -> dict[str, int]:
        """Step and global token and sample counts. A collective: every rank calls it (saves are collective)."""
        self.add_counted(self.all_reduce_sums(self.take_unreduced()))
        return {"step": self.step, "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.samples_seen = state["samples_seen"]
