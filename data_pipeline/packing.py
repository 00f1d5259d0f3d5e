"""Packing documents into rows of `max_len`, and collating rows into a batch.

A row holds one or more whole documents (a document is never split, so neither is an image's
run of tokens). Position ids restart at 0 for every document, and the padding tail is a
segment of its own. Packed batches carry `position_ids` and no attention mask: transformers
(5.x, `masking_utils.find_packed_sequence_indices`) then builds a block-diagonal causal mask
from the position ids for sdpa, eager and flex attention alike, and flash-attention uses the
same position ids as varlen boundaries. So attention never crosses documents -- provided the
forward runs with `use_cache=False`: with a KV cache transformers skips that detection and
attends across documents (the task module passes it; tests/unit/test_packing_and_tokenize.py). The first label
of every document is ignored, so no document learns to predict the next one's first token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from data_pipeline.tokenize import IGNORE_INDEX, TokenizedSample

Row = list[TokenizedSample]


def take_row(buffer: list[TokenizedSample], max_len: int) -> Row:
    """First-fit decreasing over the buffer: the longest document, then the longest that still fits."""
    first = max(range(len(buffer)), key=lambda i: (len(buffer[i]), -i))
    row = [buffer.pop(first)]
    space = max_len - len(row[0])
    while space > 0:
        fits = [i for i, doc in enumerate(buffer) if len(doc) <= space]
        if not fits:
            break
        best = max(fits, key=lambda i: (len(buffer[i]), -i))
        space -= len(buffer[best])
        row.append(buffer.pop(best))
    return row


def collate_rows(
    rows: list[Row], pad_token_id: int, packed: bool, stack_pixels: Callable[[list], torch.Tensor] = torch.stack
) -> dict[str, Any]:
    """Right-pad rows to the longest; every image tensor of the batch in row-major order."""
    length = max(sum(len(doc) for doc in row) for row in rows)
    batch_size = len(rows)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    position_ids = torch.zeros((batch_size, length), dtype=torch.long)
    document_ids = torch.full((batch_size, length), -1, dtype=torch.long)
    pixel_values: list[Any] = []
    keys: list[str] = []
    doc_number = 0
    for r, row in enumerate(rows):
        start = 0
        for doc in row:
            end = start + len(doc)
            input_ids[r, start:end] = torch.tensor(doc.input_ids)
            doc_labels = torch.tensor(doc.labels)
            doc_labels[0] = IGNORE_INDEX
            labels[r, start:end] = doc_labels
            attention_mask[r, start:end] = 1
            position_ids[r, start:end] = torch.arange(len(doc))
            document_ids[r, start:end] = doc_number
            doc_number += 1
            pixel_values += doc.pixel_values
            keys.append(doc.key)
            start = end
        position_ids[r, start:] = torch.arange(length - start)  # the padding tail: a segment of its own
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": stack_pixels(pixel_values) if pixel_values else torch.zeros(0),
        "document_ids": document_ids,
        "keys": keys,
    }
    if packed:
        batch["position_ids"] = position_ids
    return batch


def non_pad_fraction(batch: dict[str, Any]) -> float:
    mask = batch["attention_mask"]
    return float(mask.sum()) / mask.numel()
