"""MQT on the families whose projector stays their own: a query transformer after the family's projector.

LLaVA trains MQT as MQT-LLaVA does, with the query transformer in place of its MLP projector
(`mqt_model.py`, the `mtrain_mqt_llava` family). The other families (qwen2_vl, qwen2_5_vl,
qwen3_vl, llava_next, llava_onevision, gemma3) keep their own projector, whose output is what their language
model was trained to read, and gain MQT's query transformer after it:

    image ─► the family's tower + projector (its `image_features`: Qwen's merged patches, anyres's base
             image and unpadded crops with their newline tokens, Gemma 3's pooled soft tokens)
          ─► query transformer at the language model's width: M learned queries (2-D sin-cos positions)
             cross-attend to those tokens ─► (images, M, width); scale m keeps the first m queries

The keys get no positions of their own: the tokens carry them from their tower (Qwen's 2-D rotary ViT,
SigLIP's and CLIP's learned position embeddings, anyres's newline tokens), and their count and layout
differ per family. Every `<image>` of the data then stands for M tokens, whatever the image's size.

The head is a submodule of the model's inner model (`model.model.mqt_head`), so every task built over
the model (training, `mtrain eval`'s budget views) reads the same weights, DeepSpeed checkpoints hold
it, and the freeze policy and LoRA's `modules_to_save` treat it as part of the projector. Qwen3-VL's
DeepStack sets ride beside the merged tokens on the channel axis; the head reads each set as its own image
with the same queries (`QueryTransformerProjector.read_levels`; why: `families/qwen3_vl.py`).

The export saves the model as its family's class plus the head, registered remote code that stock
transformers loads with `trust_remote_code=True` and no mtrain (`as_mqt_export`, `mqt_families.py`). mtrain reads
such a folder back (`model.path`, `checkpoint.init_from`) as the family's stock model (`stock_config`) with the
folder's trained head attached (`load_exported_head`): the model this module builds, so training goes on as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrain.model.token_scales import QueryTransformerProjector

MQT_HEAD = "mqt_head"  # its module name under the model's inner model
MQT_FIELDS = ("mqt_queries", "mqt_heads", "mqt_scale")  # what an MQT export's config adds to its family's


def attach_mqt_head(model: nn.Module, tokens: Any, dtype: torch.dtype) -> None:
    """Give `model` a fresh query transformer of `tokens` (mqt_queries, mqt_heads) after its projector."""
    if tokens.mqt_architecture != "mtrain":
        raise ValueError(
            f"matryoshka.tokens.mqt_architecture={tokens.mqt_architecture!r} replaces a llava projector; after "
            f"a {model.config.model_type} model's own projector MQT runs mqt_architecture=mtrain"
        )
    width = model.config.get_text_config().hidden_size
    head = QueryTransformerProjector(width, width, tokens.mqt_queries, tokens.mqt_heads, num_patches=0)
    model.model.add_module(MQT_HEAD, head.to(dtype))


def mqt_head(model: nn.Module) -> nn.Module | None:
    """The query transformer `attach_mqt_head` gave `model` (a Hugging Face model, not PEFT's wrapper); None
    when it has none."""
    return getattr(model.model, MQT_HEAD, None)


def as_mqt_export(model: nn.Module, scale: int) -> nn.Module:
    """`model` (a family's stock class with `attach_mqt_head`'s head) as its registered MQT class
    (`mqt_families.py`), sharing every tensor, each image served as the first `scale` queries: what the export
    saves, loadable with `trust_remote_code=True` and no mtrain."""
    from mtrain.model.mqt_families import MQT_EXPORT_CLASSES  # noqa: PLC0415

    head = mqt_head(model)
    if model.config.model_type not in MQT_EXPORT_CLASSES:
        raise ValueError(
            f"MQT after a {model.config.model_type} model's projector has no export class yet (mtrain/model/"
            f"mqt_families.py covers {', '.join(MQT_EXPORT_CLASSES)}); evaluate the checkpoint with mtrain eval"
        )
    config_class, model_class = MQT_EXPORT_CLASSES[model.config.model_type]
    stock = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = config_class(**stock, mqt_queries=head.num_queries, mqt_heads=head.attention.num_heads, mqt_scale=scale)
    with torch.device("meta"):  # the skeleton only: every tensor is the trained model's own
        exported = model_class(config)
    exported.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buffer in model.named_buffers():  # the non-persistent ones (rotary frequencies, query positions) too
        owner, _, leaf = name.rpartition(".")
        setattr(exported.get_submodule(owner), leaf, buffer)
    return exported.eval()


def mqt_export_config(model_type: str) -> type:
    """The config class of the MQT export type `model_type` (`mtrain_mqt_<family>`, mqt_families.py)."""
    from mtrain.model.mqt_families import MQT_EXPORT_CLASSES, MQT_MODEL_TYPE_PREFIX  # noqa: PLC0415

    return MQT_EXPORT_CLASSES[model_type.removeprefix(MQT_MODEL_TYPE_PREFIX)][0]


def stock_config(config: Any) -> Any:
    """An MQT export's config as its family's stock config (`as_mqt_export`'s, undone): what mtrain builds the
    model from, before it attaches the head."""
    from transformers import AutoConfig  # noqa: PLC0415

    from mtrain.model.mqt_families import MQT_MODEL_TYPE_PREFIX  # noqa: PLC0415

    dropped = ("model_type", "architectures", "auto_map", "transformers_version", *MQT_FIELDS)
    fields = {name: value for name, value in config.to_dict().items() if name not in dropped}
    return AutoConfig.for_model(config.model_type.removeprefix(MQT_MODEL_TYPE_PREFIX), **fields)


def load_exported_head(model: nn.Module, folder: Path, tokens: Any, dtype: torch.dtype, path: str) -> None:
    """Attach to `model` (the family's stock model, loaded from the MQT export `folder`) the query transformer of
    `tokens` with the folder's trained weights (`model.mqt_head.*` in its safetensors files); refuses a folder
    without them, whose head would start random."""
    from safetensors import safe_open  # noqa: PLC0415

    prefix = f"model.{MQT_HEAD}."
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            names = [key for key in weights.keys() if key.startswith(prefix)]
            state |= {key.removeprefix(prefix): weights.get_tensor(key) for key in names}
    attach_mqt_head(model, tokens, dtype)
    head = mqt_head(model)
    missing = sorted(set(head.state_dict()) - set(state))
    if missing:
        raise ValueError(
            f"model.path={path!r} is an MQT export whose query transformer lacks {len(missing)} weight(s) ({missing[0]}, "
            "...), which would start random; re-export the checkpoint (mtrain export)"
        )
    head.load_state_dict(state, strict=True)


def mqt_export_types() -> tuple[str, ...]:
    """The `model_type`s whose MQT head the Hugging Face export holds (`mqt_families.py`)."""
    from mtrain.model.mqt_families import MQT_EXPORT_CLASSES  # noqa: PLC0415

    return tuple(MQT_EXPORT_CLASSES)
