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
    # An image's token count depends on its (height, width) (anyres crops, native resolution): the
    # task counts each batch's images by `scale_tokens` from the batch's `image_sizes`.
    counts_by_image_size: bool = False

    # The class that builds and loads this family, as "module:Name" (imported on first use, so that
    # commands which fail early never import a model's code).
    model_class_path: str = ""

    # Whether the model's attention is causal within documents and nothing more, so flash_attention_2 and
    # mtrain_varlen_sdpa run it (Gemma 3's is not: they would drop its bidirectional image mask).
    flash_attention: bool = True

    # The `task.objective`s whose tasks run this family.
    objectives: tuple[str, ...] = ("lm", "contrastive")

    # The text right before and after every image's tokens, as the family's processor writes it around the
    # image token ("" for none). Captions and interleaved documents get it from tokenization; a chat template
    # writes it into conversations itself (data_pipeline/tokenize.py).
    image_markers: tuple[str, str] = ("", "")

    # Whether greedy generation (mtrain/infer.py's MatryoshkaModel: `eval.generate_samples`, `mtrain generate`)
    # runs this family as its tasks train it; refused before any process group where it does not. mtrain.infer
    # imports no family code: its GENERATING_MODEL_TYPES lists the same types (a test keeps them equal).
    generates: bool = False

    # The merged grid of a text-only batch's blank image where images have no one grid (Qwen's native
    # resolution); None: the model's own grid.
    stand_in_grid: tuple[int, int] | None = None

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

    def m3_grid(self, config: Any) -> tuple[int, int] | None:
        """The grid M3 pools, whose budgets `mtrain eval` scores by default: the image's own grid, or
        (anyres) each crop's; None when there is none."""
        return self.visual_grid(config)

    def image_token_id(self, config: Any) -> int:
        """The token id whose positions the visual tokens fill."""
        raise NotImplementedError

    def problems(self, config: Any, tokens: Any, image_size: list[int] | None = None) -> list[str]:
        """What makes `tokens` (a TokenScalesConfig), `image_size` (`model.image_size`, for families that
        resize to it) or the model config unusable together; empty when fine."""
        return []

    def native_resolution_problems(self, config: Any, tokens: Any, image_pixels: list[int]) -> list[str]:
        """What makes `model.image_pixels` (images at their own sizes, each its own grid) unusable with this
        model; a family with one image size refuses it."""
        return [
            f"model.image_pixels={image_pixels} is Qwen's native resolution; a {config.model_type} model has one "
            "image size, drop it"
        ]

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

    def scaled_image_features(
        self, model: nn.Module, pixel_values: Any, image_sizes: list[tuple[int, int]], scales: list[int]
    ) -> dict[int, list[torch.Tensor]]:
        """`scaled_features` for images whose counts differ (anyres images of other sizes in one batch):
        {scale: [each image's (scale_tokens, dim)]}."""
        raise NotImplementedError(f"a {self.model_type} model's images do not differ in count by size")

    def image_feature_list(
        self, model: nn.Module, pixel_values: torch.Tensor, image_sizes: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Each image's projected tokens at full size, (tokens, dim), for images whose counts differ by size
        (anyres): the stock `get_image_features` with `image_sizes`, which reads each image's real crops."""
        output = model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=torch.tensor(image_sizes), return_dict=True
        )
        return list(output.pooler_output)

    # ── The forward's family hooks (mtrain/task/*); LLaVA's are the defaults. ─────────────────────
    def grid_features(self, model: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Each image's projected tokens when every image has its own grid (`image_grid_thw` rows), a list of
        (tokens, dim); only Qwen's families have such images (native resolution)."""
        raise NotImplementedError(f"a {self.model_type} model's images have no grid of their own (image_grid_thw)")

    def image_features(
        self,
        model: Any,
        pixel_values: torch.Tensor,
        grid: tuple[int, int] | None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Projected visual tokens of every image at full size, (images, tokens, dim), for the loader's
        `pixel_values` (images of merged grid `grid`; None: the family knows its grid). Anyres families
        crop by each image's (height, width), `image_sizes`; the others never see them (LLaVA's forward
        would read them as Pixtral's sizes). A family may carry more of each token on the channel axis
        (Qwen3-VL's DeepStack sets): M3 pools every channel alike, and its `splice_visual` splits them."""
        sizes = {"image_sizes": torch.tensor(image_sizes)} if image_sizes and self.counts_by_image_size else {}
        output = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **sizes)
        features = list(output.pooler_output)
        counts = [image.shape[0] for image in features]
        if len(set(counts)) > 1:  # anyres images of other sizes: what stacks them needs one count
            raise ValueError(
                f"images of sizes {image_sizes} give {counts} visual tokens each, and this path (MQT's query "
                "transformer, the contrastive task) takes one count per batch; give its images one size"
            )
        return torch.stack(features)

    def stand_in_input(
        self, config: Any, grid: tuple[int, int] | None, dtype: Any, device: Any
    ) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        """(pixel values, image_sizes or None) of one blank image as the loader would give it: what a
        text-only batch runs through the whole vision path times zero to keep ZeRO-3's ranks in step."""
        vision = config.vision_config
        shape = (1, vision.num_channels, vision.image_size, vision.image_size)
        return torch.zeros(shape, dtype=dtype, device=device), None

    def layout_position_ids(
        self,
        model: Any,
        layout: Any,
        grid: tuple[int, int] | None,
        image_token_id: int,
        packed: bool,
        query_tokens: bool = False,
    ) -> torch.Tensor:
        """The language model's position ids for a token layout (`mtrain.task.token_layout.Layout`):
        1-D ids restarting at every document, as the layout made them. `query_tokens`: the image positions
        hold MQT's query outputs, not a grid of the image (a family with spatial ids gives them text ids)."""
        return layout.position_ids

    def language_model_inputs(self, model: Any, layout: Any, image_token_id: int, packed: bool) -> dict[str, Any]:
        """Extra (or replacing) keyword arguments of the language-model call for a layout, such as an
        attention the layout's `attention_mask` cannot express (Gemma 3's bidirectional image attention)."""
        return {}

    def splice_visual(
        self, model: Any, embeddings: torch.Tensor, image_positions: torch.Tensor, visual: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(embeddings, extra language-model keyword arguments): `visual`, every image's tokens of the layout
        in layout order as `image_features` made them (pooled or not), put at `image_positions` (rows, width),
        and what else of them the language model takes there (Qwen3-VL's DeepStack sets)."""
        return embeddings.masked_scatter(image_positions.unsqueeze(-1), visual.to(embeddings.dtype)), {}

    # ── Generation's family hook (mtrain/eval/generation.py); LLaVA's is the default. ──────────────────
    def prompt_images(self, config: Any, pixel_values: torch.Tensor, grid: tuple[int, int] | None) -> dict[str, Any]:
        """A prompt's images, the loader's `pixel_values` of merged grid `grid`, as the family's processor
        gives them to `generate` (Qwen: every image's patches in one sequence, and `image_grid_thw`)."""
        return {"pixel_values": pixel_values}

    def language_model(self, model: Any) -> nn.Module:
        """The module the tasks call with the spliced `inputs_embeds` (it returns `last_hidden_state`; the
        tasks apply `lm_head`): the model's own `model.model`, which builds any family-specific mask."""
        return model.model


def tiny_text_sizes(tiny: Any, vocab_size: int) -> dict[str, Any]:
    """The language-model sizes every tiny preset shares, from `model.tiny`: a 2x MLP, as many KV heads as
    heads, 1024 positions."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": tiny.hidden_size,
        "intermediate_size": tiny.hidden_size * 2,
        "num_hidden_layers": tiny.num_layers,
        "num_attention_heads": tiny.num_heads,
        "num_key_value_heads": tiny.num_heads,
        "max_position_embeddings": 1024,
    }


def tiny_vision_sizes(tiny: Any) -> dict[str, Any]:
    """The ViT sizes the tiny presets' CLIP and SigLIP towers share, from `model.tiny`: a 2x MLP, one head
    per 8 channels."""
    return {
        "hidden_size": tiny.vision_hidden_size,
        "intermediate_size": tiny.vision_hidden_size * 2,
        "num_hidden_layers": tiny.vision_layers,
        "num_attention_heads": max(1, tiny.vision_hidden_size // 8),
        "image_size": tiny.image_size,
        "patch_size": tiny.patch_size,
    }
