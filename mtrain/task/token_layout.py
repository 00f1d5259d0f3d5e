"""Matryoshka token layout: the loader's batch, every image shrunk to a scale, laid out for one LM pass.

    batch (rows, width): every <image> expanded to the full `visual_tokens` grid,
          plus ROW_TOKENS / ROW_IMAGES (host lists, from collate)
      ─► variants: (row, scale) pairs; each one's length is known on the host
      ─► packed: a row's variants side by side in one output row (attention block-diagonal)
         padded: one output row per variant, right-padded
      ─► per scale, on the data's device: keep-mask ─► scatter the kept tokens to their columns
         (images of their own counts, `ImageGrids`: each image keeps its own first tokens)

Every size is computed on the host from the row counts, and every tensor is made on the device
of the batch, so a step neither mixes devices nor waits for the device. The kept tokens go to
their columns by one scatter per scale; dropped tokens go to a spare last column, cut off after.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.collate import ROW_IMAGES, ROW_TOKENS
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.model.token_scales import image_keep_mask, per_image_keep_mask


def shrink_image_runs(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    visual_tokens: int,
    keep: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the first `keep` of every run of `visual_tokens` image tokens, drop the rest, re-pad right.

    A row-per-sample view of one scale (evaluation references); the training step uses `lay_out`.
    """
    if keep == visual_tokens:
        return input_ids, labels, attention_mask
    kept = image_keep_mask(input_ids, attention_mask, image_token_id, visual_tokens, keep)
    kept_so_far = torch.cumsum(kept.long(), dim=1)
    width = int(kept_so_far[:, -1].max())  # one read for the whole batch, to size the result
    columns = torch.where(kept, kept_so_far - 1, width)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(columns)
    shape = (input_ids.shape[0], width + 1)  # the last column takes the dropped tokens
    new_ids = input_ids.new_full(shape, pad_token_id).index_put_((rows, columns), input_ids)
    new_labels = labels.new_full(shape, IGNORE_INDEX).index_put_((rows, columns), labels)
    new_mask = attention_mask.new_zeros(shape).index_put_((rows, columns), torch.ones_like(attention_mask))
    return new_ids[:, :width], new_labels[:, :width], new_mask[:, :width]


@dataclass(frozen=True)
class Variant:
    """One sample at one scale: where it sits in the layout and how many tokens it has."""

    row: int  # the input row
    scale: int  # visual tokens per image
    length: int  # real tokens after shrinking
    out_row: int  # the layout row it goes to
    offset: int  # its first column there


@dataclass(frozen=True)
class ImageGrids:
    """Token counts of a batch whose images each have their own count (Qwen's native resolution: their own
    grids; anyres: their own sizes), every list in the batch's image (pixel-value) order; every other batch
    has one count per scale."""

    full: list[int]  # tokens each image has in the batch's input_ids
    kept: dict[int, list[int]]  # scale -> tokens each image keeps at it
    # scale -> each image's pooled `image_grid_thw` row (t, h / f, w / f) in patches, what get_rope_index reads;
    # None for images without a grid of their own (anyres sizes: 1-D positions)
    pooled_thw: dict[int, list[list[int]]] | None = None

    def of_row(self, images: list[int], row: int) -> range:
        """The batch's image indices of input row `row` (`images`: images per row)."""
        first = sum(images[:row])
        return range(first, first + images[row])


@dataclass
class Layout:
    """Variants arranged into the language model's batch."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None when packed: transformers derives the mask from position ids
    token_scales: torch.Tensor  # scale of each token's variant; 0 on padding
    variants: list[Variant]  # in layout order: row-major over the output
    # Per-image grids (Qwen's native resolution): every image's pooled `image_grid_thw` row in layout order
    # (the order its tokens appear, row-major); None when every image has the model's one grid.
    image_grids: list[list[int]] | None = None


def real_tokens(batch: dict[str, Any], pad_token_id: int) -> torch.Tensor:
    """1 on real tokens, 0 on padding (hand-made batches without a mask: pad ids mark padding)."""
    if "attention_mask" in batch:
        return batch["attention_mask"]
    return (batch["input_ids"] != pad_token_id).long()


def row_counts(
    batch: dict[str, Any], image_token_id: int, visual_tokens: int, pad_token_id: int, prefix: str = ""
) -> tuple[list[int], list[int]]:
    """(real tokens, images) of every row: from collate's lists, else read once from the batch."""
    if f"{prefix}{ROW_TOKENS}" in batch:
        return list(batch[f"{prefix}{ROW_TOKENS}"]), list(batch[f"{prefix}{ROW_IMAGES}"])
    # A batch made by hand: one read of the whole batch (a host sync), never one per row.
    input_ids = batch[f"{prefix}input_ids"]
    mask = batch[f"{prefix}attention_mask"] if f"{prefix}attention_mask" in batch else input_ids != pad_token_id
    counts = torch.stack([mask.long().sum(1), (input_ids == image_token_id).sum(1) // visual_tokens]).tolist()
    return counts[0], counts[1]


def place_variants(
    variant_scales: list[int],
    tokens: list[int],
    images: list[int],
    visual_tokens: int,
    packed: bool,
    kept: Mapping[int, int] | None = None,
    grids: ImageGrids | None = None,
) -> list[Variant]:
    """Each variant (i: row i % rows at `variant_scales[i]`) with its length and place, in layout order.

    Scales are visited in increasing order (a fixed order on every rank); packed, a row's
    variants follow each other in that order. `kept[scale]`: tokens an image keeps at that scale
    (default: the scale itself; anyres families count crops and newlines, `ModelFamily.scale_tokens`);
    `grids`: each image's own counts instead (Qwen's native resolution, anyres images of other sizes).
    """
    rows = len(tokens)
    ordered = [
        (i % rows, scale) for scale in sorted(set(variant_scales)) for i, s in enumerate(variant_scales) if s == scale
    ]
    if packed:
        ordered.sort(key=lambda pair: pair[0])  # stable: scales stay increasing within a row
    variants, filled = [], {}
    for index, (row, scale) in enumerate(ordered):
        if grids is not None:
            length = tokens[row] - sum(grids.full[i] - grids.kept[scale][i] for i in grids.of_row(images, row))
        else:
            length = tokens[row] - images[row] * (visual_tokens - (kept[scale] if kept else scale))
        out_row = row if packed else index
        offset = filled.get(out_row, 0)
        filled[out_row] = offset + length
        variants.append(Variant(row, scale, length, out_row, offset))
    return variants


def document_starts(batch: dict[str, Any], real: torch.Tensor) -> torch.Tensor:
    """True at the first token of every document: a packed row restarts its position ids per document."""
    if "position_ids" in batch:
        return (batch["position_ids"] == 0) & real.bool()
    starts = torch.zeros_like(real, dtype=torch.bool)
    starts[:, 0] = True
    return starts


def lay_out(
    batch: dict[str, Any],
    variants: list[Variant],
    packed: bool,
    image_token_id: int,
    visual_tokens: int,
    pad_token_id: int,
    kept: Mapping[int, int] | None = None,
    grids: ImageGrids | None = None,
    images: list[int] | None = None,
) -> Layout:
    """The layout of `variants`, built on the batch's device with one scatter per scale (`kept`, `grids`:
    as `place_variants`; with `grids`, `images` are the images of each input row)."""
    input_ids, device = batch["input_ids"], batch["input_ids"].device
    out_rows = max(v.out_row for v in variants) + 1
    lengths = [0] * out_rows
    for v in variants:
        lengths[v.out_row] = max(lengths[v.out_row], v.offset + v.length)
    width = max(lengths)
    shape = (out_rows, width + 1)  # the extra last column takes every dropped token
    out_ids = torch.full(shape, pad_token_id, dtype=torch.long, device=device)
    out_labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long, device=device)
    out_positions = torch.zeros(shape, dtype=torch.long, device=device)
    out_scales = torch.zeros(shape, dtype=torch.long, device=device)
    real = real_tokens(batch, pad_token_id)
    starts = document_starts(batch, real)
    for scale in sorted({v.scale for v in variants}):
        group = [v for v in variants if v.scale == scale]
        rows = torch.tensor([v.row for v in group], device=device)
        if grids is not None:
            indices = [grids.of_row(images, v.row) for v in group]
            full = [[grids.full[i] for i in row_images] for row_images in indices]
            keeps = [[grids.kept[scale][i] for i in row_images] for row_images in indices]
            keep = per_image_keep_mask(input_ids[rows], real[rows], image_token_id, full, keeps)
        else:
            keep = image_keep_mask(
                input_ids[rows], real[rows], image_token_id, visual_tokens, kept[scale] if kept else scale
            )
        kept_so_far = torch.cumsum(keep.long(), dim=1)  # kept tokens up to and including each one
        # Positions restart at each document: subtract the kept tokens before the document's start.
        before_document = torch.where(starts[rows] & keep, kept_so_far - 1, 0).cummax(dim=1).values
        offsets = torch.tensor([v.offset for v in group], device=device)[:, None]
        columns = torch.where(keep, offsets + kept_so_far - 1, width)
        target = (torch.tensor([v.out_row for v in group], device=device)[:, None].expand_as(columns), columns)
        out_ids.index_put_(target, input_ids[rows])
        out_labels.index_put_(target, batch["labels"][rows])
        out_positions.index_put_(target, kept_so_far - 1 - before_document)
        out_scales.index_put_(target, torch.full_like(columns, scale))
    # A variant's first token is never a target: packed, the token before it is another variant's.
    firsts = [v for v in variants if v.length]
    first_at = (
        torch.tensor([v.out_row for v in firsts], device=device),
        torch.tensor([v.offset for v in firsts], device=device),
    )
    out_labels.index_put_(first_at, torch.tensor(IGNORE_INDEX, device=device))
    columns = torch.arange(width, device=device)[None, :]
    row_ends = torch.tensor(lengths, device=device)[:, None]
    # The padding tail of a row is a segment of its own: its positions restart at 0.
    positions = torch.where(columns < row_ends, out_positions[:, :width], columns - row_ends)
    token_scales = out_scales[:, :width]
    attention_mask = None if packed else (token_scales > 0).long()
    image_grids = None
    if grids is not None and grids.pooled_thw is not None:
        image_grids = [grids.pooled_thw[v.scale][i] for v in variants for i in grids.of_row(images, v.row)]
    return Layout(
        out_ids[:, :width], out_labels[:, :width], positions, attention_mask, token_scales, variants, image_grids
    )


def visual_in_layout(
    scaled: Mapping[int, torch.Tensor | list[torch.Tensor]], variants: list[Variant], images: list[int]
) -> torch.Tensor:
    """Every variant's visual tokens, in the order their image tokens appear in the layout: (tokens, dim).

    `scaled[s]` holds every image of the batch at scale s: (images, s, dim), or a list of each image's
    (tokens, dim) when images have their own grids.
    """
    first_image = [sum(images[:row]) for row in range(len(images))]
    pieces = []
    for v in variants:
        at_scale = scaled[v.scale][first_image[v.row] : first_image[v.row] + images[v.row]]
        pieces += list(at_scale) if isinstance(at_scale, list) else [at_scale.flatten(0, 1)]
    return torch.cat(pieces)
