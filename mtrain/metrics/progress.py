"""Rank-0 progress bar with loss, tokens/s and ETA (tqdm)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total_steps: int, initial_step: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            disable=not enabled,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def update(self, metrics: dict[str, float] | None) -> None:
        """Advance one step; loss and tokens/s change on logged steps (`metrics`), the only ones reduced."""
        if metrics is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
