"""The interface every model family implements; the registry is `mtrain.model.families`."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn


class UnsupportedModelError(ValueError):
    """A model folder whose `model_type` has no family here."""


class ModelFamily:
    """The interface every family implements (see the module docstring)."""

    model_type: str = ""
    # How position ids are made; the packer (data_pipeline/packing.py) and the layout follow it.
    position_ids: str = ""
    # An image's token count depends on its (height, width) (anyres crops, native resolution): the
    # task counts each batch's images by `scale_tokens` from the batch's `image_sizes`.
    counts_by_image_size: bool = False

    # The class that builds and loads this family, as "module:Name" (imported on first use, so that
    # commands which fail early never import a model's code).
    model_class_path: str = ""

    def model_class(self) -> type[nn.Module]:
        """The transformers class that builds and loads this family (its ...ForConditionalGeneration)."""
        module, name = self.model_class_path.split(":")
        return getattr(importlib.import_module(module), name)

    def visual_tokens(self, config: Any) -> int:
        """Tokens each `<image>` expands to in the language model, as the tower and projector emit them."""
        raise NotImplementedError

    def visual_grid(self, config: Any) -> tuple[int, int] | None:
        """(rows, columns) of the projected visual tokens of one image; None when they are not a pure grid."""
        raise NotImplementedError

    def m3_grid(self, config: Any) -> tuple[int, int] | None:
        """The grid M3 pools, whose budgets `mtrain eval` scores by default: the image's own grid, or
        (anyres) each crop's; None when there is none."""
        return self.visual_grid(config)

    def image_token_id(self, config: Any) -> int:
        """The token id whose positions the visual tokens fill."""
        raise NotImplementedError

    def scale_tokens(self, config: Any, scale: int | None, image_size: tuple[int, int]) -> int:
        """Tokens an image of `image_size` (height, width) stands for at M3 scale `scale` (None: unpooled).

        A fixed-grid family pools its grid to `scale` tokens; a family whose images carry more
        than one grid (anyres crops, newlines) counts them by its own rule."""
        return scale if scale is not None else self.visual_tokens(config)

    def scaled_features(
        self, model: nn.Module, pixel_values: Any, image_sizes: list[tuple[int, int]], scales: list[int]
    ) -> dict[int, Any] | None:
        """Every image at every M3 scale, {scale: (images, scale_tokens, dim)}, from one vision pass; None
        when the family's visual tokens are one grid per image, which the task pools itself."""
        return None

    def stand_in_input(self, config: Any) -> tuple[tuple[int, ...], list[tuple[int, int]] | None]:
        """(pixel-value shape, image_sizes or None) of one blank image the whole vision path accepts:
        what a text-only batch runs times zero to keep ZeRO-3's ranks in step."""
        vision = config.vision_config
        return (1, vision.num_channels, vision.image_size, vision.image_size), None

    def problems(self, config: Any, tokens: Any) -> list[str]:
        """What makes `tokens` (a TokenScalesConfig) or the model config unusable together; empty when fine."""
        return []
