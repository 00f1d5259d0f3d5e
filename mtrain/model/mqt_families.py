"""MQT after a family's own projector, as registered Hugging Face model classes: what `mtrain export` saves.

Training attaches MQT's query transformer to the stock model of a family that keeps its own projector
(`mqt_head.py`, at `model.model.mqt_head`). Stock transformers would drop it, so the export saves such a
model as its family's stock class plus the head, under its own `model_type` (`mtrain_mqt_<family>`),
with this file and `token_scales.py` beside the weights and `auto_map` in config.json:

    AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)

loads it without mtrain (as LLaVA's MQT export, `mqt_model.py`). Without `trust_remote_code`
transformers refuses the unknown `model_type`, instead of loading the stock model without its head.

What a class changes in its stock model, and nothing else (the forward, the processor's pixels, the
chat template are the stock ones):
- `get_image_features`: the stock visual tokens of each image (the projector's output: Qwen's merged
  patches, anyres's base image and unpadded crops with their newlines, Gemma 3's pooled soft tokens)
  read by the query transformer; each image then stands for the first `mqt_scale` of its
  `mqt_queries` outputs (the trained scale the export's merged adapters belong to), so a prompt holds
  `mqt_scale` image tokens per image. Qwen3-VL's DeepStack sets are each read by the same queries.
- Qwen's M-RoPE ids (`get_rope_index`): the query tokens take text ids, all three axes the 1-D
  position, as in training (a query is no grid location).
- Gemma 3's query tokens attend to each other both ways (its stock `token_type_ids`), as in training.

This file is copied beside exports: it imports only torch, transformers and (relatively) `token_scales.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Model,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
)

# Relative, not `mtrain.model.token_scales`: the export folder holds both files and no mtrain.
from .token_scales import QueryTransformerProjector, init_query_transformer

MQT_MODEL_TYPE_PREFIX = "mtrain_mqt_"
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def read_by_queries(head: QueryTransformerProjector, images: Any, scale: int) -> Any:
    """Each image's visual tokens read by the queries, the first `scale` kept: a (images, tokens, width) tensor
    gives (images, scale, width); a tuple or list of (tokens, width) per image gives the same kind of sequence."""
    if isinstance(images, torch.Tensor):
        return head(images)[:, :scale]
    if len({tuple(image.shape) for image in images}) == 1:  # one call for images of one size
        return type(images)(head(torch.stack(list(images)))[:, :scale].unbind(0))
    return type(images)(head(image[None])[0, :scale] for image in images)


class MQTHeadMixin:
    """The inner model's changes (the module docstring): its head reads every image's stock visual tokens."""

    config: Any

    def add_mqt_head(self) -> None:
        width = self.config.get_text_config().hidden_size
        self.mqt_head = QueryTransformerProjector(
            width, width, self.config.mqt_queries, self.config.mqt_heads, num_patches=0
        )

    def family_image_features(self, *args: Any, **kwargs: Any) -> Any:
        """The family's own visual tokens of each image (its stock `get_image_features`), which the head reads:
        what `mtrain.infer` reads with the head itself, at any query count."""
        return super().get_image_features(*args, **kwargs)

    def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
        output = self.family_image_features(*args, **{**kwargs, "return_dict": True})
        scale = self.config.mqt_scale
        output.pooler_output = read_by_queries(self.mqt_head, output.pooler_output, scale)
        if getattr(output, "deepstack_features", None) is not None:  # Qwen3-VL: each set read by the same queries
            output.deepstack_features = [read_by_queries(self.mqt_head, s, scale) for s in output.deepstack_features]
        return output

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Also the head's queries and fixed position buffers, which transformers builds empty (meta device)
        when loading; `init.*` skips whatever the checkpoint loaded."""
        super()._init_weights(module)
        if isinstance(module, QueryTransformerProjector):
            init_query_transformer(module)


class TextIdsForQueries:
    """Qwen's inner-model change: the query tokens take text M-RoPE ids (a query is no grid location)."""

    def get_rope_index(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, *args: Any, **kwargs: Any):
        # The image type (1) read as text (0); videos keep theirs.
        text = torch.where(mm_token_type_ids == 1, torch.zeros_like(mm_token_type_ids), mm_token_type_ids)
        return super().get_rope_index(input_ids, text, *args, **kwargs)


def mqt_classes(family: str, config_class: type, model_class: type, generation_class: type) -> tuple[type, ...]:
    """(config, inner model, ForConditionalGeneration) classes of `family` with the MQT head, registered so that
    `save_pretrained` writes `auto_map` and copies this file."""
    stem = f"MQT{generation_class.__name__.removesuffix('ForConditionalGeneration')}"

    @strict
    class Config(config_class):
        model_type = MQT_MODEL_TYPE_PREFIX + family

        mqt_queries: int = 64  # M, the head's learned queries (`matryoshka.tokens.mqt_queries` of the run)
        mqt_heads: int = 4  # the head's attention heads (`matryoshka.tokens.mqt_heads`)
        mqt_scale: int = 64  # image tokens per image: the first mqt_scale query outputs (the export's default scale)

    mixins = (MQTHeadMixin, TextIdsForQueries) if family in QWEN_TYPES else (MQTHeadMixin,)

    class Model(*mixins, model_class):
        config_class = Config

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.add_mqt_head()
            self.post_init()

    class ForConditionalGeneration(generation_class):
        config_class = Config

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.model = Model(config)  # in place of the stock one (built on the meta device when loading)
            self.post_init()

    for made, suffix in ((Config, "Config"), (Model, "Model"), (ForConditionalGeneration, "ForConditionalGeneration")):
        made.__name__ = made.__qualname__ = stem + suffix
    Config.register_for_auto_class()
    ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    return Config, Model, ForConditionalGeneration


# Module-level names: `auto_map` in an export's config.json points at them.
MQTQwen2VLConfig, MQTQwen2VLModel, MQTQwen2VLForConditionalGeneration = mqt_classes(
    "qwen2_vl", Qwen2VLConfig, Qwen2VLModel, Qwen2VLForConditionalGeneration
)
MQTQwen2_5_VLConfig, MQTQwen2_5_VLModel, MQTQwen2_5_VLForConditionalGeneration = mqt_classes(
    "qwen2_5_vl", Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLForConditionalGeneration
)
MQTQwen3VLConfig, MQTQwen3VLModel, MQTQwen3VLForConditionalGeneration = mqt_classes(
    "qwen3_vl", Qwen3VLConfig, Qwen3VLModel, Qwen3VLForConditionalGeneration
)
MQTLlavaNextConfig, MQTLlavaNextModel, MQTLlavaNextForConditionalGeneration = mqt_classes(
    "llava_next", LlavaNextConfig, LlavaNextModel, LlavaNextForConditionalGeneration
)
MQTLlavaOnevisionConfig, MQTLlavaOnevisionModel, MQTLlavaOnevisionForConditionalGeneration = mqt_classes(
    "llava_onevision", LlavaOnevisionConfig, LlavaOnevisionModel, LlavaOnevisionForConditionalGeneration
)
MQTGemma3Config, MQTGemma3Model, MQTGemma3ForConditionalGeneration = mqt_classes(
    "gemma3", Gemma3Config, Gemma3Model, Gemma3ForConditionalGeneration
)

# The stock `model_type` a trained model has -> its export classes (config, ForConditionalGeneration).
MQT_EXPORT_CLASSES: dict[str, tuple[type, type]] = {
    "qwen2_vl": (MQTQwen2VLConfig, MQTQwen2VLForConditionalGeneration),
    "qwen2_5_vl": (MQTQwen2_5_VLConfig, MQTQwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (MQTQwen3VLConfig, MQTQwen3VLForConditionalGeneration),
    "llava_next": (MQTLlavaNextConfig, MQTLlavaNextForConditionalGeneration),
    "llava_onevision": (MQTLlavaOnevisionConfig, MQTLlavaOnevisionForConditionalGeneration),
    "gemma3": (MQTGemma3Config, MQTGemma3ForConditionalGeneration),
}
