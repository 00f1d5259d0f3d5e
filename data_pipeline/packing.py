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

from data_pipeline.collate import (
    IMAGE_GRID_THW,
    IMAGE_SIZES,
    ROW_IMAGES,
    ROW_LEARNED,
    ROW_TOKENS,
    real_token_mask,
    right_pad,
)
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
    row_ids, row_labels, row_positions = [], [], []
    pixel_values: list[Any] = []
    image_sizes: list[tuple[int, int]] = []
    image_grid_thw: list[list[int]] = []
    keys: list[str] = []
    for row in rows:
        row_ids.append([token for doc in row for token in doc.input_ids])
        # The first label of every document is ignored: no document learns the next one's first token.
        row_labels.append([label for doc in row for label in [IGNORE_INDEX, *doc.labels[1:]]])
        row_positions.append([position for doc in row for position in range(len(doc))])
        for doc in row:
            pixel_values += doc.pixel_values
            image_sizes += doc.image_sizes
            image_grid_thw += doc.image_grid_thw
            keys.append(doc.key)
    lengths = [len(ids) for ids in row_ids]
    width = max(lengths)
    # The padding tail of a row is a segment of its own: its positions restart at 0.
    row_positions = [positions + list(range(width - len(positions))) for positions in row_positions]
    labels = right_pad(row_labels, IGNORE_INDEX, width)
    batch: dict[str, Any] = {
        "input_ids": right_pad(row_ids, pad_token_id, width),
        "labels": labels,
        "attention_mask": real_token_mask(lengths, width),
        "pixel_values": stack_pixels(pixel_values) if pixel_values else torch.zeros(0),
        "keys": keys,
        ROW_TOKENS: lengths,
        ROW_IMAGES: [sum(len(doc.image_spans) for doc in row) for row in rows],
        ROW_LEARNED: (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist(),
        IMAGE_SIZES: image_sizes,
    }
    if image_grid_thw:  # images of their own grids (Qwen's native resolution): the task pools each by its grid
        batch[IMAGE_GRID_THW] = image_grid_thw
    if packed:
        batch["position_ids"] = right_pad(row_positions, 0, width)
    return batch


def non_pad_fraction(batch: dict[str, Any]) -> float:
    mask = batch["attention_mask"]
    return float(mask.sum()) / mask.numel()
