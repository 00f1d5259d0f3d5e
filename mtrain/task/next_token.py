"""The next-token loss at learned positions only: `lm_head` and cross-entropy where a target is trained.

A model's own forward applies `lm_head` to every position and its loss then ignores all but the
learned ones (answers, captions). Prompt, image and padding positions cost the full vocabulary
matmul for nothing: at 7B with Qwen's 152k vocabulary the logits of 8k positions are 5 GB in fp32.
The tasks run the language model to its last hidden state and pick the learned positions first:

    hidden (rows, width, dim) ─► positions whose next token is learned (flat, row-major) ─► (N, dim)
      ─► lm_head ─► (N, vocab) ─► fp32 cross-entropy against those next tokens ─► (N,) token losses

The token losses, and so every gradient, are those of the full logits' cross-entropy with IGNORE
targets: an ignored position adds nothing to the loss, and its logits' gradient is zero.

Sizing the selection needs the count of learned positions. The loader's batches carry it per row
(`ROW_LEARNED`, counted on the host by collate), so the step does not wait on the device; a batch
made by hand has it counted by one `nonzero` (a host sync on an accelerator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.collate import ROW_LEARNED
from data_pipeline.tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class LearnedPositions:
    """The positions of a (rows, width) batch whose next token is learned, and those tokens."""

    index: torch.Tensor  # flat positions (row * width + column), row-major
    targets: torch.Tensor  # the next token each position learns (IGNORE only on a sized selection's filler)
    width: int  # columns of the batch the index counts in

    @property
    def rows(self) -> torch.Tensor:
        """The batch row of each position."""
        return self.index // self.width

    def gather(self, per_position: torch.Tensor) -> torch.Tensor:
        """(rows, width, ...) values at the learned positions: (N, ...)."""
        return per_position.flatten(0, 1).index_select(0, self.index)


def learned_positions(labels: torch.Tensor, count: int | None = None) -> LearnedPositions:
    """Where the next-token loss of `labels` (rows, width) has a target: position t learns labels[t + 1].

    `count`: how many there are, known on the host (`learned_count`); None counts them on the device.
    """
    # The last column predicts nothing: its target is IGNORE.
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    learned = next_labels != IGNORE_INDEX
    if count is None:
        index = learned.nonzero().squeeze(1)  # sized by the device: a host sync on an accelerator
    else:
        # Sized on the host: no wait on the device. A right count leaves no filler; any would point
        # at the last position, whose target is IGNORE, and add nothing to any loss.
        index = torch.nonzero_static(learned, size=count, fill_value=learned.numel() - 1).squeeze(1)
    return LearnedPositions(index, next_labels.index_select(0, index), labels.shape[1])


def learned_count(batch: dict[str, Any], rows: Sequence[int] | None = None) -> int | None:
    """The learned targets of `rows` of the batch (default: every row; repeat a row to count it again),
    as collate counted them on the host; None for a batch made by hand."""
    per_row = batch.get(ROW_LEARNED)
    if per_row is None:
        return None
    return sum(per_row) if rows is None else sum(per_row[row] for row in rows)


def learned_logits(
    hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor], positions: LearnedPositions
) -> torch.Tensor:
    """`lm_head` at the learned positions only: (N, vocab).

    Called once per forward on every rank, with no learned position too (an empty selection): under
    ZeRO-3 every rank must gather and reduce the same modules in the same order.
    """
    return lm_head(positions.gather(hidden))


def next_token_losses(logits: torch.Tensor, positions: LearnedPositions) -> torch.Tensor:
    """Each learned position's cross-entropy: (N,), in fp32 as transformers' own loss upcasts."""
    return F.cross_entropy(logits.float(), positions.targets, ignore_index=IGNORE_INDEX, reduction="none")
