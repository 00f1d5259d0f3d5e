"""Nested visual-token scales: M3 grid pooling and the MQT query transformers (mtrain's and MQT-LLaVA's).

Which scales a step uses is drawn in mtrain/task/draws.py; how the variants are laid out, in
mtrain/task/token_layout.py.

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


def m3_scales(grid_tokens: int) -> list[int]:
    """Every square budget whose side divides the grid side: 1, 4, 16, 64 for an 8x8 grid."""
    side = math.isqrt(grid_tokens)
    return [k * k for k in range(1, side + 1) if side % k == 0]


def grid_scales(grid: tuple[int, int]) -> list[int]:
    """Every M3 scale of a (rows, columns) grid, increasing: (rows / f) * (columns / f) for each factor f
    dividing both sides (on a square grid, `m3_scales`)."""
    rows, columns = grid
    return sorted(
        {(rows // f) * (columns // f) for f in range(1, min(rows, columns) + 1) if not rows % f + columns % f}
    )


def reference_scales(reference_tokens: int) -> list[int]:
    """Every M3 scale of a reference grid of `reference_tokens` tokens (native resolution), increasing:
    reference_tokens / f^2 for each whole factor f."""
    root = math.isqrt(reference_tokens)
    return sorted(reference_tokens // (f * f) for f in range(1, root + 1) if not reference_tokens % (f * f))


def grid_factor(grid: tuple[int, int], scale: int) -> int:
    """M3's pooling factor f per side that leaves `scale` tokens of a (rows, columns) grid: scale =
    (rows / f) * (columns / f), f dividing both sides (the rule for non-square grids, e.g. Qwen2-VL's)."""
    rows, columns = grid
    factor = math.isqrt(rows * columns // max(scale, 1))
    if factor < 1 or factor * factor * scale != rows * columns or rows % factor or columns % factor:
        fitting = [(rows // f) * (columns // f) for f in range(min(rows, columns), 0, -1) if not rows % f + columns % f]
        raise ValueError(
            f"scale {scale} does not pool a {rows}x{columns} grid: a scale is (rows / f) * (columns / f) for a "
            f"factor f dividing both sides ({fitting} here)"
        )
    return factor


def reference_factor(reference_tokens: int, scale: int) -> int:
    """M3's pooling factor f per side for `scale` written as a token count on a reference grid of
    `reference_tokens` tokens: scale = reference_tokens / f^2. Images of their own (native) sizes are
    all pooled by that same f, so the scales nest on every image whatever its grid."""
    factor = math.isqrt(reference_tokens // max(scale, 1))
    if factor < 1 or factor * factor * scale != reference_tokens:
        fitting = reference_scales(reference_tokens)
        raise ValueError(
            f"scale {scale} is no pooling factor of the {reference_tokens}-token reference grid: a scale is "
            f"{reference_tokens} / f^2 for a whole factor f ({fitting} here)"
        )
    return factor


def pool_grid(features: torch.Tensor, scale: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """M3: (images, tokens, dim) -> (images, scale, dim) by 2D average pooling of the token grid.

    The grid is square (side * side tokens) unless a (rows, columns) `grid` is given; then the
    scale is pooled by `grid_factor` per side."""
    images, tokens, dim = features.shape
    if grid is None:
        side, out_side = math.isqrt(tokens), math.isqrt(scale)
        if side * side != tokens or out_side * out_side != scale or side % out_side:
            raise ValueError(
                f"cannot pool a {tokens}-token grid to {scale} tokens: both must be squares, sides dividing"
            )
        grid = (side, side)
    if scale == tokens:
        return features
    kernel = grid_factor(grid, scale)
    pooled = F.avg_pool2d(features.transpose(1, 2).reshape(images, dim, *grid), kernel_size=kernel, stride=kernel)
    return pooled.reshape(images, dim, scale).transpose(1, 2)


def merged_grid(grid_thw: torch.Tensor, merge_size: int) -> tuple[int, int, int]:
    """(t, rows, columns) of merged tokens for one image's `image_grid_thw` row (t, h, w) in patches."""
    t, h, w = (int(v) for v in grid_thw)
    return t, h // merge_size, w // merge_size


def pool_merged(features: torch.Tensor, grid: tuple[int, int, int], factor: int) -> torch.Tensor:
    """One image's merged tokens (t * rows * columns, dim), row-major, average-pooled by `factor` per side."""
    if factor == 1:
        return features
    t, rows, columns = grid
    if rows % factor or columns % factor:
        raise ValueError(f"pooling factor {factor} does not divide the {rows}x{columns} merged grid")
    dim = features.shape[-1]
    frames = features.reshape(t, rows, columns, dim).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(frames, kernel_size=factor, stride=factor)
    return pooled.permute(0, 2, 3, 1).reshape(-1, dim)


def pooled_grid_thw(grid_thw: torch.Tensor, factor: int) -> torch.Tensor:
    """`image_grid_thw` rows (t, h, w) for the pooled grids: (t, h / f, w / f), what get_rope_index reads."""
    pooled = grid_thw.clone()
    pooled[..., 1:] = grid_thw[..., 1:] // factor
    return pooled


def per_image_keep_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    full: list[list[int]],
    kept: list[list[int]],
) -> torch.Tensor:
    """`image_keep_mask` for images of their own token counts: row r's i-th image has `full[r][i]` tokens
    in `input_ids` and keeps its first `kept[r][i]`. The per-token decision is a host-made table read by
    each image token's ordinal in its row, so nothing waits for the device."""
    width = max([1, *(sum(row) for row in full)])
    rows = [
        [j < keep for count, keep in zip(counts, keeps, strict=True) for j in range(count)]
        for counts, keeps in zip(full, kept, strict=True)
    ]
    table = torch.tensor([row + [False] * (width - len(row)) for row in rows], device=input_ids.device)
    is_image = input_ids == image_token_id
    ordinal = (torch.cumsum(is_image.long(), dim=1) - 1).clamp(0, width - 1)
    return (~is_image | table.gather(1, ordinal)) & attention_mask.bool()


def image_keep_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, visual_tokens: int, keep: int
) -> torch.Tensor:
    """True on the real tokens that survive shrinking every image run to its first `keep` tokens.

    Training (mtrain/task/token_layout.py) and stock inference (mtrain/infer.py) shrink prompts with it."""
    is_image = input_ids == image_token_id
    # Index of each image token within its image: image tokens counted so far, modulo the run length.
    within_image = (torch.cumsum(is_image.long(), dim=1) - 1) % visual_tokens
    return (~is_image | (within_image < keep)) & attention_mask.bool()


def sincos_grid(side: int, dim: int, column_first: bool = False) -> torch.Tensor:
    """MAE-style 2D sin-cos codes of a side x side grid, cells in row-major order: (side * side, dim).
    Each cell's code is that of its row then its column, or column then row with `column_first`."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    rows, columns = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = []
    for coord in (columns.flatten(), rows.flatten()) if column_first else (rows.flatten(), columns.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def sincos_2d(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings for a square grid of `num_positions` (MAE style)."""
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        side = math.ceil(math.sqrt(num_positions))  # non-square count: take the first positions of a covering grid
    return sincos_grid(side, dim)[:num_positions]


class QueryTransformerProjector(nn.Module):
    """MQT's projector: M learned queries (2D sin-cos positions) cross-attending to vision features.

    It replaces LLaVA's `multi_modal_projector`: input (images, patches, vision_dim), output
    (images, M, text_dim). The caller keeps the first m outputs for budget m. With `num_patches=0` the
    keys get no positions of their own: for inputs whose features already carry them (another family's
    projected tokens, `mtrain/model/mqt_head.py`), whose count and layout vary by family.
    """

    def __init__(self, vision_dim: int, text_dim: int, num_queries: int, num_heads: int, num_patches: int) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, text_dim) * 0.02)
        self.register_buffer("query_positions", sincos_2d(num_queries, text_dim), persistent=False)
        patch_positions = sincos_2d(num_patches, text_dim) if num_patches else None
        self.register_buffer("patch_positions", patch_positions, persistent=False)
        self.key_value_in = nn.Linear(vision_dim, text_dim)
        self.norm_kv = nn.LayerNorm(text_dim)
        self.norm_q = nn.LayerNorm(text_dim)
        self.attention = nn.MultiheadAttention(text_dim, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(text_dim)
        self.mlp = nn.Sequential(nn.Linear(text_dim, 4 * text_dim), nn.GELU(), nn.Linear(4 * text_dim, text_dim))

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        images = vision_features.shape[0]
        keys = self.norm_kv(self.key_value_in(vision_features))
        keys_with_positions = keys if self.patch_positions is None else keys + self.patch_positions.to(keys.dtype)
        queries = self.norm_q(self.queries + self.query_positions.to(self.queries.dtype))
        queries = queries.unsqueeze(0).expand(images, -1, -1)
        attended, _ = self.attention(queries, keys_with_positions, keys, need_weights=False)
        hidden = queries + attended
        return hidden + self.mlp(self.norm_out(hidden))

    def read_levels(self, features: torch.Tensor) -> torch.Tensor:
        """(images, M, width * levels) from (images, tokens, width * levels): every block of `width` channels
        (Qwen3-VL's merged tokens, then each DeepStack set: the family's `image_features`) read by the same
        queries, as its own image, in one call; a single block is the plain forward."""
        width = self.query_positions.shape[-1]  # a buffer: under ZeRO-3 a parameter's shape is (0,) here
        levels = features.shape[-1] // width
        if levels == 1:
            return self(features)
        read = self(torch.cat(features.split(width, dim=-1)))  # (levels * images, M, width)
        return torch.cat(read.chunk(levels), dim=-1)


def init_query_transformer(module: QueryTransformerProjector) -> None:
    """Start `module`'s queries and fixed position buffers, which transformers builds empty (meta device) when
    loading a folder; transformers' `init.*` skips whatever a checkpoint loaded (a model's `_init_weights`)."""
    from transformers import initialization as init  # noqa: PLC0415

    # Widths from the buffers: under ZeRO-3 a parameter's shape is (0,) outside a gather.
    queries, text_dim = module.query_positions.shape
    init.normal_(module.queries, std=0.02)
    init.copy_(module.query_positions, sincos_2d(queries, text_dim))
    if module.patch_positions is not None:
        init.copy_(module.patch_positions, sincos_2d(module.patch_positions.shape[0], text_dim))


def sincos_2d_column_first(side: int, dim: int) -> torch.Tensor:
    """MQT-LLaVA's query positions (MAE `get_2d_sincos_pos_embed`): per grid cell, in row-major order,
    the sin-cos code of its column, then of its row: (side * side, dim)."""
    return sincos_grid(side, dim, column_first=True)


class MQTLlavaResampler(nn.Module):
    """MQT-LLaVA's `Resampler` layout (`llava/model/multimodal_projector/builder.py`), so its weights load.

    One cross-attention at the vision width: queries `query[:m] + pos_embed[:m]`, keys the patch
    positions only (`pos_embed` resized bicubically to the patch grid), values the vision features,
    each through its own LayerNorm; then a bias-free projection `proj` (vision_dim, text_dim). No
    residual, no MLP. Parameter names and shapes are the reference's: query, pos_embed (a buffer
    here, fixed in the reference too), attn.{in_proj_weight, in_proj_bias, out_proj.*},
    ln_q / ln_k / ln_v, proj.
    """

    def __init__(self, vision_dim: int, text_dim: int, num_queries: int, num_heads: int) -> None:
        super().__init__()
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise ValueError(f"the MQT-LLaVA layout places its {num_queries} queries on a square grid; use a square")
        self.num_queries = num_queries
        self.register_buffer("pos_embed", sincos_2d_column_first(side, vision_dim))
        self.query = nn.Parameter(torch.empty(num_queries, vision_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(vision_dim, num_heads)
        self.ln_q = nn.LayerNorm(vision_dim, eps=1e-6)
        self.ln_k = nn.LayerNorm(vision_dim, eps=1e-6)
        self.ln_v = nn.LayerNorm(vision_dim, eps=1e-6)
        self.proj = nn.Parameter(text_dim**-0.5 * torch.randn(vision_dim, text_dim))

    def key_positions(self, patches: int) -> torch.Tensor:
        """`pos_embed` resized from the query grid to the patch grid (the reference's `get_abs_pos`)."""
        side, patch_side = math.isqrt(self.num_queries), math.isqrt(patches)
        grid = self.pos_embed.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(patch_side, patch_side), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).flatten(0, 2).to(self.pos_embed.dtype)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        images, patches, _ = vision_features.shape
        values = self.ln_v(vision_features).transpose(0, 1)  # (patches, images, width): sequence first
        keys = self.ln_k(self.key_positions(patches).to(values.dtype)).unsqueeze(1).expand(-1, images, -1)
        queries = self.ln_q(self.query + self.pos_embed.to(self.query.dtype)).unsqueeze(1).expand(-1, images, -1)
        attended, _ = self.attn(queries, keys, values, need_weights=False)
        return attended.transpose(0, 1) @ self.proj
