"""Qwen2-VL (`model_type == "qwen2_vl"`), in progress: the M3 pieces on its native-resolution grids.

Not in the registry yet (a `qwen2_vl` folder is still refused before any process starts): the data
pipeline does not yet produce Qwen's flattened patches, `image_grid_thw` and `mm_token_type_ids`,
and the tasks do not yet pass 3-D position ids. What is here, and tested
(tests/unit/test_model_families.py), is how M3 works on this family:

- Images -> grids: the processor resizes each image to a multiple of patch_size * merge_size
  pixels per side and cuts it into patches; the tower's patch merger (the projector) joins each
  merge_size x merge_size block into one token. So one image is a (t, rows, columns) grid of
  merged tokens, rows = h / merge_size and columns = w / merge_size for `image_grid_thw` (t, h, w):
  variable per image and usually not square.
- M3 on such grids: a scale is a pooling factor f per side, the same for both sides; the image
  gives (rows / f) x (columns / f) tokens. Factors nest (f = 1, 2, 4: each grid pools the one
  before), every rank computes the same counts from the same `image_grid_thw`, and f must divide
  both sides of every image's merged grid (resize images to multiples of patch_size * merge_size * f_max).
- Sequence: the pooled tokens fill the positions of `image_token_id` between vision_start and
  vision_end, (rows / f) * (columns / f) of them per image.
- Position ids: 3-D M-RoPE (temporal, height, width), from the model's own `get_rope_index`
  given the pooled grid, (t, h / f, w / f): pooled tokens get the positions of a grid of that
  size, and the text after an image continues from the pooled grid's extent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mtrain.model.families.base import ModelFamily


def merged_grid(grid_thw: torch.Tensor, merge_size: int) -> tuple[int, int, int]:
    """(t, rows, columns) of merged tokens for one image's `image_grid_thw` row (t, h, w) in patches."""
    t, h, w = (int(v) for v in grid_thw)
    return t, h // merge_size, w // merge_size


def factor_problems(grids: list[tuple[int, int, int]], factors: list[int]) -> list[str]:
    """Each pooling factor must divide both sides of every image's merged grid."""
    bad = sorted({(f, rows, columns) for f in factors for _, rows, columns in grids if rows % f or columns % f})
    return [f"pooling factor {f} does not divide a {rows}x{columns} merged grid" for f, rows, columns in bad]


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


class Qwen2VLFamily(ModelFamily):
    model_type = "qwen2_vl"
    model_class_path = "transformers:Qwen2VLForConditionalGeneration"
    position_ids = "3-D M-RoPE from the model's get_rope_index, given each image's pooled grid (t, h / f, w / f)"

    def visual_tokens(self, config: Any) -> int:
        raise NotImplementedError("qwen2_vl images have a token count each: rows * columns of their merged grid")

    def visual_grid(self, config: Any) -> tuple[int, int] | None:
        return None  # one grid per image, from image_grid_thw

    def image_token_id(self, config: Any) -> int:
        return config.image_token_id
