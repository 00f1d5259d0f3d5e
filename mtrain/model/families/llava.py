"""LLaVA-1.5 (`model_type == "llava"`): a fixed-resolution CLIP or SigLIP tower, an MLP projector.

- Images -> grids: each image is one (image_size / patch_size)^2 patch grid. The tower emits that
  grid, after a CLS token for CLIP (SigLIP has none); `vision_feature_select_strategy="default"`
  drops the first token (CLIP's CLS), "full" keeps all. So an `<image>` stands for the grid
  (CLIP default, SigLIP full), the grid plus CLS (CLIP full) or the grid less one patch (SigLIP
  default, which no grid-pooling scale can use).
- Projector: `model.model.multi_modal_projector`, vision width (times the number of selected
  layers) to the language model's width.
- Sequence: the visual tokens fill the positions of `config.image_token_id`, each `<image>`
  expanded to `visual_tokens` of them in the data.
- Position ids: 1-D, counting from 0 at each document's first token (a packed row restarts them
  per document); visual tokens take ordinary consecutive positions.
"""

from __future__ import annotations

from typing import Any

from mtrain.model.families.base import ModelFamily, UnsupportedModelError, tiny_text_sizes, tiny_vision_sizes

# Tokens a tower emits before its patch grid, by the vision config's model_type.
TOWER_PREFIX_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}


def tower_tokens(vision_config: Any) -> int:
    """Tokens the vision tower emits per image: its patch grid plus its CLS token, if it has one."""
    tower = vision_config.model_type
    if tower not in TOWER_PREFIX_TOKENS:
        raise UnsupportedModelError(
            f"a llava model with a {tower!r} vision tower; mtrain knows the towers {', '.join(TOWER_PREFIX_TOKENS)}"
        )
    side = vision_config.image_size // vision_config.patch_size
    return side * side + TOWER_PREFIX_TOKENS[tower]


class LlavaFamily(ModelFamily):
    model_type = "llava"
    generates = True
    model_class_path = "transformers:LlavaForConditionalGeneration"
    position_ids = "1-D, from 0 at each document's first token; visual tokens take consecutive positions"

    def visual_tokens(self, config: Any) -> int:
        dropped = 1 if config.vision_feature_select_strategy == "default" else 0
        return tower_tokens(config.vision_config) - dropped

    def visual_grid(self, config: Any) -> tuple[int, int] | None:
        side = config.vision_config.image_size // config.vision_config.patch_size
        return (side, side) if self.visual_tokens(config) == side * side else None

    def image_token_id(self, config: Any) -> int:
        value = getattr(config, "image_token_id", None)
        return value if value is not None else config.image_token_index

    def problems(self, config: Any, tokens: Any, image_size: list[int] | None = None) -> list[str]:
        if image_size:
            side = config.vision_config.image_size
            return [
                f"model.image_size={image_size} is for Qwen models; a llava tower takes {side}x{side} images, drop it"
            ]
        try:
            visual = self.visual_tokens(config)
        except UnsupportedModelError as exc:
            return [str(exc)]
        if tokens.mode != "m3":
            return []
        grid = self.visual_grid(config)
        if grid is None:
            strategy = config.vision_feature_select_strategy
            return [
                f"matryoshka.tokens.mode=m3 pools the patch grid, but this model's {visual} visual tokens are not one "
                f"(vision_feature_select_strategy={strategy!r} with a {config.vision_config.model_type!r} tower); "
                "M3 needs the bare grid: 'default' for a CLIP tower, 'full' for a SigLIP tower"
            ]
        return m3_scale_problems(grid, tokens.scales)


def m3_scale_problems(grid: tuple[int, int], scales: list[int]) -> list[str]:
    """M3 pools a square grid by one factor per side: scale k*k needs k to divide the side."""
    rows, columns = grid
    if rows != columns:
        return [f"matryoshka.tokens.scales: M3 pools a square grid here, but this model's grid is {rows}x{columns}"]
    bad = [s for s in scales if round(s**0.5) ** 2 != s or rows % round(s**0.5)]
    if bad:
        return [
            f"matryoshka.tokens.scales: {bad} do not fit this model's {rows}x{columns} grid: each scale must be "
            f"k*k with k dividing {rows} (e.g. {[d * d for d in range(1, rows + 1) if rows % d == 0]})"
        ]
    return []


def tiny_llava_config(tiny: Any, vocab_size: int, image_token_id: int, pad_token_id: int) -> Any:
    """The tiny preset's LlavaConfig: a small Llama and a CLIP or SigLIP tower (`tiny.vision_tower`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig  # noqa: PLC0415

    text = LlamaConfig(
        **tiny_text_sizes(tiny, vocab_size),
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    tower = CLIPVisionConfig if tiny.vision_tower == "clip" else SiglipVisionConfig
    vision = tower(
        **tiny_vision_sizes(tiny),
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image_token_id,
        # Keep the bare patch grid: drop CLIP's CLS token; SigLIP has none to drop.
        vision_feature_select_strategy="default" if tiny.vision_tower == "clip" else "full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )


def tiny_image_processor(image_size: int, vision_tower: str = "clip") -> Any:
    """The tower's own preprocessing at the tiny size (the PIL implementations: the default ones want
    torchvision, which the CPU stack leaves out)."""
    if vision_tower == "siglip":
        from transformers import SiglipImageProcessorPil  # noqa: PLC0415

        return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    from transformers import CLIPImageProcessorPil  # noqa: PLC0415

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


# `mqt_model.MQTLlavaConfig.model_type`, spelled out: mqt_model imports transformers' LLaVA, which
# model checks leave to the functions that build a model (commands that fail early never import it).
MQT_MODEL_TYPE = "mtrain_mqt_llava"


class MQTLlavaFamily(LlavaFamily):
    """mtrain's MQT LLaVA (`mtrain/model/mqt_model.py`): LLaVA whose projector is MQT's query transformer,
    so an `<image>` stands for the `mqt_queries` query outputs (m of them at scale m: a prefix)."""

    model_type = MQT_MODEL_TYPE
    model_class_path = "mtrain.model.mqt_model:MQTLlavaForConditionalGeneration"

    def visual_tokens(self, config: Any) -> int:
        return config.mqt_queries

    def visual_grid(self, config: Any) -> tuple[int, int] | None:
        return None  # query outputs, not a patch grid

    def problems(self, config: Any, tokens: Any, image_size: list[int] | None = None) -> list[str]:
        return (
            []
            if tokens.mode == "mqt"
            else [
                f"this is an MQT model (each image becomes {config.mqt_queries} query tokens); "
                "set matryoshka.tokens.mode=mqt to train or evaluate it"
            ]
        )
