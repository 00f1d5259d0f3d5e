"""Build the MLLM: the tiny preset or a local Hugging Face folder, sharded at construction.

Under ZeRO-3 the caller passes the DeepSpeed config; an `HfDeepSpeedConfig` kept alive on the
returned `BuiltModel` makes transformers construct (or load) every parameter already
partitioned, so no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrain.config.schema import ModelConfig, TokenScalesConfig
from mtrain.launch.distributed import print0
from mtrain.model.families import MQT_MODEL_TYPE, SUPPORTED_MODEL_TYPES, ModelFamily, family_for, is_mqt_export
from mtrain.model.families.gemma3 import (
    build_tiny_gemma3_tokenizer,
    start_projection,
    tiny_gemma3_config,
    tiny_gemma3_image_processor,
)
from mtrain.model.families.llava import tiny_image_processor, tiny_llava_config
from mtrain.model.families.llava_next import tiny_next_config, tiny_next_processor
from mtrain.model.families.llava_onevision import (
    CHATML_TOKENS,
    ONEVISION_CHAT_TEMPLATE,
    tiny_onevision_config,
    tiny_onevision_processor,
)
from mtrain.model.families.qwen2_vl import (
    FixedSizeImageProcessor,
    NativeSizeImageProcessor,
    Qwen2VLFamily,
    build_tiny_qwen_tokenizer,
    pooling_multiple,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_vl_config,
    tiny_qwen_image_processor,
)
from mtrain.model.families.qwen3_vl import build_tiny_qwen3_tokenizer, tiny_qwen3_vl_config
from mtrain.model.mqt_head import (
    MQT_HEAD,
    attach_mqt_head,
    load_exported_head,
    mqt_export_config,
    mqt_head,
    stock_config,
)
from mtrain.model.scale_lora import ScaleRouting, adapter_names, attach_scale_lora
from mtrain.model.token_scales import reference_factor
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer, pad_with_eos_or_unk
from mtrain.model.varlen_attention import VARLEN_SDPA, register_varlen_sdpa

# Loading code never reaches a hub: everything comes from the preset or a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A LLaVA folder's weight names (the layout `LlavaForConditionalGeneration.save_pretrained` writes) as
# the MQT class names them; transformers applies LLaVA's own renaming only to the `llava` model type.
LLAVA_TO_MQT_KEYS = {
    r"^language_model\.lm_head": "lm_head",
    r"^language_model\.model": "model.language_model",
    r"^vision_tower": "model.vision_tower",
}

__all__ = ["MQT_MODEL_TYPE", "SUPPORTED_MODEL_TYPES", "build_model", "tiny_image_processor", "tiny_llava_config"]


@dataclass
class BuiltModel:
    model: nn.Module
    tokenizer: Any
    image_processor: Any
    visual_tokens: int  # tokens each <image> expands to in the data: the grid (M3) or M queries (MQT)
    image_token_id: int
    source: str
    family: ModelFamily | None = None  # what mtrain knows about the model's kind (mtrain/model/families)
    # (rows, columns) of every image's visual tokens when not a square (Qwen2-VL's merged grid); None: square.
    visual_grid: tuple[int, int] | None = None
    # Row routing of scale-specific LoRA adapters; None without them.
    scale_routing: ScaleRouting | None = None
    # Parameter elements right after construction, before adapters (see `parameter_elements`).
    constructed_elements: dict[str, int] = field(default_factory=dict)
    # Keeps transformers' ZeRO-3 integration switched on while the model lives.
    zero3_context: Any = field(default=None, repr=False)


def attention_implementation(requested: str) -> str:
    """`requested`, or for auto: flash_attention_2 when flash-attn imports on a GPU, else sdpa.

    mtrain_varlen_sdpa (packed rows' documents attended one by one through sdpa's causal kernel) is
    chosen by name only: on the CPU it computes only each document's block, but at tiny width its one
    call per document costs more than it saves (benchmarks/RESULTS.md, issue 20's note)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401, PLC0415

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def family_attention(family: ModelFamily, attn: str) -> str:
    """`attn`, or SDPA where the family's attention is more than causal within documents (Gemma 3's
    bidirectional image blocks), which flash_attention_2 and mtrain_varlen_sdpa compute alone (said on rank 0)."""
    if attn not in ("flash_attention_2", VARLEN_SDPA) or family.flash_attention:
        return attn
    print0(f"a {family.model_type} model does not run {attn} (its image attention needs a mask); using sdpa")
    return "sdpa"


def visual_tokens_per_image(config: Any) -> int:
    """Tokens each <image> stands for in the language model, as the model's family counts them
    (M queries for an MQT model, the tower's real output otherwise)."""
    return family_for(config.model_type).visual_tokens(config)


def mqt_llava_config(llava_config: Any, tokens: TokenScalesConfig) -> Any:
    """`llava_config` with the MQT projector of `tokens` (mqt_queries, mqt_heads, mqt_architecture)."""
    from mtrain.model.mqt_model import MQTLlavaConfig  # noqa: PLC0415

    fields = llava_config.to_dict()
    for name in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(name, None)
    return MQTLlavaConfig(
        **fields,
        mqt_queries=tokens.mqt_queries,
        mqt_heads=tokens.mqt_heads,
        mqt_architecture=tokens.mqt_architecture,
    )


def load_model_config(path: str | Path) -> Any:
    """The config of a local model folder: its family's, or mtrain's MQT LLaVA or MQT export of a family (with
    mtrain's own classes: no remote code run)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from mtrain.model.mqt_model import MQTLlavaConfig  # noqa: PLC0415

    folder = Path(path)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type == MQT_MODEL_TYPE:
        return MQTLlavaConfig.from_pretrained(folder, local_files_only=True)
    if is_mqt_export(model_type):
        return mqt_export_config(model_type).from_pretrained(folder, local_files_only=True)
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    zero3_ds_config: dict | None,
    seed: int,
    tokens: TokenScalesConfig | None = None,
    config_only: bool = False,
) -> BuiltModel:
    """Build or load the model described by `cfg`, partitioned under ZeRO-3 when a config is given.

    With `tokens.mode == "mqt"` a LLaVA model is `MQTLlavaForConditionalGeneration`, LLaVA with the MQT query
    transformer as projector (its trained weights from an MQT folder, fresh on a LLaVA base); any other
    family gets a fresh query transformer after its own projector (`mtrain/model/mqt_head.py`); with a
    scale-specific `lora.strategy` one PEFT adapter per scale is attached. `config_only` builds a
    local model from its config.json alone (no weights, tokenizer or image processor read): called
    under `torch.device("meta")` it gives the exact parameter layout of a 7B model in seconds.
    """
    tokens = tokens or TokenScalesConfig()
    from transformers.integrations import HfDeepSpeedConfig  # noqa: PLC0415

    zero3_context = HfDeepSpeedConfig(zero3_ds_config) if zero3_ds_config else None
    attn = attention_implementation(cfg.attn_implementation)
    if attn == VARLEN_SDPA:
        register_varlen_sdpa()
    torch.manual_seed(seed)  # identical initial weights (and LoRA init) on every rank
    if cfg.path:
        built = _load_local(cfg.path, dtype, attn, tokens, config_only, cfg.image_size, cfg.image_pixels)
    elif cfg.preset in TINY_QWEN_CONFIGS:
        built = _tiny_qwen(cfg, dtype, attn, tokens)
    elif cfg.preset == "tiny-gemma3":
        built = _tiny_gemma3(cfg, dtype, attn, seed)
    else:
        tokenizer, llava_config, image_processor = tiny_preset(cfg)
        if tokens.mode == "mqt" and llava_config.model_type == "llava":
            llava_config = mqt_llava_config(llava_config, tokens)  # the mtrain_mqt_llava family
        family = family_for(llava_config.model_type)
        llava_config._attn_implementation = family_attention(family, attn)
        model = family.model_class()._from_config(llava_config, dtype=dtype)
        built = BuiltModel(
            model=model,
            tokenizer=tokenizer,
            image_processor=image_processor,
            visual_tokens=family.visual_tokens(llava_config),
            image_token_id=family.image_token_id(llava_config),
            source=f"preset:{cfg.preset}",
            family=family,
        )
    if cfg.chat_template and built.tokenizer is not None:
        built.tokenizer.chat_template = cfg.chat_template  # rendered by the loader, saved by the export
    parts = built.family.part_names
    if tokens.mode == "mqt" and built.family.model_type != MQT_MODEL_TYPE:
        # The other families keep their projector; MQT's query transformer reads its output (an MQT export's
        # folder brought its trained one).
        if mqt_head(built.model) is None:
            attach_mqt_head(built.model, tokens, dtype)
        built.visual_tokens = tokens.mqt_queries  # every <image> stands for M query tokens
        parts = {**parts, "mqt_head": MQT_HEAD}
    built.constructed_elements = parameter_elements(built.model)
    built.model, built.scale_routing = attach_training_parts(built.model, cfg, tokens, parts)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(built)
    built.zero3_context = zero3_context
    return built


def attach_training_parts(
    model: nn.Module, cfg: ModelConfig, tokens: TokenScalesConfig, parts: dict[str, str] = ModelFamily.part_names
) -> tuple[nn.Module, Any]:
    """(model, scale routing or None): the LoRA adapters (one shared, or one per scale) or, without LoRA, the
    freeze policy, on the family's `parts`. Also what `mtrain plan` applies to a model it lays out."""
    if not cfg.lora.enabled:
        apply_freeze_policy(model, cfg, parts)
        return model, None
    # PEFT freezes the base and trains the adapters plus `modules_to_save`, so the saved
    # adapter alone rebuilds the trained model on top of the original base.
    if tokens.mode != "none" and cfg.lora.strategy != "shared":
        names = adapter_names(cfg.lora.strategy, tokens.scales)
        configs = [peft_lora_config(cfg, with_modules_to_save=i == 0, parts=parts) for i in range(len(names))]
        return attach_scale_lora(model, configs, names)
    return attach_lora(model, cfg, parts), None


# The Qwen tiny presets and the functions that make each one's config and tokenizer (its chat template).
TINY_QWEN_CONFIGS = {
    "tiny-qwen2-vl": tiny_qwen2_vl_config,
    "tiny-qwen2.5-vl": tiny_qwen2_5_vl_config,
    "tiny-qwen3-vl": tiny_qwen3_vl_config,
}
TINY_QWEN_TOKENIZERS = {"tiny-qwen3-vl": build_tiny_qwen3_tokenizer}  # the others: Qwen2-VL's template


def tiny_qwen_tokenizer(preset: str) -> Any:
    """The tokenizer of the Qwen tiny preset `preset`: Qwen's tokens, that model's chat template."""
    return TINY_QWEN_TOKENIZERS.get(preset, build_tiny_qwen_tokenizer)()


def preset_config(cfg: ModelConfig) -> tuple[Any, Any]:
    """(tokenizer, model config) of the built-in preset `cfg.preset`, shaped by `cfg.tiny`; no weights."""
    if cfg.preset in TINY_QWEN_CONFIGS:
        tokenizer = tiny_qwen_tokenizer(cfg.preset)
        return tokenizer, TINY_QWEN_CONFIGS[cfg.preset](cfg.tiny, (len(tokenizer) + 63) // 64 * 64, tokenizer)
    if cfg.preset == "tiny-gemma3":
        tokenizer = build_tiny_gemma3_tokenizer()
        return tokenizer, tiny_gemma3_config(cfg.tiny, (len(tokenizer) + 63) // 64 * 64, tokenizer)
    tokenizer, config, _ = tiny_preset(cfg)
    return tokenizer, config


def _tiny_qwen(cfg: ModelConfig, dtype: torch.dtype, attn: str, tokens: TokenScalesConfig) -> BuiltModel:
    """A tiny Qwen preset: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model from `cfg.tiny`, a Qwen-shaped tokenizer,
    Qwen's image processor at the square tiny.image_size (or at native resolution, `model.image_pixels`)."""
    tokenizer, config = preset_config(cfg)
    family = family_for(config.model_type)
    config._attn_implementation = family_attention(family, attn)
    model = family.model_class()._from_config(config, dtype=dtype)
    if cfg.image_pixels:
        from transformers import Qwen2VLImageProcessorPil  # noqa: PLC0415

        stock = Qwen2VLImageProcessorPil(
            patch_size=cfg.tiny.patch_size, merge_size=2, temporal_patch_size=2,
            min_pixels=cfg.image_pixels[0], max_pixels=cfg.image_pixels[1],
        )  # fmt: skip
        processor, reference = native_processor(stock, cfg.image_pixels, tokens)
        return BuiltModel(
            model, tokenizer, processor, reference, family.image_token_id(config), f"preset:{cfg.preset}", family
        )
    processor = tiny_qwen_image_processor(cfg.tiny.image_size, cfg.tiny.patch_size)
    rows, columns = processor.merged_grid
    return BuiltModel(
        model=model,
        tokenizer=tokenizer,
        image_processor=processor,
        visual_tokens=rows * columns,
        image_token_id=family.image_token_id(config),
        source=f"preset:{cfg.preset}",
        family=family,
        visual_grid=(rows, columns),
    )


def native_processor(
    stock: Any, image_pixels: list[int], tokens: TokenScalesConfig
) -> tuple[NativeSizeImageProcessor, int]:
    """Qwen's `stock` image processor at native resolution within `image_pixels` [min, max], its sides multiples
    of every M3 pooling factor, and the reference grid's token count (max_pixels / (patch * merge)^2) that M3
    scales are written on (each image's own count, `NativeSizeImageProcessor.size_tokens`, is what the loader
    expands its `<image>` to; this reference count is every image's only where no size is known)."""
    reference = image_pixels[1] // (stock.patch_size * stock.merge_size) ** 2
    scales = tokens.scales if tokens.mode == "m3" else []
    pooling = pooling_multiple([reference_factor(reference, s) for s in scales])
    return NativeSizeImageProcessor(stock, image_pixels[0], image_pixels[1], pooling), reference


def tiny_preset(cfg: ModelConfig) -> tuple[Any, Any, Any]:
    """(tokenizer, model config, image processor) of the built-in preset `cfg.preset`, shaped by `cfg.tiny`."""
    if cfg.preset == "tiny-llava-onevision":
        tokenizer = build_tiny_tokenizer(chat_template=ONEVISION_CHAT_TEMPLATE, turn_tokens=CHATML_TOKENS)
        vocab_size = (len(tokenizer) + 63) // 64 * 64
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        config = tiny_onevision_config(cfg.tiny, vocab_size, image_token_id, tokenizer.pad_token_id)
        return tokenizer, config, tiny_onevision_processor(cfg.tiny.image_size, config.image_grid_pinpoints)
    tokenizer = build_tiny_tokenizer()
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    if cfg.preset == "tiny-llava-next":
        config = tiny_next_config(
            cfg.tiny, vocab_size, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id
        )
        return tokenizer, config, tiny_next_processor(cfg.tiny.image_size, config.image_grid_pinpoints)
    config = tiny_llava_config(
        cfg.tiny, vocab_size, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id
    )
    return tokenizer, config, tiny_image_processor(cfg.tiny.image_size, cfg.tiny.vision_tower)


def _tiny_gemma3(cfg: ModelConfig, dtype: torch.dtype, attn: str, seed: int) -> BuiltModel:
    """The tiny Gemma 3 preset: a Gemma 3 model from `cfg.tiny` whose projector pools the SigLIP patch
    grid 2x2, a Gemma-shaped tokenizer, Gemma 3's image processor at tiny.image_size."""
    tokenizer, config = preset_config(cfg)
    family = family_for(config.model_type)
    config._attn_implementation = family_attention(family, attn)
    model = family.model_class()._from_config(config, dtype=dtype)
    start_projection(model, seed)
    return BuiltModel(
        model=model,
        tokenizer=tokenizer,
        image_processor=tiny_gemma3_image_processor(cfg.tiny.image_size),
        visual_tokens=family.visual_tokens(config),
        image_token_id=family.image_token_id(config),
        source=f"preset:{cfg.preset}",
        family=family,
    )


def enable_activation_checkpointing(built: BuiltModel) -> None:
    """Keep only each transformer layer's input in the forward; recompute the rest in the backward.

    Non-reentrant checkpointing (use_reentrant=False): the reentrant variant returns no gradient
    when no input of the checkpointed layer requires one (frozen embeddings under LoRA), and its
    recomputation inside the backward re-enters ZeRO-3's parameter hooks in an order they do not
    expect. Scale-specific LoRA adapters read the rows' scales while the task's forward runs; the
    recomputation happens after it, so the routing restores the rows each forward saw.
    """
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if built.scale_routing is not None:
        kwargs["context_fn"] = built.scale_routing.checkpoint_contexts
    model = built.model.get_base_model() if hasattr(built.model, "get_base_model") else built.model
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the rename (e.g. 5.17): the same switch under its old name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _load_local(
    path: str,
    dtype: torch.dtype,
    attn: str,
    tokens: TokenScalesConfig,
    config_only: bool = False,
    image_size: list[int] | None = None,
    image_pixels: list[int] | None = None,
) -> BuiltModel:
    from transformers import AutoImageProcessor, AutoTokenizer  # noqa: PLC0415

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={path!r} is not a Hugging Face model folder (no config.json); "
            "point it at a local folder written by save_pretrained"
        )
    config = load_model_config(folder)
    family_for(config.model_type, f"model.path={path!r}")  # a supported family, or the error naming them
    starts_mqt = tokens.mode == "mqt" and config.model_type != MQT_MODEL_TYPE
    exported_head = is_mqt_export(config.model_type)  # loads as its family's stock model, then its head
    model_class, config = _model_class_for(config, tokens, path)
    family = family_for(config.model_type)
    attn = family_attention(family, attn)
    visual, grid = folder_image_tokens(config, image_size, image_pixels, path)
    if config_only:
        config._attn_implementation = attn
        model = model_class._from_config(config, dtype=dtype)
        image_token_id = family.image_token_id(config)
        return BuiltModel(model, None, None, visual, image_token_id, str(folder), family=family, visual_grid=grid)
    with quiet_loading_report(exported_head):  # the head's weights, which the stock class has no place for
        model, loading = model_class.from_pretrained(
            folder,
            config=config,
            key_mapping=LLAVA_TO_MQT_KEYS if starts_mqt and not exported_head else None,
            local_files_only=True,
            dtype=dtype,
            attn_implementation=attn,
            output_loading_info=True,
        )
    _check_nothing_missing(
        loading["missing_keys"], config.model_type, path, fresh_projector=starts_mqt and not exported_head
    )
    if exported_head:
        load_exported_head(model, folder, tokens, dtype, path)
    # An MQT folder's config names remote code (auto_map); its tokenizer and image processor run none: no prompt.
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    note = pad_with_eos_or_unk(tokenizer)
    if note:
        print0(f"model.path={path!r}: {note}")
    image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if image_pixels:
        image_processor, _ = native_processor(image_processor, image_pixels, tokens)
    elif grid is not None:
        image_processor = FixedSizeImageProcessor(image_processor, *image_size)
    return BuiltModel(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        visual_tokens=visual,
        image_token_id=family.image_token_id(config),
        source=str(folder.resolve()),
        family=family,
        visual_grid=grid,
    )


def folder_image_tokens(
    config: Any, image_size: list[int] | None, image_pixels: list[int] | None, path: str
) -> tuple[int, tuple[int, int] | None]:
    """(tokens each `<image>` expands to in the data, the merged grid every image has) for a folder's model:
    Qwen's at `model.image_size`; at native resolution (`model.image_pixels`) the reference grid's count, the
    most an image has, and no one grid; the family's own count otherwise."""
    if image_pixels:
        unit = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        return image_pixels[1] // (unit * unit), None
    grid = fixed_grid(config, image_size, path)
    return (grid[0] * grid[1], grid) if grid else (family_for(config.model_type).visual_tokens(config), None)


@contextlib.contextmanager
def quiet_loading_report(quiet: bool) -> Iterator[None]:
    """Inside (when `quiet`): transformers' load report, a warning, is not printed; missing weights are refused by
    `_check_nothing_missing` all the same."""
    from transformers.utils import logging  # noqa: PLC0415

    logger = logging.get_logger("transformers.modeling_utils")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fixed_grid(config: Any, image_size: list[int] | None, path: str) -> tuple[int, int] | None:
    """The merged grid every image of a Qwen folder gets at `model.image_size` (None for other families)."""
    if not isinstance(family_for(config.model_type), Qwen2VLFamily):
        return None
    if not image_size:
        raise ValueError(
            f"model.path={path!r} is a {config.model_type} model, whose images need a size rule; "
            "set model.image_size=[height,width] (multiples of patch_size * merge_size * the largest M3 factor) for "
            "one size, or model.image_pixels=[min_pixels,max_pixels] for Qwen's native resolution"
        )
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    return image_size[0] // unit, image_size[1] // unit


def _model_class_for(config: Any, tokens: TokenScalesConfig, path: str) -> tuple[Any, Any]:
    """The class (and config) that load a folder under this run's token mode.

    An MQT folder loads with its trained projector and needs the run's MQT settings to match it. A
    LLaVA folder under `tokens.mode == "mqt"` starts MQT: a fresh query transformer replaces its MLP projector.
    Another family's folder loads as itself (build_model adds the query transformer after its projector); its MQT
    export (`mtrain_mqt_<family>`) as the family's stock model, whose query transformer `load_exported_head` adds.
    """
    from mtrain.model.mqt_model import MQTLlavaForConditionalGeneration  # noqa: PLC0415

    if is_mqt_export(config.model_type):
        problems = family_for(config.model_type).head_problems(config, tokens)  # the token mode and head it needs
        if problems:
            raise ValueError(f"model.path={path!r} holds an MQT model: {problems[0]}")
        stock = stock_config(config)
        return family_for(stock.model_type).model_class(), stock
    if config.model_type != MQT_MODEL_TYPE:
        if tokens.mode == "mqt" and config.model_type == "llava":
            return MQTLlavaForConditionalGeneration, mqt_llava_config(config, tokens)
        return family_for(config.model_type).model_class(), config
    problems = family_for(MQT_MODEL_TYPE).problems(config, tokens)  # the token mode it needs
    if problems:
        raise ValueError(f"model.path={path!r} holds an MQT model: {problems[0]}")
    differing = [
        f"matryoshka.tokens.{name}={getattr(config, name)!r} (the config has {getattr(tokens, name)!r})"
        for name in ("mqt_queries", "mqt_heads", "mqt_architecture")
        if getattr(config, name) != getattr(tokens, name)
    ]
    if differing:
        raise ValueError(f"model.path={path!r} holds an MQT projector of another shape; set {', '.join(differing)}")
    return MQTLlavaForConditionalGeneration, config


def _check_nothing_missing(missing_keys: set[str], model_type: str, path: str, fresh_projector: bool) -> None:
    """Refuse a folder that lacks weights it should hold, which transformers would initialise randomly.

    Only a LLaVA folder that starts MQT (`fresh_projector`) lacks a part on purpose: the new projector.
    """
    missing = sorted(key for key in missing_keys if not (fresh_projector and "multi_modal_projector" in key))
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(
            f"model.path={path!r} lacks {len(missing)} weight(s) of its {model_type!r} model ({shown}), which would "
            "start random; re-export the checkpoint (mtrain export) or point at a complete model folder"
        )


def lora_target_pattern(target_modules: list[str]) -> str:
    """A regex that matches the targets inside the language model only (CLIP has q_proj too)."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf".*language_model.*\.({names})"


def trained_modules(cfg: ModelConfig, parts: dict[str, str] = ModelFamily.part_names) -> list[str]:
    """Whole modules that train beside LoRA: unfrozen vision tower / projector (named by the family's
    `part_names`), and always_train."""
    modules = list(cfg.freeze.always_train)
    if not cfg.freeze.projector:
        modules += [parts[name] for name in ("projector", "mqt_head") if name in parts]
    if not cfg.freeze.vision_tower:
        modules.append(parts["vision_tower"])
    return modules


def peft_lora_config(
    cfg: ModelConfig, with_modules_to_save: bool = True, parts: dict[str, str] = ModelFamily.part_names
):
    from peft import LoraConfig as PeftLoraConfig  # noqa: PLC0415

    return PeftLoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_pattern(cfg.lora.target_modules),
        modules_to_save=(trained_modules(cfg, parts) or None) if with_modules_to_save else None,
    )


def attach_lora(model: nn.Module, cfg: ModelConfig, parts: dict[str, str] = ModelFamily.part_names) -> nn.Module:
    from peft import get_peft_model  # noqa: PLC0415

    return get_peft_model(model, peft_lora_config(cfg, parts=parts))


def model_part(parameter_name: str, parts: dict[str, str] = ModelFamily.part_names) -> str:
    """Which part a parameter belongs to: vision_tower, projector or language_model (the projector
    first: Qwen2-VL's merger sits inside its tower; anyres families' learned newline token and MQT's query
    transformer after another family's projector train with it)."""
    if "image_newline" in parameter_name or any(
        f"{part}." in parameter_name for part in (parts["projector"], MQT_HEAD)
    ):
        return "projector"
    if f"{parts['vision_tower']}." in parameter_name:
        return "vision_tower"
    return "language_model"


def apply_freeze_policy(model: nn.Module, cfg: ModelConfig, parts: dict[str, str] = ModelFamily.part_names) -> None:
    """Set requires_grad per part (no LoRA); `freeze.always_train` matches always train."""
    frozen = {
        "vision_tower": cfg.freeze.vision_tower,
        "projector": cfg.freeze.projector,
        "language_model": cfg.freeze.language_model,
    }
    for name, param in model.named_parameters():
        forced = any(fragment in name for fragment in cfg.freeze.always_train)
        param.requires_grad_(forced or not frozen[model_part(name, parts)])


def parameter_elements(model: nn.Module) -> dict[str, int]:
    """Element counts: total, held by this rank (ZeRO-3 partition aware), and trainable."""
    total = local = trainable = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        local += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
        trainable += numel if param.requires_grad else 0
    return {"total": total, "local": local, "trainable": trainable}
