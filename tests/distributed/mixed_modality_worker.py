"""A real `mtrain train` run (set_up, train, finish) whose ranks read chosen loaders.

    python mixed_modality_worker.py OUT.json TEXT_SHARD IMAGE_SHARD split|joined OVERRIDE...

split (2 ranks): rank 0 reads only the text-only shard, rank 1 only the image shard.
joined (1 rank, optim.grad_accum_steps=2): the same two micro-batches per step, one after the other,
the same global batch the split run makes. Both write the logged losses to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mtrain.config import load_config
from mtrain.engine.run import finish, set_up, train
from tests.data_factory import make_loader

REPO = Path(__file__).resolve().parents[2]


class TakeTurns:
    """Batches from each loader in turn: a `Batches` for the trainer (no counters, no checkpoint state)."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders
        self.turn = 0

    def __iter__(self) -> TakeTurns:
        return self

    def __next__(self) -> dict[str, Any]:
        loader = self.loaders[self.turn % len(self.loaders)]
        self.turn += 1
        return next(loader)

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, all_ranks: list[dict[str, Any]]) -> None:
        """Nothing to restore: these runs never resume."""


def main() -> None:
    out, text_shard, image_shard, role, *overrides = sys.argv[1:]
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    run = set_up(cfg)
    loader = {"text": lambda: make_loader(text_shard), "image": lambda: make_loader(image_shard)}
    order = ["text", "image"] if role == "joined" else [["text", "image"][run.world.rank]]
    run.trainer.batches = TakeTurns([loader[name]() for name in order])
    history = train(run)
    finish(run, history)
    if run.world.is_main:
        Path(out).write_text(json.dumps([m["loss"] for m in history]))


if __name__ == "__main__":
    main()
