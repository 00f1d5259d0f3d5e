"""The interface every model family implements; the registry is `mtrain.model.families`."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """A model folder whose `model_type` has no family here."""


class ModelFamily:
    """The interface every family implements (see the module docstring)."""

    model_type: str = ""
    # How position ids are made; the packer (data_pipeline/packing.py) and the layout follow it.
    position_ids: str = ""

    # The class that builds and loads this family, as "module:Name" (imported on first use, so that
    # commands which fail early never import a model's code).
    model_class_path: str = ""

    # Whether the model class runs under flash_attention_2 (Gemma 3 does not: it drops the image mask).
    flash_attention: bool = True

    # The `task.objective`s whose tasks run this family.
    objectives: tuple[str, ...] = ("lm", "contrastive")

    # Module-name fragments of the vision tower and the projector (freezing, LoRA's modules_to_save).
    part_names: dict[str, str] = {"vision_tower": "vision_tower", "projector": "multi_modal_projector"}

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

    def image_token_id(self, config: Any) -> int:
        """The token id whose positions the visual tokens fill."""
        raise NotImplementedError

    def problems(self, config: Any, tokens: Any, image_size: list[int] | None = None) -> list[str]:
        """What makes `tokens` (a TokenScalesConfig), `image_size` (`model.image_size`, for families that
        resize to it) or the model config unusable together; empty when fine."""
        return []

    # ── The forward's family hooks (mtrain/task/matryoshka_tokens.py); LLaVA's are the defaults. ─────
    def image_features(self, model: Any, pixel_values: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """Projected visual tokens of every image at full size, (images, tokens, dim), for the loader's
        `pixel_values` (images of merged grid `grid`; None: the family knows its grid)."""
        output = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.stack(list(output.pooler_output))

    def stand_in_pixels(self, config: Any, grid: tuple[int, int] | None, dtype: Any, device: Any) -> torch.Tensor:
        """One blank image as the loader would give it (a text-only batch's zero-weighted vision pass)."""
        vision = config.vision_config
        return torch.zeros((1, vision.num_channels, vision.image_size, vision.image_size), dtype=dtype, device=device)

    def layout_position_ids(
        self, model: Any, layout: Any, grid: tuple[int, int] | None, image_token_id: int, packed: bool
    ) -> torch.Tensor:
        """The language model's position ids for a token layout (`mtrain.task.token_layout.Layout`):
        1-D ids restarting at every document, as the layout made them."""
        return layout.position_ids

    def language_model_inputs(self, model: Any, layout: Any, image_token_id: int, packed: bool) -> dict[str, Any]:
        """Extra (or replacing) keyword arguments of the language-model call for a layout, such as an
        attention the layout's `attention_mask` cannot express (Gemma 3's bidirectional image attention)."""
        return {}
