"""LLaVA-NeXT / OneVision anyres arithmetic and M3 per crop, on tensors and a model config only.

The family (`mtrain/model/families/llava_onevision.py`) documents the rule; this module holds the pieces
that inference on an export needs as well (`mtrain.infer` imports no training or family code).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch


def tower_grid_side(config: Any) -> int:
    """g: the side of one crop's patch grid."""
    return config.vision_config.image_size // config.vision_config.patch_size


def crop_layout(config: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of crops the processor cuts an image of `image_size` (height, width) into."""
    from transformers.image_processing_utils import select_best_resolution  # noqa: PLC0415

    height, width = select_best_resolution(list(image_size), config.image_grid_pinpoints)
    crop = config.vision_config.image_size
    return height // crop, width // crop


def unpadded_grid(config: Any, image_size: tuple[int, int], side: int) -> tuple[int, int]:
    """(rows, columns) of the merged crops at crop side `side`, after unpadding and the anyres_max shrink.

    The processor's arithmetic (`_get_unpadded_features`) with the crop side `side`: the grid the
    model's `unpad_image` and interpolation leave."""
    crop_rows, crop_columns = crop_layout(config, image_size)
    rows, columns = crop_rows * side, crop_columns * side
    height, width = image_size
    if width / height > columns / rows:
        padding = (rows - int(round(height * (columns / width), 7))) // 2
        rows -= 2 * padding
    else:
        padding = (columns - int(round(width * (rows / height), 7))) // 2
        columns -= 2 * padding
    limit = max_crops(config)
    ratio = math.sqrt(rows * columns / (limit * side**2)) if limit else 0.0
    if ratio > 1.1:
        return int(rows // ratio), int(columns // ratio)
    return rows, columns


def max_crops(config: Any) -> int | None:
    """N of OneVision's `vision_aspect_ratio="anyres_max_N"`: merged grids above ~N crops' area are
    shrunk; None for LLaVA-NeXT, which never shrinks them."""
    aspect = getattr(config, "vision_aspect_ratio", None)
    return int(aspect.removeprefix("anyres_max_")) if aspect else None


def image_tokens(config: Any, image_size: tuple[int, int], side: int | None = None) -> int:
    """Tokens one image of `image_size` (height, width) stands for, each crop pooled to side x side (default g)."""
    side = side or tower_grid_side(config)
    rows, columns = unpadded_grid(config, image_size, side)
    return side * side + rows * (columns + 1)


def pack_at_scale(
    crops: torch.Tensor, image_size: tuple[int, int], config: Any, newline: torch.Tensor, side: int
) -> torch.Tensor:
    """One image's projected crops (1 + rows * columns, g*g, dim), base first, as its visual tokens at
    crop side `side`: (image_tokens(config, image_size, side), dim).

    `LlavaOnevisionModel.pack_image_features` with every crop pooled to side x side first (M3)."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image  # noqa: PLC0415

    from mtrain.model.token_scales import pool_grid  # noqa: PLC0415

    dim = crops.shape[-1]
    pooled = pool_grid(crops, side * side)  # every crop (the base image's too) pooled on its own grid
    base, tiles = pooled[0], pooled[1:]
    crop_rows, crop_columns = crop_layout(config, image_size)
    if tiles.shape[0] != crop_rows * crop_columns:
        raise ValueError(
            f"an image of size {tuple(image_size)} has {tiles.shape[0]} crops, but its size gives "
            f"{crop_rows}x{crop_columns}: its pixel values and image_sizes do not belong together"
        )
    grid = tiles.view(crop_rows, crop_columns, side, side, dim).permute(4, 0, 2, 1, 3)
    grid = grid.flatten(1, 2).flatten(2, 3)  # (dim, rows * side, columns * side)
    grid = unpad_image(grid, list(image_size))
    rows, columns = unpadded_grid(config, image_size, side)
    if tuple(grid.shape[1:]) != (rows, columns):  # the anyres_max shrink of a very large merged grid
        grid = F.interpolate(grid[None], [rows, columns], mode="bilinear")[0]
    lines = newline[:, None, None].expand(dim, rows, 1).to(grid.dtype)
    grid = torch.cat((grid, lines), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((base, grid), dim=0)


def anyres_scaled_features(
    model: Any, pixel_values: torch.Tensor, image_sizes: list[tuple[int, int]], scales: list[int]
) -> dict[int, torch.Tensor]:
    """Every image at every scale, (images, tokens at that scale, dim): one tower pass, then M3 per crop.
    The images' counts must agree (one size); `anyres_image_features` gives each its own."""
    per_image = anyres_image_features(model, pixel_values, image_sizes, scales)
    return {scale: torch.stack(images) for scale, images in per_image.items()}


def anyres_image_features(
    model: Any, pixel_values: torch.Tensor, image_sizes: list[tuple[int, int]], scales: list[int]
) -> dict[int, list[torch.Tensor]]:
    """Every image at every scale, each its own (tokens at that scale, dim): one tower pass over every image's
    real crops (a batch of images with fewer crops than others comes zero-padded to the most, as the stock
    processor pads it: the padding never reaches the tower), then M3 per crop."""
    config = model.config
    if pixel_values.dim() == 5:
        crops = [1 + rows * columns for rows, columns in (crop_layout(config, size) for size in image_sizes)]
        if max(crops) > pixel_values.shape[1]:
            raise ValueError(
                f"images of sizes {image_sizes} need up to {max(crops)} crops each, but their pixel values hold "
                f"{pixel_values.shape[1]}: the pixel values and image_sizes do not belong together"
            )
        if min(crops) == pixel_values.shape[1]:
            pixel_values = pixel_values.flatten(0, 1)
        else:
            pixel_values = torch.cat([image[:count] for image, count in zip(pixel_values, crops, strict=True)])
    else:
        crops = [pixel_values.shape[0] // len(image_sizes)] * len(image_sizes)
    output = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layers = config.vision_feature_layer
    if isinstance(layers, int):
        selected = output.hidden_states[layers]
    else:  # several layers, concatenated along the width (as the stock get_image_features does)
        selected = torch.cat([output.hidden_states[layer] for layer in layers], dim=-1)
    if config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    projected = model.model.multi_modal_projector(selected)
    per_image = projected.split(crops)
    newline = model.model.image_newline
    with whole_if_partitioned(newline):
        return {
            scale: [
                pack_at_scale(image, size, config, newline, math.isqrt(scale))
                for image, size in zip(per_image, image_sizes, strict=True)
            ]
            for scale in scales
        }


def whole_if_partitioned(parameter: torch.nn.Parameter) -> contextlib.AbstractContextManager:
    """`parameter` whole for the block when ZeRO-3 holds only this rank's partition of it, else nothing.

    ZeRO-3 gathers a module's parameters as its forward runs; the newline token is read outside any
    forward of its module. The engine's training step finds it whole; an evaluation or a generation
    outside the engine's forward (in-loop, `mtrain eval`, `mtrain.infer`) does not. Every rank runs
    the vision path in step there, so every rank enters together.
    """
    from_zero3 = getattr(parameter, "ds_status", None)
    if from_zero3 is None or from_zero3.name != "NOT_AVAILABLE":
        return contextlib.nullcontext()
    import deepspeed  # noqa: PLC0415

    return deepspeed.zero.GatheredParameters([parameter], modifier_rank=None)
