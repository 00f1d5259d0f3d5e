"""Learning-rate schedule: linear warmup, then cosine decay to a floor; continuous across extensions.

Extending a run (a resume with another `run.max_steps`, `optim.warmup_steps` or
`optim.min_lr_ratio`) never makes the lr jump. The rule, applied when the checkpoint's schedule
state is loaded at step s:

- still in warmup (s < optim.warmup_steps): the configured schedule applies as it is (the warmup
  ramp depends only on warmup_steps, so the lr at s is the same);
- after warmup: the lr continues from its value at s and follows a half cosine from there down
  to `optim.min_lr_ratio` x lr at the new `run.max_steps`.

The plan (including where such a continuation began) is part of the scheduler's state, so a later
resume of the extended run keeps following it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_from(step: int, start_step: int, start_value: float, total_steps: int, min_ratio: float) -> float:
    """Half cosine from `start_value` at `start_step` down to `min_ratio` at `total_steps`."""
    span = max(1, total_steps - start_step)
    progress = min(1.0, (step - start_step) / span)
    return min_ratio + (start_value - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
    warmup_steps: int
    total_steps: int
    min_ratio: float
    continued_at: int | None = None
    """Step where a changed schedule took over (see the module docstring); None: the plain schedule."""
    continued_from: float | None = None
    """The multiplier at `continued_at`, where the cosine continuation starts."""

    def multiplier(self, step: int) -> float:
        if self.continued_at is not None and self.continued_from is not None and step >= self.continued_at:
            return cosine_from(step, self.continued_at, self.continued_from, self.total_steps, self.min_ratio)
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_ratio)

    def same_shape(self, other: SchedulePlan) -> bool:
        return (self.warmup_steps, self.total_steps, self.min_ratio) == (
            other.warmup_steps,
            other.total_steps,
            other.min_ratio,
        )


def continue_plan(saved: SchedulePlan, configured: SchedulePlan, step: int) -> SchedulePlan:
    """The plan a resume at `step` follows: the saved one, or the configured one joined without a jump."""
    if saved.same_shape(configured):
        return saved
    if step < configured.warmup_steps and saved.continued_at is None:
        return configured
    return dataclasses.replace(configured, continued_at=step, continued_from=saved.multiplier(step))


def describe_change(saved: SchedulePlan, plan: SchedulePlan, step: int, base_lr: float) -> str:
    old = f"run.max_steps={saved.total_steps}, warmup_steps={saved.warmup_steps}, min_lr_ratio={saved.min_ratio}"
    new = f"run.max_steps={plan.total_steps}, warmup_steps={plan.warmup_steps}, min_lr_ratio={plan.min_ratio}"
    lr_now = base_lr * plan.multiplier(step)
    if plan.continued_at is None:
        how = "still in warmup: the configured schedule applies"
    else:
        how = f"lr continues from {lr_now:.3g} on a cosine to {base_lr * plan.min_ratio:.3g} at step {plan.total_steps}"
    return f"schedule: changed at step {step} ({old} -> {new}); {how}"


class WarmupCosineSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over a `SchedulePlan` whose state carries the plan, so resumes can join it smoothly."""

    def __init__(self, optimizer: torch.optim.Optimizer, plan: SchedulePlan) -> None:
        self.plan = plan
        self.change_note: str | None = None
        super().__init__(optimizer, self._multiplier)

    def _multiplier(self, step: int) -> float:
        return self.plan.multiplier(step)

    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "lr_lambdas", "plan")}
        state["plan"] = dataclasses.asdict(self.plan)
        state.pop("change_note", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        state.pop("lr_lambdas", None)
        saved = state.pop("plan", None)
        self.__dict__.update(state)
        if saved is None:  # a checkpoint from before plans were saved: the configured schedule applies
            return
        saved_plan = SchedulePlan(**saved)
        plan = continue_plan(saved_plan, self.plan, self.last_epoch)
        if not saved_plan.same_shape(self.plan):
            self.change_note = describe_change(saved_plan, plan, self.last_epoch, self.base_lrs[0])
        self.plan = plan


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> WarmupCosineSchedule:
    return WarmupCosineSchedule(optimizer, SchedulePlan(warmup_steps, total_steps, min_ratio))
