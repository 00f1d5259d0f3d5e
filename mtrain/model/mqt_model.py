"""LLaVA with MQT's query-transformer projector, as a registered Hugging Face model class.

Saving the model (`save_pretrained`, as `mtrain export` does) copies this file and `token_scales.py`
into the folder and writes `auto_map` into its config.json, so stock transformers loads the trained
projector with

    AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)

Without `trust_remote_code` stock transformers refuses the unknown `model_type` instead of loading
LLaVA's MLP projector with random weights. The folder's `<image>` then stands for `mqt_queries`
tokens, the full budget.

This file is copied beside exports: it imports only torch, transformers and (relatively) the
projectors in `token_scales.py`, never mtrain.
"""

from __future__ import annotations

import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoModel, LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers import initialization as init
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

# Relative, not `mtrain.model.token_scales`: the export folder holds both files and no mtrain.
from .token_scales import (
    MQTLlavaResampler,
    QueryTransformerProjector,
    init_query_transformer,
    sincos_2d_column_first,
)

MQT_MODEL_TYPE = "mtrain_mqt_llava"


@strict
class MQTLlavaConfig(LlavaConfig):
    """LLaVA's config plus the MQT projector's shape (`matryoshka.tokens.mqt_*` of the run that trained it)."""

    model_type = MQT_MODEL_TYPE

    mqt_queries: int = 64
    mqt_heads: int = 4
    mqt_architecture: Literal["mtrain", "mqt_llava"] = "mtrain"


def visual_tokens_per_image(llava_config: LlavaConfig) -> int:
    """Tokens the vision tower hands the projector per image: the patch grid, after CLIP's CLS token
    ('default' drops the first token). mtrain's llava family counts the same; this file stands alone in exports."""
    vision = llava_config.vision_config
    grid = (vision.image_size // vision.patch_size) ** 2
    cls = 1 if vision.model_type == "clip_vision_model" else 0
    return grid + cls - (1 if llava_config.vision_feature_select_strategy == "default" else 0)


def mqt_projector(config: MQTLlavaConfig) -> nn.Module:
    """The query transformer of `config.mqt_architecture`; <image> then stands for `mqt_queries` tokens."""
    vision_dim, text_dim = config.vision_config.hidden_size, config.text_config.hidden_size
    if config.mqt_architecture == "mqt_llava":
        return MQTLlavaResampler(vision_dim, text_dim, config.mqt_queries, config.mqt_heads)
    patches = visual_tokens_per_image(config)
    return QueryTransformerProjector(vision_dim, text_dim, config.mqt_queries, config.mqt_heads, patches)


class MQTLlavaModel(LlavaModel):
    config_class = MQTLlavaConfig

    def __init__(self, config: MQTLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)  # LlavaModel's own would build the MLP projector first
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = mqt_projector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Also the projectors' own parameters and fixed position buffers, which transformers builds empty
        (meta device) when a folder lacks them. `init.*` skips whatever a checkpoint loaded."""
        super()._init_weights(module)
        if isinstance(module, QueryTransformerProjector):
            init_query_transformer(module)
        elif isinstance(module, MQTLlavaResampler):
            side, vision_dim = math.isqrt(module.num_queries), module.pos_embed.shape[-1]
            init.trunc_normal_(module.query, std=0.02)
            init.copy_(module.pos_embed, sincos_2d_column_first(side, vision_dim))
            init.normal_(module.proj, std=self.config.text_config.hidden_size**-0.5)


class MQTLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MQTLlavaConfig

    def __init__(self, config: MQTLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = MQTLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# save_pretrained then copies this file beside the weights and writes config.json's auto_map.
MQTLlavaConfig.register_for_auto_class()
MQTLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
