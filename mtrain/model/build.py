"""Build the MLLM: the tiny preset or a local Hugging Face folder, sharded at construction.

Under ZeRO-3 the caller passes the DeepSpeed config; an `HfDeepSpeedConfig` kept alive on the
returned `BuiltModel` makes transformers construct (or load) every parameter already
partitioned, so no rank ever holds the whole model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrain.config.schema import ModelConfig, TokenScalesConfig
from mtrain.launch.distributed import print0
from mtrain.model.families import SUPPORTED_MODEL_TYPES, ModelFamily, family_for
from mtrain.model.families.llava import tiny_image_processor, tiny_llava_config
from mtrain.model.scale_lora import ScaleRouting, adapter_names, attach_scale_lora
from mtrain.model.token_scales import MQTLlavaResampler, QueryTransformerProjector
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer, pad_with_eos_or_unk

# Loading code never reaches a hub: everything comes from the preset or a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["SUPPORTED_MODEL_TYPES", "build_model", "tiny_image_processor", "tiny_llava_config"]


@dataclass
class BuiltModel:
    model: nn.Module
    tokenizer: Any
    image_processor: Any
    visual_tokens: int  # tokens each <image> expands to in the data: the grid (M3) or M queries (MQT)
    image_token_id: int
    source: str
    family: ModelFamily | None = None  # what mtrain knows about the model's kind (mtrain/model/families)
    # Row routing of scale-specific LoRA adapters; None without them.
    scale_routing: ScaleRouting | None = None
    # Parameter elements right after construction, before adapters (see `parameter_elements`).
    constructed_elements: dict[str, int] = field(default_factory=dict)
    # Keeps transformers' ZeRO-3 integration switched on while the model lives.
    zero3_context: Any = field(default=None, repr=False)


def attention_implementation(requested: str) -> str:
    """flash_attention_2 when asked or (auto) when it imports on a GPU; otherwise sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401, PLC0415

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def visual_tokens_per_image(config: Any) -> int:
    """Tokens each <image> stands for in the language model, as the model's family counts them."""
    return family_for(config.model_type).visual_tokens(config)


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    zero3_ds_config: dict | None,
    seed: int,
    tokens: TokenScalesConfig | None = None,
    config_only: bool = False,
) -> BuiltModel:
    """Build or load the model described by `cfg`, partitioned under ZeRO-3 when a config is given.

    With `tokens.mode == "mqt"` LLaVA's projector is replaced by the MQT query transformer; with a
    scale-specific `lora.strategy` one PEFT adapter per scale is attached. `config_only` builds a
    local model from its config.json alone (no weights, tokenizer or image processor read): called
    under `torch.device("meta")` it gives the exact parameter layout of a 7B model in seconds.
    """
    tokens = tokens or TokenScalesConfig()
    from transformers.integrations import HfDeepSpeedConfig  # noqa: PLC0415

    zero3_context = HfDeepSpeedConfig(zero3_ds_config) if zero3_ds_config else None
    attn = attention_implementation(cfg.attn_implementation)
    torch.manual_seed(seed)  # identical initial weights (and LoRA init) on every rank
    if cfg.path:
        built = _load_local(cfg.path, dtype, attn, config_only)
    else:
        tokenizer = build_tiny_tokenizer()
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        vocab_size = (len(tokenizer) + 63) // 64 * 64
        llava_config = tiny_llava_config(cfg.tiny, vocab_size, image_token_id, tokenizer.pad_token_id)
        llava_config._attn_implementation = attn
        family = family_for(llava_config.model_type)
        tokenizer.chat_template = family.tiny_chat_template()  # the family's shape, as a real folder brings its own
        model = family.model_class()._from_config(llava_config, dtype=dtype)
        built = BuiltModel(
            model=model,
            tokenizer=tokenizer,
            image_processor=tiny_image_processor(cfg.tiny.image_size, cfg.tiny.vision_tower),
            visual_tokens=family.visual_tokens(llava_config),
            image_token_id=image_token_id,
            source="preset:tiny-llava",
            family=family,
        )
    if cfg.chat_template and built.tokenizer is not None:
        built.tokenizer.chat_template = cfg.chat_template  # rendered by the loader, saved by the export
    if tokens.mode == "mqt":
        replace_projector_with_mqt(built, tokens, zero3_ds_config, dtype)
    built.constructed_elements = parameter_elements(built.model)
    if cfg.lora.enabled:
        # PEFT freezes the base and trains the adapters plus `modules_to_save`, so the saved
        # adapter alone rebuilds the trained model on top of the original base.
        if tokens.mode != "none" and cfg.lora.strategy != "shared":
            names = adapter_names(cfg.lora.strategy, tokens.scales)
            configs = [peft_lora_config(cfg, with_modules_to_save=i == 0) for i in range(len(names))]
            built.model, built.scale_routing = attach_scale_lora(built.model, configs, names)
        else:
            built.model = attach_lora(built.model, cfg)
    else:
        apply_freeze_policy(built.model, cfg)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(built)
    built.zero3_context = zero3_context
    return built


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


def _load_local(path: str, dtype: torch.dtype, attn: str, config_only: bool = False) -> BuiltModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer  # noqa: PLC0415

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={path!r} is not a Hugging Face model folder (no config.json); "
            "point it at a local folder written by save_pretrained"
        )
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    family = family_for(config.model_type, f"model.path={path!r}")
    if config_only:
        config._attn_implementation = attn
        model = family.model_class()._from_config(config, dtype=dtype)
        visual, image_token_id = family.visual_tokens(config), family.image_token_id(config)
        return BuiltModel(model, None, None, visual, image_token_id, str(folder), family=family)
    model = family.model_class().from_pretrained(folder, local_files_only=True, dtype=dtype, attn_implementation=attn)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    note = pad_with_eos_or_unk(tokenizer)
    if note:
        print0(f"model.path={path!r}: {note}")
    image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return BuiltModel(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        visual_tokens=family.visual_tokens(config),
        image_token_id=family.image_token_id(config),
        source=str(folder.resolve()),
        family=family,
    )


def lora_target_pattern(target_modules: list[str]) -> str:
    """A regex that matches the targets inside the language model only (CLIP has q_proj too)."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf".*language_model.*\.({names})"


def trained_modules(cfg: ModelConfig) -> list[str]:
    """Whole modules that train beside LoRA: unfrozen vision tower / projector, and always_train."""
    modules = list(cfg.freeze.always_train)
    if not cfg.freeze.projector:
        modules.append("multi_modal_projector")
    if not cfg.freeze.vision_tower:
        modules.append("vision_tower")
    return modules


def peft_lora_config(cfg: ModelConfig, with_modules_to_save: bool = True):
    from peft import LoraConfig as PeftLoraConfig  # noqa: PLC0415

    return PeftLoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_pattern(cfg.lora.target_modules),
        modules_to_save=(trained_modules(cfg) or None) if with_modules_to_save else None,
    )


def attach_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    from peft import get_peft_model  # noqa: PLC0415

    return get_peft_model(model, peft_lora_config(cfg))


def replace_projector_with_mqt(
    built: BuiltModel, tokens: TokenScalesConfig, zero3_ds_config: dict | None, dtype: torch.dtype
) -> None:
    """Swap LLaVA's MLP projector for MQT's query transformer; <image> then stands for M tokens."""
    import contextlib  # noqa: PLC0415

    config = built.model.config
    family = built.family or family_for(config.model_type)
    vision_dim, text_dim = family.projector_dims(config)
    grid_tokens = built.visual_tokens
    context = contextlib.nullcontext()
    if zero3_ds_config:
        import deepspeed  # noqa: PLC0415

        context = deepspeed.zero.Init(config_dict_or_path=zero3_ds_config)  # built partitioned, like the rest
    with context:
        if tokens.mqt_architecture == "mqt_llava":
            projector: nn.Module = MQTLlavaResampler(
                vision_dim=vision_dim,
                text_dim=text_dim,
                num_queries=tokens.mqt_queries,
                num_heads=tokens.mqt_heads,
            )
        else:
            projector = QueryTransformerProjector(
                vision_dim=vision_dim,
                text_dim=text_dim,
                num_queries=tokens.mqt_queries,
                num_heads=tokens.mqt_heads,
                num_patches=grid_tokens,
            )
        projector = projector.to(dtype)
    family.set_projector(built.model, projector)
    built.visual_tokens = tokens.mqt_queries


def model_part(parameter_name: str) -> str:
    """Which part a parameter belongs to: vision_tower, projector or language_model."""
    if "vision_tower" in parameter_name:
        return "vision_tower"
    if "multi_modal_projector" in parameter_name:
        return "projector"
    return "language_model"


def apply_freeze_policy(model: nn.Module, cfg: ModelConfig) -> None:
    """Set requires_grad per part (no LoRA); `freeze.always_train` matches always train."""
    frozen = {
        "vision_tower": cfg.freeze.vision_tower,
        "projector": cfg.freeze.projector,
        "language_model": cfg.freeze.language_model,
    }
    for name, param in model.named_parameters():
        forced = any(fragment in name for fragment in cfg.freeze.always_train)
        param.requires_grad_(forced or not frozen[model_part(name)])


def parameter_elements(model: nn.Module) -> dict[str, int]:
    """Element counts: total, held by this rank (ZeRO-3 partition aware), and trainable."""
    total = local = trainable = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        local += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
        trainable += numel if param.requires_grad else 0
    return {"total": total, "local": local, "trainable": trainable}
