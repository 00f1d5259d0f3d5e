"""The lr schedule across a resume that changes run.max_steps: continuous, by the documented rule."""

from __future__ import annotations

import math

import pytest
import torch

from mtrain.engine.schedule import warmup_cosine, warmup_cosine_scheduler

PEAK, WARMUP, MIN_RATIO = 1e-3, 2, 0.1


def documented_rule(step: int, resumed_at: int, value_then: float, new_total: int) -> float:
    """README / schedule.py: a half cosine from the multiplier at the resume step to min_lr_ratio at the new end."""
    progress = min(1.0, (step - resumed_at) / (new_total - resumed_at))
    return MIN_RATIO + (value_then - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def run(total: int, steps: range, resume_from: dict | None = None) -> tuple[list[float], dict]:
    """lrs used at `steps` (0-based optimizer steps), optionally resuming a saved (optimizer, scheduler) state."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=PEAK)
    scheduler = warmup_cosine_scheduler(optimizer, WARMUP, total, MIN_RATIO)
    if resume_from is not None:
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
    lrs = []
    for _ in steps:
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr this step uses
        optimizer.step()
        scheduler.step()
    return lrs, {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "note": getattr(scheduler, "change_note", None),
    }


def test_unchanged_resume_equals_an_uninterrupted_run():
    whole, _ = run(10, range(10))
    first, state = run(10, range(6))
    rest, _ = run(10, range(6, 10), state)
    assert first + rest == whole
    assert state["note"] is None


def test_extending_max_steps_continues_the_lr_on_a_cosine_to_the_new_end():
    first, state = run(10, range(6))
    rest, after = run(20, range(6, 20), state)
    at_resume = warmup_cosine(6, WARMUP, 10, MIN_RATIO)
    # The documented rule: from the lr at the resume step, a half cosine down to min_lr_ratio at the new max_steps.
    expected = [PEAK * documented_rule(t, 6, at_resume, 20) for t in range(6, 20)]
    assert rest == pytest.approx(expected, rel=1e-12)
    assert rest[0] == pytest.approx(PEAK * at_resume)  # no jump at the resume
    lrs = first + rest
    assert max(abs(b - a) for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1 :], strict=False)) < PEAK * 0.2
    assert all(b <= a for a, b in zip(rest, rest[1:], strict=False))  # decays monotonically to the floor
    assert "changed at step 6" in after["note"] and "run.max_steps=10" in after["note"]


def test_a_second_resume_of_the_extended_run_keeps_its_plan():
    _, state = run(10, range(6))
    extended, _ = run(20, range(6, 20), state)
    part, mid = run(20, range(6, 12), state)
    rest, again = run(20, range(12, 20), mid)
    assert part + rest == extended
    assert again["note"] is None


def test_extension_during_warmup_keeps_the_configured_schedule():
    _, state = run(10, range(1))
    rest, _ = run(20, range(1, 20), state)
    assert rest == pytest.approx([PEAK * warmup_cosine(t, WARMUP, 20, MIN_RATIO) for t in range(1, 20)])
