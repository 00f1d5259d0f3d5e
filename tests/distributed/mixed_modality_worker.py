"""A real `mtrain train` run (set_up, train, finish) whose ranks read chosen loaders.

    python mixed_modality_worker.py OUT.json TEXT_SHARD IMAGE_SHARD split|joined OVERRIDE...

split (2 ranks): rank 0 reads only the text-only shard, rank 1 only the image shard.
joined (1 rank, optim.grad_accum_steps=2): the same two micro-batches per step, one after the other,
the same global batch the split run makes. Both write the logged losses to OUT.json.
Every second text-only batch learns nothing (labels all IGNORE): split, the text rank then applies
lm_head to an empty selection of learned positions while the image rank's selection is not empty.

After training, each loader's next prompts are answered greedily with the engine's own module
(`mtrain.eval.generation`): split, both ranks generate at once, the text rank's answers ending after
2 tokens and the image rank's after 6, so the text rank must keep stepping with the other (ZeRO-3
gathers each layer's parameters from both ranks in every forward). The answers go to OUT.json too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mtrain.config import load_config
from mtrain.engine.run import finish, set_up, train
from tests.data_factory import make_loader

REPO = Path(__file__).resolve().parents[2]


def nothing_learned(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with every label IGNORE, and collate's host count of learned targets to match."""
    from data_pipeline.collate import ROW_LEARNED
    from data_pipeline.tokenize import IGNORE_INDEX

    rows = batch["labels"].shape[0]
    return {**batch, "labels": batch["labels"].clone().fill_(IGNORE_INDEX), ROW_LEARNED: [0] * rows}


class TakeTurns:
    """Batches from each loader in turn: a `Batches` for the trainer (no counters, no checkpoint state)."""

    def __init__(self, loaders: list[Any], names: list[str]) -> None:
        self.loaders = loaders
        self.names = names
        self.turn = 0
        self.taken = dict.fromkeys(names, 0)

    def __iter__(self) -> TakeTurns:
        return self

    def __next__(self) -> dict[str, Any]:
        name = self.names[self.turn % len(self.loaders)]
        batch = next(self.loaders[self.turn % len(self.loaders)])
        self.turn += 1
        self.taken[name] += 1
        return nothing_learned(batch) if name == "text" and self.taken[name] % 2 == 0 else batch

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
    run.trainer.batches = TakeTurns([loader[name]() for name in order], order)
    history = train(run)
    started = time.perf_counter()
    answers = answer_next_prompts(run, order, run.trainer.batches.loaders)
    print(f"answered in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    gathered = [answers]
    if run.world.world_size > 1:
        import torch.distributed as dist

        gathered = [None] * run.world.world_size
        dist.all_gather_object(gathered, answers)
    finish(run, history)
    if run.world.is_main:
        answered = {name: rows for part in gathered for name, rows in part.items()}
        Path(out).write_text(json.dumps({"losses": [m["loss"] for m in history], "answers": answered}))


MAX_NEW_TOKENS = {"text": 2, "image": 6}  # answers that end at different lengths on the two ranks


def answer_next_prompts(run: Any, names: list[str], loaders: list[Any]) -> dict[str, list[list[int]]]:
    """The greedy answers (new tokens) to the first two prompts of each loader's next batch, at 4 visual tokens
    (the full grid without scales)."""
    from mtrain.eval.generation import answer_batch, answer_prompts, generation_model
    from mtrain.eval.in_loop import evaluation_mode
    from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    module = run.engine.module
    scale = 4 if run.cfg.matryoshka.tokens.mode != "none" else None
    answers = {}
    with evaluation_mode(module):
        model = generation_model(run.cfg, module, getattr(module, "routing", None))
        for name, loader in zip(names, loaders, strict=True):
            image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            prompts = answer_prompts(next(loader), image_token, 64, tokenizer.pad_token_id, rows=2)
            inputs = run.trainer.to_device(prompts.inputs)
            synced = run.world.world_size > 1
            answers[name] = answer_batch(model, inputs, scale, tokenizer, MAX_NEW_TOKENS[name], synced)
    return answers


if __name__ == "__main__":
    main()
