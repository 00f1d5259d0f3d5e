"""Global token normalisation's counts: what the trainer reduces before the first backward must equal
what each loss divides by (the 2-rank gradient equality is tests/distributed/test_global_batch_gradients_zero3.py)."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config import load_config
from mtrain.task.base import TokenNorm
from tests.unit.test_matryoshka_task import make_task


def caption_first_batch(built) -> dict:
    """Rows whose first token is already learned (a tokenizer without BOS), then an image, then padding."""
    tokenizer, n = built.tokenizer, built.visual_tokens
    captions = [tokenizer(text).input_ids for text in ("a red circle.", "blue.", "a green cross on white.")]
    ids = [caption + [built.image_token_id] * n for caption in captions]
    labels = [caption + [IGNORE_INDEX] * n for caption in captions]
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in ids]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
        "pixel_values": torch.randn(len(ids), 3, 32, 32, generator=torch.Generator().manual_seed(0)),
    }


@pytest.mark.parametrize("policy,layout", [("all", "packed"), ("all", "padded"), ("sample_per_sample", "packed")])
def test_counted_learned_tokens_are_the_tokens_each_scale_loss_takes(policy, layout):
    """Packed, a row's later variants follow another variant: their first token is no target, so the
    count from the loader's labels (before the layout exists) is exact."""
    task, built = make_task("m3", policy=policy, layout=layout)
    batch = caption_first_batch(built)
    task.begin_step(3, 1)
    counted = task.learned_tokens(batch)
    _, metrics = task(batch)
    torch.testing.assert_close(counted, metrics["scale_label_tokens"])
    assert counted.sum() > 0


def test_normalised_loss_times_micro_batches_sums_to_the_global_mean():
    """Two micro-batches of one rank: their losses over the summed counts, divided back by the two
    micro-batches DeepSpeed averages, equal the per-scale mean of their joined rows."""
    task, built = make_task("m3", policy="all", layout="padded")
    batch = caption_first_batch(built)
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    task.token_norm = TokenNorm(sum(task.learned_tokens(h) for h in halves), divisor=2.0)
    accumulated = sum(task(h)[0] for h in halves) / 2
    task.token_norm = None
    torch.testing.assert_close(accumulated, task(batch)[0])


def test_global_token_normalisation_is_the_default():
    assert load_config(None, []).task.token_normalisation == "global"
