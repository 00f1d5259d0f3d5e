"""Random draws of Matryoshka structure: visual-token scales, MQT's m, 2DMSE's (layer, dim).

Every draw is a pure function of (seed, step, micro-batch, stream): the references draw per forward,
so each accumulated micro-batch gets its own draw; no rank enters the key, so every rank draws
alike. Nothing is stateful, so restoring the step on resume
restores every later draw bit-exactly.
"""

from __future__ import annotations

import hashlib
import random

import torch


def draw_seed(seed: int, step: int, micro_batch: int, stream: str) -> int:
    """A 63-bit seed from the draw's key; a hash, so neighbouring keys never share a stream."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro_batch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_generator(seed: int, step: int, micro_batch: int, stream: str) -> torch.Generator:
    """A CPU torch generator for one draw (CPU: the draw never waits on an accelerator)."""
    return torch.Generator().manual_seed(draw_seed(seed, step, micro_batch, stream))


def draw_random(seed: int, step: int, micro_batch: int, stream: str) -> random.Random:
    """A Python RNG for one draw, for choices over small lists."""
    return random.Random(draw_seed(seed, step, micro_batch, stream))


def mqt_even_budgets(num_queries: int) -> list[int]:
    """MQT-LLaVA's budgets: every even m from 2 to M (`get_matry_n` draws uniformly among them)."""
    return list(range(2, num_queries + 1, 2))


class ScaleSampler:
    """Which visual-token scales a micro-batch uses; the same on every rank (ZeRO-3 needs ranks to
    run the same modules)."""

    def __init__(self, scales: list[int], policy: str, seed: int) -> None:
        self.scales = list(scales)
        self.policy = policy
        self.seed = seed

    def step_scale(self, step: int, micro_batch: int = 0) -> int:
        """The one scale of a `sample_per_step` micro-batch, identical on every rank."""
        draw = draw_generator(self.seed, step, micro_batch, "scale")
        return self.scales[int(torch.randint(len(self.scales), (1,), generator=draw))]

    def row_scales(self, step: int, rows: int, micro_batch: int = 0) -> list[int]:
        """One scale per sample (`sample_per_sample`). Row i gets the same draw on every rank: the ranks'
        samples differ, so each sample still gets its own uniform scale, and every rank runs the same
        set of scales (the same modules, under ZeRO-3)."""
        draw = draw_generator(self.seed, step, micro_batch, "rows")
        return [self.scales[int(i)] for i in torch.randint(len(self.scales), (rows,), generator=draw)]

    def state_dict(self) -> dict[str, object]:
        # Stateless by construction: the draw is a function of (seed, step, micro-batch); kept for checkpoints.
        return {"scales": self.scales, "policy": self.policy, "seed": self.seed}


DRAW_SLOTS = 64  # micro-batches per step the rank-spread metric tells apart (more wrap around)


def draw_slots(
    name: str, value: float, micro_batch: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """One micro-batch's draw as metrics: summed over micro-batches and ranks, each micro-batch's slot
    holds the sum and the sum of squares of the ranks' draws, so `rank_spread` can compare the ranks.
    Made on `device` (the step's data device) so the trainer sums them with no copy."""
    slot = torch.zeros(DRAW_SLOTS, dtype=torch.float64, device=device)
    slot[micro_batch % DRAW_SLOTS] = 1.0
    return {f"{name}_slots": slot * value, f"{name}_sq_slots": slot * value**2, f"{name}_count_slots": slot}


def rank_spread(totals: dict[str, torch.Tensor], name: str) -> float:
    """Variance over ranks of each micro-batch's draw, summed over micro-batches: 0 when every rank drew alike."""
    count = totals[f"{name}_count_slots"]
    present = count > 0
    mean = totals[f"{name}_slots"][present] / count[present]
    variance = totals[f"{name}_sq_slots"][present] / count[present] - mean**2
    return float(variance.clamp(min=0).sum())
