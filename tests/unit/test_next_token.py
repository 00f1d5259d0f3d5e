"""lm_head and the cross-entropy at learned positions only (mtrain/task/next_token.py) equal the full logits'.

The tasks no longer compute logits where nothing is learned (prompt, image, padding positions): the
token losses, the loss and every gradient must still be those of the full logits' cross-entropy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.collate import ROW_LEARNED
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.task.base import TokenNorm
from mtrain.task.next_token import LearnedPositions, learned_count, learned_logits, learned_positions, next_token_losses
from tests.unit.test_device_true import OBJECTIVES, build, packed_batch

VOCAB, DIM = 50, 16


def labels_with_gaps() -> torch.Tensor:
    """(3, 9) labels: a prompt, answers and padding (IGNORE), a row learning its last column, a row learning nothing."""
    ignore = IGNORE_INDEX
    return torch.tensor([
        [ignore, ignore, 5, 7, ignore, 9, 11, ignore, ignore],
        [ignore, 3, 4, ignore, ignore, ignore, ignore, 8, 2],
        [ignore] * 9,
    ])  # fmt: skip


def full_logits_losses(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """The reference: lm_head at every position, then cross-entropy against the shifted labels (rows, width - 1)."""
    logits = head(hidden)
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


@pytest.mark.parametrize("sized_on_host", [True, False])
def test_token_losses_and_gradients_equal_the_full_logits(sized_on_host):
    torch.manual_seed(0)
    labels = labels_with_gaps()
    hidden = torch.randn(*labels.shape, DIM, requires_grad=True)
    head = torch.nn.Linear(DIM, VOCAB, bias=False)
    learned = labels[:, 1:] != IGNORE_INDEX
    count = int(learned.sum()) if sized_on_host else None

    positions = learned_positions(labels, count)
    losses = next_token_losses(learned_logits(hidden, head, positions), positions)
    full = full_logits_losses(hidden, head, labels)
    # The same tokens, in row-major order, with the same values: a shift off by one, or a target
    # taken from the wrong row, changes them.
    assert positions.rows.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    torch.testing.assert_close(losses, full[learned], rtol=1e-6, atol=1e-6)

    (ours_hidden, ours_head) = torch.autograd.grad(losses.sum(), (hidden, head.weight))
    (full_hidden, full_head) = torch.autograd.grad(full.sum(), (hidden, head.weight))
    torch.testing.assert_close(ours_hidden, full_hidden, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_head, full_head, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(ours_hidden[2]) == 0  # nothing learned in row 2: no gradient reaches it


def test_nothing_learned_still_calls_lm_head_once_with_a_zero_gradient():
    """An empty selection: every ZeRO-3 rank must still gather and reduce lm_head once per forward."""
    labels = torch.full((2, 5), IGNORE_INDEX)
    hidden = torch.randn(2, 5, DIM, requires_grad=True)
    head = torch.nn.Linear(DIM, VOCAB, bias=False)
    calls = []
    head.register_forward_hook(lambda *_: calls.append("forward"))
    head.weight.register_hook(lambda grad: calls.append("backward") or grad)
    positions = learned_positions(labels, count=0)
    loss = next_token_losses(learned_logits(hidden, head, positions), positions).sum()
    loss.backward()
    assert calls == ["forward", "backward"] and loss.item() == 0
    assert torch.count_nonzero(head.weight.grad) == 0


def test_collates_count_is_the_shifted_labels_and_sizes_every_variant():
    cfg, built, task = build(OBJECTIVES["lm_packed"])
    batch = packed_batch(built)
    per_row = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert batch[ROW_LEARNED] == per_row.tolist() and sum(batch[ROW_LEARNED]) > 0
    assert learned_count(batch) == int(per_row.sum())
    assert learned_count(batch, [1, 0, 1]) == int(per_row[1] * 2 + per_row[0])  # a row at two scales counts twice
    assert learned_count({k: v for k, v in batch.items() if k != ROW_LEARNED}) is None


@pytest.mark.parametrize("objective", ["lm_packed", "m3_all_scales_mss_lora", "mqt"])
def test_the_tasks_loss_and_gradients_equal_the_full_logits_path(objective):
    """Each task's loss over the learned positions equals its loss from every position's logits."""
    cfg, built, task = build(OBJECTIVES[objective])
    batch = packed_batch(built)
    counts = task.learned_tokens(batch)
    task.token_norm = TokenNorm(counts, divisor=1.0)
    loss, _ = task(batch)
    ours = torch.autograd.grad(loss, [p for p in task.parameters() if p.requires_grad], allow_unused=True)

    if objective == "lm_packed":  # the stock model's own loss, lm_head at every position
        inputs = {k: batch[k] for k in ("input_ids", "labels", "pixel_values", "position_ids")}
        reference = task.model(**inputs, use_cache=False, num_items_in_batch=counts[0]).loss
    else:  # the task's own logits at every position (`run`), every position's loss combined the same way
        logits, layout = task.run(batch, task.variant_scales(batch["input_ids"].shape[0]))
        every = LearnedPositions(
            torch.arange(layout.labels.numel()),
            F.pad(layout.labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten(),
            layout.labels.shape[1],
        )
        reference, _ = task.combine(next_token_losses(logits.flatten(0, 1), every), layout, every)
    theirs = torch.autograd.grad(reference, [p for p in task.parameters() if p.requires_grad], allow_unused=True)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for mine, full in zip(ours, theirs, strict=True):
        assert (mine is None) == (full is None)
        if mine is not None:
            torch.testing.assert_close(mine, full, rtol=1e-4, atol=1e-6)
