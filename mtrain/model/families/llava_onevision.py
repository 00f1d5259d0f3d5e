"""LLaVA-OneVision (`model_type == "llava_onevision"`): anyres crops of a SigLIP tower, image newlines, a Qwen2 LM.

- Images -> grids: the image processor picks the best of `config.image_grid_pinpoints` for the
  image's (height, width) (`select_best_resolution`), cuts the resized, padded image into
  (rows x columns) crops of the tower's size and puts the whole image, resized, first: `1 + rows *
  columns` tower inputs, `pixel_values` (images, crops, 3, S, S) with `image_sizes` (images, 2).
  The tower gives each crop a (g x g) grid, g = image_size / patch_size (SigLIP: no CLS token;
  `vision_feature_select_strategy` must keep the bare grid).
- Projector: `model.model.multi_modal_projector`, per token.
- Sequence: the base image's g*g tokens, then the crops merged into one (rows * g) x (columns * g)
  grid, cut back to the image's aspect ratio (`unpad_image`: the padding rows or columns the
  processor added go), each row of it followed by the learned `image_newline` token; every token
  fills a position of `config.image_token_id`. So an image's count depends on its size:
  `image_tokens(config, (height, width))`, the same arithmetic as the processor's.
- Position ids: 1-D, from 0 at each document's first token, as LLaVA's.

M3 on anyres (M3's own LLaVA-NeXT rule): a scale is k*k, k dividing g. Every crop, the base
image's included, is average-pooled from g x g to k x k *before* the crops are merged; then the
merged grid is (rows * k) x (columns * k), `unpad_image` cuts it with the same image size, the
anyres_max ratio is taken against k, and a newline ends each of its rows. So at scale k*k an
image stands for k*k + r_k * (c_k + 1) tokens, r_k x c_k the unpadded pooled grid; at k = g this
is exactly the stock model's `get_image_features` (tests/unit/test_anyres_families.py). Scales
whose sides divide each other nest (1, 2, 4 on a 4x4 grid): each pooled crop is the pooling of the
next larger one. The unpadding is recomputed at each pooled size with the stock rounding, so the
kept rows nest up to that rounding. Every rank computes the same counts from the same `image_sizes`.

Images of other sizes in one batch: each image is treated as a single-image anyres input (the stock
model's default when `batch_num_images` is not given). `visual_tokens` is the count of a square image at
least as large as the largest pinpoint (the most an image has); the loader's planner reads each image's size
from its header and expands its `<image>` to that image's own count (`image_tokens`,
`mtrain.engine.data.image_token_counter`); a batch's crops are zero-padded to the most crops, as the stock
processor pads them. The task then keeps one count per scale when every image gives the data's count, and
each image's own counts otherwise (`token_layout.ImageGrids`, `scaled_image_features`); a batch whose runs
disagree with its images' sizes is refused, naming the sizes.

MQT (`mode=mqt`, `mtrain/model/mqt_head.py`): a query transformer after the projector reads one image's
stock tokens (the base image's, then the unpadded crops' with their newlines) and gives `mqt_queries`
tokens, at ordinary 1-D positions; every `<image>` then stands for M tokens whatever the image's size
(stacking one batch's features still wants one crop count per batch under MQT). The contrastive task crops each image
by its `image_sizes`, which pair batches carry per side.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from data_pipeline.chat_template import message_text_template
from mtrain.model.anyres import (  # noqa: F401  (re-exported: the family's arithmetic)
    anyres_image_features,
    anyres_scaled_features,
    crop_layout,
    image_tokens,
    max_crops,
    pack_at_scale,
    tower_grid_side,
    unpadded_grid,
)
from mtrain.model.families.base import ModelFamily, tiny_text_sizes, tiny_vision_sizes
from mtrain.model.families.llava import m3_scale_problems

# ChatML, as LLaVA-OneVision's Qwen2 checkpoints render conversations, with `{% generation %}`
# around the assistant's answer, its end-of-turn token and the newline after it (what LLaVA-NeXT's
# `preprocess_qwen` learns), so `return_assistant_tokens_mask` gives the mask training learns.
ONEVISION_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    + message_text_template("<image>")
    + "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- text + '<|im_end|>\n' -}}{%- endgeneration -%}"
    "{%- else -%}{{- text + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
TINY_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]  # for the tiny tower's 16-pixel input


class LlavaOnevisionFamily(ModelFamily):
    model_type = "llava_onevision"
    generates = True
    model_class_path = "transformers:LlavaOnevisionForConditionalGeneration"
    position_ids = "1-D, from 0 at each document's first token; visual tokens take consecutive positions"
    counts_by_image_size = True

    def visual_tokens(self, config: Any) -> int:
        """The count of a square image at least as large as the largest pinpoint (all such squares get
        the largest square pinpoint's crops and no unpadding): what the first cut's data expands to."""
        side = max(max(pinpoint) for pinpoint in config.image_grid_pinpoints)
        return image_tokens(config, (side, side))

    def visual_grid(self, config: Any) -> tuple[int, int] | None:
        return None  # crops, unpadded and with newlines: no single grid

    def m3_grid(self, config: Any) -> tuple[int, int] | None:
        g = tower_grid_side(config)
        return g, g  # every crop's patch grid: M3's scales k*k pool it

    def image_token_id(self, config: Any) -> int:
        return config.image_token_id

    def scale_tokens(self, config: Any, scale: int | None, image_size: tuple[int, int]) -> int:
        return image_tokens(config, image_size, math.isqrt(scale) if scale is not None else None)

    def stand_in_input(
        self, config: Any, grid: tuple[int, int] | None, dtype: Any, device: Any
    ) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        """A blank image of the tower's size, with the base image and the crops its size gives."""
        vision = config.vision_config
        side = vision.image_size
        rows, columns = crop_layout(config, (side, side))
        shape = (1, 1 + rows * columns, vision.num_channels, side, side)
        return torch.zeros(shape, dtype=dtype, device=device), [(side, side)]

    def problems(self, config: Any, tokens: Any, image_size: list[int] | None = None) -> list[str]:
        g = tower_grid_side(config)
        tower, strategy = config.vision_config.model_type, config.vision_feature_select_strategy
        if (tower == "clip_vision_model") != (strategy == "default"):
            return [
                f"a {self.model_type} model whose {tower!r} tower with vision_feature_select_strategy={strategy!r} "
                "gives no bare patch grid: use 'default' for a CLIP tower (drops its CLS), 'full' for SigLIP"
            ]
        if tokens.mode != "m3":
            return []
        return m3_scale_problems((g, g), tokens.scales)

    def scaled_features(
        self, model: Any, pixel_values: torch.Tensor, image_sizes: list[tuple[int, int]], scales: list[int]
    ) -> dict[int, torch.Tensor]:
        """Every image at every scale, (images, tokens at that scale, dim): one tower pass, then M3 per crop."""
        return anyres_scaled_features(model, pixel_values, image_sizes, scales)

    def scaled_image_features(
        self, model: Any, pixel_values: torch.Tensor, image_sizes: list[tuple[int, int]], scales: list[int]
    ) -> dict[int, list[torch.Tensor]]:
        """Every image at every scale, each its own (tokens at that scale, dim): images of other sizes."""
        return anyres_image_features(model, pixel_values, image_sizes, scales)


def tiny_onevision_config(tiny: Any, vocab_size: int, image_token_id: int, pad_token_id: int) -> Any:
    """The tiny preset's LlavaOnevisionConfig: a small Qwen2, a SigLIP tower, anyres up to 2x2 crops."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig  # noqa: PLC0415

    text = Qwen2Config(
        **tiny_text_sizes(tiny, vocab_size),
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(
        **tiny_vision_sizes(tiny),
    )
    pinpoints = [[tiny.image_size * h, tiny.image_size * w] for h, w in ((1, 1), (1, 2), (2, 1), (2, 2))]
    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token: the bare grid
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def tiny_onevision_processor(image_size: int, pinpoints: list[list[int]]) -> Any:
    """OneVision's own anyres preprocessing at the tiny size (the PIL implementation: no torchvision)."""
    from transformers import LlavaOnevisionImageProcessorPil  # noqa: PLC0415

    return LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints, do_pad=False
    )
