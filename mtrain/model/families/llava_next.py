"""LLaVA-NeXT (`model_type == "llava_next"`, LLaVA-1.6): OneVision's anyres layout on a CLIP tower.

Everything in `llava_onevision.py` holds here (crops from `image_grid_pinpoints`, the base
image first, unpadding, a newline after each merged row, M3 pooling every crop before the merge),
with two differences: the tower is CLIP, whose CLS token `vision_feature_select_strategy="default"`
drops, and there is no `anyres_max` shrink of a large merged grid (the config has no
`vision_aspect_ratio`). Position ids: 1-D, as LLaVA's. The tiny preset's tokenizer has LLaVA-1.5's
Vicuna shape, as llava-v1.6-vicuna's conversations.
"""

from __future__ import annotations

from typing import Any

from mtrain.model.families.llava_onevision import LlavaOnevisionFamily


class LlavaNextFamily(LlavaOnevisionFamily):
    model_type = "llava_next"
    model_class_path = "transformers:LlavaNextForConditionalGeneration"


def tiny_next_config(tiny: Any, vocab_size: int, image_token_id: int, pad_token_id: int) -> Any:
    """The tiny preset's LlavaNextConfig: the tiny llava's Llama and CLIP tower, anyres up to 2x2 crops."""
    from transformers import LlavaNextConfig  # noqa: PLC0415

    from mtrain.model.families.llava import tiny_llava_config  # noqa: PLC0415

    llava = tiny_llava_config(tiny, vocab_size, image_token_id, pad_token_id)
    pinpoints = [[tiny.image_size * h, tiny.image_size * w] for h, w in ((1, 1), (1, 2), (2, 1), (2, 2))]
    return LlavaNextConfig(
        text_config=llava.text_config,
        vision_config=llava.vision_config,
        image_token_id=image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy=llava.vision_feature_select_strategy,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def tiny_next_processor(image_size: int, pinpoints: list[list[int]]) -> Any:
    """LLaVA-NeXT's own anyres preprocessing at the tiny size (the PIL implementation: no torchvision)."""
    from transformers import LlavaNextImageProcessorPil  # noqa: PLC0415

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        do_pad=False,
    )
