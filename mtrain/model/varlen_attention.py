"""Packed rows attend within each document only, on any device: torch sdpa's causal kernel per document.

On the CPU, sdpa given transformers' block-diagonal mask of a packed row takes its math path and computes
every score of the row; with `is_causal=True` and no mask it takes its flash kernel and computes only the
causal half. This implementation (registered with transformers as `mtrain_varlen_sdpa`, with its mask entry)
does what flash-attention's varlen path does on a GPU: every document's queries attend causally over that
document's keys alone. Same math as the mask, fewer scores.

    create_causal_mask ── varlen_sdpa_mask: transformers' own sdpa mask (packed documents found from the
                          position ids by `find_packed_sequence_indices`), then:
                          exactly causal within contiguous documents? -> a document marker (rows, length)
                          anything else (padding, bidirectional image blocks, a KV cache)  -> that mask
    attention layer  ──── varlen_sdpa_attention_forward: a marker -> sdpa(is_causal=True) per document;
                          anything else -> transformers' stock sdpa, unchanged

The marker is recognised from the mask transformers built, never from a guess about the inputs: whatever a
model adds to its mask (Gemma 3's bidirectional image blocks, a sliding window) reaches stock sdpa.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VARLEN_SDPA = "mtrain_varlen_sdpa"

# The marker's attribute holding each row's documents as (start, end) column spans, read once per forward.
DOCUMENT_SPANS = "mtrain_document_spans"


def document_starts(mask: torch.Tensor) -> torch.Tensor | None:
    """(rows, length) column of the first key every query attends to, when the boolean sdpa `mask`
    (rows, 1, length, length) is exactly causal within contiguous documents; None for any other mask."""
    rows, heads, q_length, kv_length = mask.shape
    if heads != 1 or q_length != kv_length or mask.dtype != torch.bool:
        return None
    keys = mask[:, 0]
    starts = keys.to(torch.uint8).argmax(-1)  # first True of every query's row of keys
    index = torch.arange(q_length, device=mask.device)
    # Contiguous documents: a query starts where the one before it did, or opens a new document at itself.
    previous = torch.cat([starts[:, :1], starts[:, :-1]], dim=1)
    contiguous = (starts == previous) | (starts == index)
    expected = (index[None, None, :] >= starts[:, :, None]) & (index[None, None, :] <= index[None, :, None])
    if not (bool(contiguous.all()) and torch.equal(keys, expected)):
        return None
    return starts


def document_spans(starts: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Every row's documents as (start, end) column spans, from `document_starts` (one host read)."""
    length = starts.shape[1]
    opens = starts == torch.arange(length, device=starts.device)
    spans: list[list[int]] = [[] for _ in range(starts.shape[0])]
    for row, column in opens.nonzero().tolist():
        spans[row].append(column)
    return [list(zip(row_opens, [*row_opens[1:], length], strict=True)) for row_opens in spans]


def varlen_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' sdpa mask, or, where that mask is causal within two or more contiguous documents and
    nothing else (no padding mask, no cache offset), a marker for `varlen_sdpa_attention_forward`: the
    (rows, length) document starts, their spans attached."""
    from transformers.masking_utils import sdpa_mask  # noqa: PLC0415 (transformers loads on first use)

    mask = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )
    # A 2-D padding mask, a cache's offsets or a skipped (plain causal) mask: stock sdpa as it is.
    plain_offsets = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    if mask is None or attention_mask is not None or not plain_offsets or q_length != kv_length:
        return mask
    starts = document_starts(mask)
    if starts is None:
        return mask
    setattr(starts, DOCUMENT_SPANS, document_spans(starts))
    return starts


def is_document_marker(attention_mask: torch.Tensor | None) -> bool:
    """Whether `attention_mask` is `varlen_sdpa_mask`'s marker (document starts carrying their spans), not a
    mask for stock sdpa."""
    return attention_mask is not None and hasattr(attention_mask, DOCUMENT_SPANS)


def varlen_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa with `is_causal=True` on every document's own (query, key, value) block when `attention_mask` is
    `varlen_sdpa_mask`'s marker; transformers' stock `sdpa_attention_forward` otherwise. Output as stock:
    (rows, length, heads, head_dim)."""
    from transformers.integrations.sdpa_attention import (  # noqa: PLC0415
        repeat_kv,
        sdpa_attention_forward,
        use_gqa_in_sdpa,
    )

    if not is_document_marker(attention_mask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    spans = getattr(attention_mask, DOCUMENT_SPANS)
    sdpa_kwargs: dict[str, Any] = {}
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention as transformers' sdpa does it with no mask
        if use_gqa_in_sdpa(None, key, value):
            sdpa_kwargs["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for row, row_spans in enumerate(spans):
        blocks = [
            torch.nn.functional.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
                **sdpa_kwargs,
            )
            for start, end in row_spans
        ]
        rows.append(torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0])
    attn_output = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return attn_output.transpose(1, 2).contiguous(), None


def register_varlen_sdpa() -> None:
    """Make `mtrain_varlen_sdpa` a name every transformers model accepts as its attn_implementation (before a
    model is built with it; registering again is harmless)."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention_forward)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)
