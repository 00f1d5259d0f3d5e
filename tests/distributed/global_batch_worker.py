"""One real optimizer step per case under 2-rank ZeRO-3, through the Trainer, with plain SGD (lr 1, no clip).

    torchrun --nproc_per_node 2 global_batch_worker.py OUT.pt [CASE...]

Each rank feeds its own micro-batches (`rank_batches`); rank 0 saves, per case, every parameter
before the step (gathered), every trainable parameter after it and the logged loss. The update
is then minus the gradient DeepSpeed applied, to compare with one process holding the global batch.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from data_pipeline.tokenize import IGNORE_INDEX

# Learned-token counts differ widely between micro-batches and ranks (3, 169 | 83, 3): a caption of one word
# beside paragraphs, one row beside three.
SHORT, LONG = "red.", "a big red circle on a white ground, drawn twice, with a thin blue line under it. " * 2
LM_MICRO_BATCHES = {0: [[SHORT], [LONG, LONG + "again.", "a blue square."]], 1: [[LONG, SHORT], ["green."]]}
PAIR_ROWS = 8  # contrastive: each rank holds half of one global batch of pairs

COMMON = ["model.freeze.language_model=false", "model.freeze.always_train=[lm_head]",
          "zero.param_persistence_threshold=0", "optim.grad_clip=0.0", "data.micro_batch_size=2"]  # fmt: skip
CASES = {
    "lm": ["optim.grad_accum_steps=2"],
    "m3": ["optim.grad_accum_steps=2", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16,64]",
           "matryoshka.tokens.policy=all", "matryoshka.tokens.weights=[1.0,2.0,3.0,4.0]"],
    "contrastive_direct": ["task.objective=contrastive", "matryoshka.dims.dims=[8,32,64]", "task.contrastive.temperature=0.1"],
    "contrastive_gradcache": ["task.objective=contrastive", "matryoshka.dims.dims=[8,32,64]", "task.contrastive.temperature=0.1",
                              "task.contrastive.chunk_size=2"],
}  # fmt: skip


def config(case: str, *extra: str):
    from mtrain.config import load_config

    return load_config(None, [*COMMON, *CASES[case], *extra])


def caption_batch(built, captions: list[str]) -> dict[str, torch.Tensor]:
    """Rows of <bos> <image>... caption <eos>, the caption learned, right-padded."""
    tokenizer, n = built.tokenizer, built.visual_tokens
    ids, labels = [], []
    for caption in captions:
        text = tokenizer(caption).input_ids + [tokenizer.eos_token_id]
        ids.append([tokenizer.bos_token_id] + [built.image_token_id] * n + text)
        labels.append([IGNORE_INDEX] * (n + 1) + text)
    width = max(map(len, ids))
    generator = torch.Generator().manual_seed(len(captions) + sum(map(len, captions)))
    return {
        "input_ids": torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in ids]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
        "pixel_values": torch.randn(len(captions), 3, 32, 32, generator=generator),
    }


def rank_batches(case: str, built, task, rank: int) -> list[dict[str, Any]]:
    """This rank's micro-batches of the step."""
    if case.startswith("contrastive"):
        from mtrain.task.contrastive import slice_pairs
        from tests.unit.test_contrastive import make_batch

        half = PAIR_ROWS // 2
        pairs = slice_pairs(make_batch(built, rows=PAIR_ROWS), rank * half, (rank + 1) * half, task)
        return [pairs | {"keys": [str(row) for row in range(rank * half, (rank + 1) * half)]}]
    return [caption_batch(built, captions) for captions in LM_MICRO_BATCHES[rank]]


class FixedBatches:
    """The trainer's batches from a list (no loader counters, nothing to checkpoint)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = iter(batches)

    def __next__(self) -> dict[str, Any]:
        return next(self.batches)

    def metrics(self) -> dict[str, float]:
        return {}


def gathered(task: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    import deepspeed

    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad or not trainable_only]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {name: param.detach().clone() for name, param in named}


def one_step(case: str, world, extra: list[str]) -> dict[str, Any]:
    import deepspeed

    from mtrain.config.deepspeed_json import deepspeed_config
    from mtrain.engine.trainer import Trainer
    from mtrain.metrics.sinks import NullSink
    from mtrain.model.build import build_model
    from mtrain.task.registry import build_task

    cfg = config(case, *extra)
    ds_config = deepspeed_config(cfg, world.world_size, "fp32") | {"zero_allow_untested_optimizer": True}  # SGD
    built = build_model(cfg.model, torch.float32, ds_config, seed=0, tokens=cfg.matryoshka.tokens)
    task = build_task(cfg, built, world.rank)
    sgd = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1.0)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=sgd, config=ds_config)
    before = gathered(engine.module, trainable_only=False)
    batches = FixedBatches(rank_batches(case, built, task, world.rank))
    metrics = Trainer(cfg, world, engine, batches, NullSink(), "cpu").train_step(log=True)
    after = gathered(engine.module, trainable_only=True)
    engine.destroy()
    return {"before": before, "after": after, "loss": metrics["loss"]}


def main() -> None:
    from mtrain.launch.distributed import init_distributed

    out, *args = sys.argv[1:]
    cases = [a for a in args if a in CASES]
    extra = [a for a in args if a not in CASES]  # overrides for every case
    world = init_distributed("gloo", 120, 29500)
    results = {}
    for case in cases:
        started = time.perf_counter()
        results[case] = one_step(case, world, extra)
        print(f"rank {world.rank}: {case} in {time.perf_counter() - started:.1f}s", flush=True)
    if world.rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
