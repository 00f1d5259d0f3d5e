"""Model families: what mtrain must know about one kind of multimodal model, keyed by `config.model_type`.

A family answers, for its transformers model class:
- how images become per-image visual-token grids (`visual_grid`: rows x columns of projected
  tokens, or None when the tokens are no grid) and how many tokens one `<image>` stands for
  (`visual_tokens`), both from the tower's real output;
- how the projector maps them: the family's own model class (MQT's query transformer in place of
  LLaVA's projector is a family of its own, `mtrain_mqt_llava`; the other families keep their projector
  and MQT's query transformer reads its output, `mtrain/model/mqt_head.py`; their MQT exports,
  `mtrain_mqt_<family>`, are families too, read back as the family with the head: `mqt_export.py`);
- where they go in the sequence (`image_token_id`: the id whose positions the visual tokens fill;
  `splice_visual` puts them there and returns what else of them the language model takes, such as
  Qwen3-VL's DeepStack sets, and `language_model` is the module the tasks call with the result);
- how position ids are made (`position_ids`: a one-line rule the packer and the task follow);
- for M3, how many tokens an image of a given size keeps at a scale (`scale_tokens`), every image at
  every scale from one vision pass when the task cannot pool one grid itself (`scaled_features`,
  anyres), and the grid M3 pools (`m3_grid`).
Chat templates come with the tokenizer: a loaded folder's own, or the tiny preset's
(`mtrain.model.tokenizer.build_tiny_tokenizer`), or `model.chat_template`.
`problems(config, tokens)` lists what makes a config unusable with a model, checked before any
process group forms (`mtrain/launch/model_checks.py`).

To add a family: a module here with one `ModelFamily` subclass, and one entry in `FAMILIES`.
"""

from __future__ import annotations

from mtrain.model.families.base import ModelFamily, UnsupportedModelError
from mtrain.model.families.gemma3 import Gemma3Family
from mtrain.model.families.llava import MQT_MODEL_TYPE, LlavaFamily, MQTLlavaFamily
from mtrain.model.families.llava_next import LlavaNextFamily
from mtrain.model.families.llava_onevision import LlavaOnevisionFamily
from mtrain.model.families.mqt_export import MQT_EXPORT_PREFIX, mqt_export_family
from mtrain.model.families.qwen2_vl import Qwen2_5_VLFamily, Qwen2VLFamily
from mtrain.model.families.qwen3_vl import Qwen3VLFamily

__all__ = [
    "FAMILIES",
    "MQT_EXPORT_PREFIX",
    "MQT_MODEL_TYPE",
    "SUPPORTED_MODEL_TYPES",
    "ModelFamily",
    "UnsupportedModelError",
    "family_for",
    "is_mqt_export",
]

# The families that keep their own projector, and the registered class of their MQT exports (mqt_families.py).
OWN_PROJECTOR_FAMILIES: dict[ModelFamily, str] = {
    LlavaOnevisionFamily(): "MQTLlavaOnevisionForConditionalGeneration",
    LlavaNextFamily(): "MQTLlavaNextForConditionalGeneration",
    Qwen2VLFamily(): "MQTQwen2VLForConditionalGeneration",
    Qwen2_5_VLFamily(): "MQTQwen2_5_VLForConditionalGeneration",
    Qwen3VLFamily(): "MQTQwen3VLForConditionalGeneration",
    Gemma3Family(): "MQTGemma3ForConditionalGeneration",
}
FAMILIES: dict[str, ModelFamily] = {
    family.model_type: family
    for family in (
        LlavaFamily(),
        MQTLlavaFamily(),
        *OWN_PROJECTOR_FAMILIES,
        *(mqt_export_family(family, export) for family, export in OWN_PROJECTOR_FAMILIES.items()),
    )
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def family_for(model_type: str, where: str = "the model") -> ModelFamily:
    """The family of `model_type`; an UnsupportedModelError naming the supported ones otherwise."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"{where} is a {model_type!r} model; mtrain supports the model families "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Convert it to one of them or choose a model of a supported family"
        )
    return family


def is_mqt_export(model_type: str) -> bool:
    """Whether `model_type` is an MQT export of a family that keeps its own projector (`mqt_export.py`)."""
    return model_type.startswith(MQT_EXPORT_PREFIX) and model_type != MQT_MODEL_TYPE
