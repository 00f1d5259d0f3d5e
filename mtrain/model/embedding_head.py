"""Embedding heads on an MLLM's hidden states: pooling, optional projection, Matryoshka truncation.

    hidden states (rows, tokens, width) ──► pool (last real token | masked mean) ──► [projection]
        ──► embedding (rows, dim) ──► first k dims ──► L2 re-normalise  (MRL: one vector, every k)

MRL-E: one classifier whose weight is sliced `W[:, :k]` for every prefix length k, instead of
one classifier per k.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, right- or left-padded alike (the highest masked-in position)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token: (rows, width)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)]


def pool_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean hidden state over each row's real tokens: (rows, width)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` coordinates, L2 re-normalised: the Matryoshka embedding of size `dim`."""
    if not 1 <= dim <= embeddings.shape[-1]:
        raise ValueError(f"dim={dim} is outside 1..{embeddings.shape[-1]}, the embedding width")
    return F.normalize(embeddings[..., :dim].float(), dim=-1)


def check_dims(dims: list[int], width: int) -> list[int]:
    """`dims` as trained: increasing and at most `width`; empty means the full width only."""
    if not dims:
        return [width]
    if sorted(set(dims)) != list(dims) or dims[0] < 1:
        raise ValueError(f"matryoshka.dims.dims must be positive and strictly increasing, got {dims}")
    if dims[-1] > width:
        raise ValueError(
            f"matryoshka.dims.dims={dims} goes beyond the embedding width {width}; "
            "lower the largest dim or raise task.contrastive.projection_dim"
        )
    return list(dims)


class EmbeddingHead(nn.Module):
    """Pooling plus an optional linear projection; truncation happens where the dims are used."""

    def __init__(self, width: int, pooling: Literal["last", "mean"] = "last", projection_dim: int = 0) -> None:
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.projection = nn.Linear(width, projection_dim, bias=False) if projection_dim else None
        self.out_width = projection_dim or width

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pool = pool_last_token if self.pooling == "last" else pool_mean
        pooled = pool(hidden, attention_mask)
        return self.projection(pooled) if self.projection is not None else pooled


class MatryoshkaClassifier(nn.Module):
    """MRL-E: one weight W (classes, width) shared by every prefix length; size k uses W[:, :k]."""

    def __init__(self, width: int, num_classes: int, dims: list[int]) -> None:
        super().__init__()
        self.dims = check_dims(dims, width)
        self.weight = nn.Parameter(torch.empty(num_classes, width))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.normal_(self.weight, std=width**-0.5)

    def logits(self, features: torch.Tensor, dim: int) -> torch.Tensor:
        """Class logits of the embeddings' first `dim` features (the embed API's `classify`)."""
        return mrl_e_logits(features, self.weight, self.bias, dim)


def mrl_e_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dim: int) -> torch.Tensor:
    """MRL-E logits at prefix length `dim`: the first `dim` features against the first `dim` columns of W."""
    return features[..., :dim] @ weight[:, :dim].T + bias
