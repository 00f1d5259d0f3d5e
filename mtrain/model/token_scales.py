"""Nested visual-token scales: M3 grid pooling, the MQT query transformer, and the scale sampler.

Both heads turn one image's projected visual tokens into a prefix-nested family:
- M3 average-pools the (side x side) grid of projected tokens to (k x k) for every scale k^2;
- MQT cross-attends M learned queries to the vision features; scale m keeps the first m queries.
  Queries attend only to the image, never to each other, so the first m outputs of an M-query
  pass equal an m-query pass: every scale comes from one pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pool_grid(features: torch.Tensor, scale: int) -> torch.Tensor:
    """M3: (images, side*side, dim) -> (images, scale, dim) by 2D average pooling of the token grid."""
    images, tokens, dim = features.shape
    side, out_side = math.isqrt(tokens), math.isqrt(scale)
    if side * side != tokens or out_side * out_side != scale or side % out_side:
        raise ValueError(f"cannot pool a {tokens}-token grid to {scale} tokens: both must be squares, sides dividing")
    if scale == tokens:
        return features
    grid = features.transpose(1, 2).reshape(images, dim, side, side)
    kernel = side // out_side
    pooled = F.avg_pool2d(grid, kernel_size=kernel, stride=kernel)
    return pooled.reshape(images, dim, scale).transpose(1, 2)


def sincos_2d(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings for a square grid of `num_positions` (MAE style)."""
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        side = math.ceil(math.sqrt(num_positions))  # non-square count: take the first positions of a covering grid
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)[:num_positions].float()


class QueryTransformerProjector(nn.Module):
    """MQT's projector: M learned queries (2D sin-cos positions) cross-attending to vision features.

    It replaces LLaVA's `multi_modal_projector`: input (images, patches, vision_dim), output
    (images, M, text_dim). The caller keeps the first m outputs for budget m.
    """

    def __init__(self, vision_dim: int, text_dim: int, num_queries: int, num_heads: int, num_patches: int) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, text_dim) * 0.02)
        self.register_buffer("query_positions", sincos_2d(num_queries, text_dim), persistent=False)
        self.register_buffer("patch_positions", sincos_2d(num_patches, text_dim), persistent=False)
        self.key_value_in = nn.Linear(vision_dim, text_dim)
        self.norm_kv = nn.LayerNorm(text_dim)
        self.norm_q = nn.LayerNorm(text_dim)
        self.attention = nn.MultiheadAttention(text_dim, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(text_dim)
        self.mlp = nn.Sequential(nn.Linear(text_dim, 4 * text_dim), nn.GELU(), nn.Linear(4 * text_dim, text_dim))

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        images = vision_features.shape[0]
        keys = self.norm_kv(self.key_value_in(vision_features))
        keys_with_positions = keys + self.patch_positions.to(keys.dtype)
        queries = self.norm_q(self.queries + self.query_positions.to(self.queries.dtype))
        queries = queries.unsqueeze(0).expand(images, -1, -1)
        attended, _ = self.attention(queries, keys_with_positions, keys, need_weights=False)
        hidden = queries + attended
        return hidden + self.mlp(self.norm_out(hidden))


class ScaleSampler:
    """Which scales a step uses. Draws depend only on (seed, step), so every rank agrees."""

    def __init__(self, scales: list[int], policy: str, seed: int) -> None:
        self.scales = list(scales)
        self.policy = policy
        self.seed = seed

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 7 + stream)

    def step_scale(self, step: int) -> int:
        """The one scale of a `sample_per_step` step, identical on every rank."""
        index = int(torch.randint(len(self.scales), (1,), generator=self.generator(step)))
        return self.scales[index]

    def row_scales(self, step: int, rank: int, rows: int) -> list[int]:
        """One scale per sample (`sample_per_sample`); ranks hold different samples, so draws differ by rank."""
        draws = torch.randint(len(self.scales), (rows,), generator=self.generator(step, stream=1 + rank))
        return [self.scales[int(i)] for i in draws]

    def state_dict(self) -> dict[str, object]:
        # Stateless by construction: the draw is a function of (seed, step); kept for checkpoints.
        return {"scales": self.scales, "policy": self.policy, "seed": self.seed}
