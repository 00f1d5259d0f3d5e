"""Export a checkpoint to stock Hugging Face folders, in one process, from the files on disk.

    OUT/model/     the merged model: safetensors, config, tokenizer, image processor, and for LLaVA a
                   processor with the chat template the model was trained with
                   (`AutoModelForImageTextToText` / `AutoProcessor.from_pretrained`); for the
                   processors that need torchvision (Qwen-VL, OneVision) their processor_config.json
    OUT/adapter/   the PEFT adapter with its `modules_to_save` (`PeftModel.from_pretrained`)
    OUT/base/      the base the adapter applies to, when it exists nowhere else on disk
                   (the built-in preset, or a base that came from `checkpoint.init_from`)
    OUT/mtrain.json  provenance and the Matryoshka metadata (scales, dims, strategy)

DeepSpeed's own `zero_to_fp32` consolidates the ZeRO partitions for the merged model. Adapters
never need the whole model: every checkpoint of a LoRA run already holds `adapter/`, written at
save time by gathering the adapters' parameters alone (`save_adapter_gathered`), and
`--adapter-only` copies it. Everything is written with safetensors; loading an export never
unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mtrain import __version__
from mtrain.checkpoint.save import CONFIG_FILE, TAG_PATTERN
from mtrain.config import load_config
from mtrain.config.schema import TrainConfig
from mtrain.task.registry import objective_for

EXPORT_METADATA = "mtrain.json"
ADAPTER_DIR = "adapter"
TASK_PREFIX = "model."  # the task module wraps the HF model as `.model`


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints root, tag) from a checkpoint folder or a root holding `latest`."""
    from mtrain.checkpoint.resume import checkpoint_info, find_resume_checkpoint, scan_checkpoints  # noqa: PLC0415

    path = Path(path)
    if TAG_PATTERN.match(path.name):
        checkpoint_info(path)  # a clear error when the folder is partial
        return path.parent, path.name
    if (path / "checkpoints").is_dir() and not (path / "latest").exists():
        path = path / "checkpoints"  # a run folder
    if path.is_dir() and scan_checkpoints(path)[0]:
        newest = find_resume_checkpoint(str(path), path, remove_partials=False)
        if newest is not None:
            return path, newest.folder.name
    what = "an export (load it with transformers/PEFT), " if (path / EXPORT_METADATA).is_file() else ""
    raise FileNotFoundError(
        f"{path} is {what}not an mtrain checkpoint: give a checkpoint folder (step_XXXXXXXX with a manifest), "
        "a checkpoints folder, a run folder, or (mtrain eval) a config YAML"
    )


def matryoshka_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """The Matryoshka spec as trained: the `matryoshka` block of `mtrain.json`, which `mtrain.infer` reads.

    Visual tokens: `token_mode` (none, m3, mqt), `scales`, `default_scale` (the scale merged into
    export/model), `mqt_queries`, and the LoRA `strategy` (per-scale adapters live in export/adapter).
    Embeddings (`objective` contrastive): `dims`, `dims_policy`, and `layers` as configured (the
    resolved layers, with the last layer, are in export/embedding.json).
    """
    tokens, dims = cfg.matryoshka.tokens, cfg.matryoshka.dims
    embedding = objective_for(cfg).embeds
    return {
        "objective": cfg.task.objective,
        "token_mode": tokens.mode,
        "scales": tokens.scales if tokens.mode != "none" else None,
        "default_scale": (tokens.default_scale or tokens.scales[-1]) if tokens.mode != "none" else None,
        "mqt_queries": tokens.mqt_queries if tokens.mode == "mqt" else None,
        "strategy": cfg.model.lora.strategy if cfg.model.lora.enabled else None,
        "dims": dims.dims,
        "dims_policy": dims.policy if embedding else None,
        "layers": dims.layers if embedding else None,
    }


def strip_task_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.removeprefix(TASK_PREFIX): tensor for name, tensor in state.items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, adapter_only: bool = False) -> Path:
    """Write the export folders described in the module docstring; returns `out_dir`."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: PLC0415

    root, tag = resolve_checkpoint(checkpoint)
    cfg = load_config(root / tag / CONFIG_FILE)
    unset_hf_deepspeed_config()  # this process may have trained under ZeRO-3; export builds a plain model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora = cfg.model.lora.enabled
    if adapter_only and not lora:
        raise ValueError(f"{root / tag} was trained without LoRA: it has no adapter; export the model instead")
    if adapter_only:
        provenance = export_adapter_only(root, tag, cfg, out / ADAPTER_DIR)
        written = {"adapter": ADAPTER_DIR}
    else:
        built, written = export_full(root, tag, cfg, out)
        provenance = {"source": built.source, "visual_tokens": built.visual_tokens}
    metadata = {
        "mtrain_version": __version__,
        "checkpoint": str((root / tag).resolve()),
        "step": int(TAG_PATTERN.match(tag).group(1)),
        **provenance,
        "lora": lora,
        "folders": written,
        "matryoshka": matryoshka_metadata(cfg),
    }
    (out / EXPORT_METADATA).write_text(json.dumps(metadata, indent=1))
    return out


def export_full(root: Path, tag: str, cfg: TrainConfig, out: Path) -> tuple[Any, dict[str, str]]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    from mtrain.model.build import build_model  # noqa: PLC0415

    # The run's own model config rebuilds the skeleton (every weight then comes from the checkpoint): a run
    # started from `checkpoint.init_from` has the architecture of its own preset or path.
    built = build_model(cfg.model, torch.float32, None, cfg.run.seed, cfg.matryoshka.tokens)
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    built.model.load_state_dict(strip_task_prefix(state), strict=True)
    return built, write_model_folders(built, cfg, out)


def write_model_folders(built: Any, cfg: TrainConfig, out: Path) -> dict[str, str]:
    """OUT/model (with LoRA: merged at the default scale, which consumes the built model's adapters), and with
    LoRA OUT/adapter and, when the base exists nowhere else, OUT/base, from a built model holding the trained
    weights; returns the folders written, by role."""
    from mtrain.checkpoint.embedding_export import embedding_width, write_matryoshka_dimensions  # noqa: PLC0415
    from mtrain.model.embedding_head import check_dims  # noqa: PLC0415

    tokens = cfg.matryoshka.tokens
    mqt_scale = (tokens.default_scale or tokens.scales[-1]) if tokens.mode == "mqt" else None
    written = {"model": "model"}
    model = built.model
    if cfg.model.lora.enabled:
        base_path = cfg.model.path
        if not base_path or cfg.checkpoint.init_from:
            base_path = str(out / "base")
            written["base"] = "base"
        if "base" in written:
            # `unload()` drops the adapters without merging: exactly the frozen base the adapter was trained on.
            _save_hf_folder(_copy_model(model).unload(), built, out / "base", mqt_scale)
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = base_path
        model.save_pretrained(out / "adapter", safe_serialization=True, selected_adapters=list(model.peft_config))
        written["adapter"] = "adapter"
        model = model.merge_and_unload(adapter_names=merged_adapters(cfg))
    _save_hf_folder(model, built, out / "model", mqt_scale)
    if objective_for(cfg).embeds:
        write_matryoshka_dimensions(out / "model", check_dims(cfg.matryoshka.dims.dims, embedding_width(cfg, built)))
    return written


def _copy_model(model: torch.nn.Module) -> torch.nn.Module:
    import copy  # noqa: PLC0415

    return copy.deepcopy(model)


def _save_hf_folder(model: torch.nn.Module, built: Any, folder: Path, mqt_scale: int | None = None) -> None:
    """Model, tokenizer and image processor, plus (LLaVA) a processor; both carry the chat template
    conversations were rendered with in training (the tokenizer's, see data_pipeline/chat_template.py).

    A model with MQT after its family's own projector is saved as its registered MQT class
    (`mtrain/model/mqt_families.py`: loads with `trust_remote_code=True`), each image served as the first
    `mqt_scale` queries (the default scale, whose adapters export/model merges; None: all of them)."""
    from mtrain.model.mqt_head import as_mqt_export, mqt_head  # noqa: PLC0415

    head = mqt_head(model)
    if head is not None:
        model = as_mqt_export(model, mqt_scale or head.num_queries)
    model.save_pretrained(folder, safe_serialization=True)
    built.tokenizer.save_pretrained(folder)
    built.image_processor.save_pretrained(folder)
    processor = llava_processor(model.config, built, built.tokenizer.chat_template)
    if processor is not None:
        processor.save_pretrained(folder)
    elif (arguments := unbuilt_processor_config(model.config)) is not None:
        (folder / PROCESSOR_CONFIG).write_text(json.dumps(arguments, indent=2, sort_keys=True) + "\n")


def llava_processor(config: Any, built: Any, chat_template: str) -> Any:
    """A `LlavaProcessor` that expands `<image>` to exactly the features the model gets (OneVision's own for
    llava_onevision; None for other families).

    LLaVA's processor counts (side / patch_size)^2 + num_additional_image_tokens, minus one under the
    "default" feature strategy (which drops the vision tower's CLS feature); a CLIP tower has that
    one extra CLS token, a SigLIP tower none.
    """
    from transformers import LlavaProcessor  # noqa: PLC0415

    if getattr(config, "model_type", None) == "llava_onevision":
        return onevision_processor(config, built, chat_template)
    if getattr(config, "model_type", None) == "llava_next":
        from transformers import LlavaNextProcessor  # noqa: PLC0415

        vision = config.vision_config  # LLaVA-NeXT's processor counts the anyres layout as the model packs it
        return LlavaNextProcessor(
            image_processor=built.image_processor,
            tokenizer=built.tokenizer,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1 if vision.model_type == "clip_vision_model" else 0,
            chat_template=chat_template,
        )
    if getattr(config, "model_type", None) != "llava":
        return None
    vision = config.vision_config
    has_cls = vision.model_type == "clip_vision_model"
    return LlavaProcessor(
        image_processor=built.image_processor,
        tokenizer=built.tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=chat_template,
    )


PROCESSOR_CONFIG = "processor_config.json"  # transformers' ProcessorMixin file: class and arguments
# The processors that cannot be built without torchvision (their video processors need it), by model type.
UNBUILT_PROCESSORS = {"llava_onevision": "LlavaOnevisionProcessor", "qwen2_vl": "Qwen2VLProcessor",
                      "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}  # fmt: skip


def unbuilt_processor_config(config: Any) -> dict[str, Any] | None:
    """processor_config.json of a processor this process cannot build (no torchvision): its class and the
    arguments that fit the model, which `AutoProcessor.from_pretrained` passes it where torchvision is installed
    (the tokenizer, with chat_template.jinja, and the image processor are saved beside it; the video processor
    takes the image processor's settings). None for a processor that is built and saved whole."""
    name = UNBUILT_PROCESSORS.get(getattr(config, "model_type", None))
    if name is None:
        return None
    arguments = onevision_arguments(config) if config.model_type == "llava_onevision" else {}
    return {"processor_class": name, **arguments}


def onevision_arguments(config: Any) -> dict[str, Any]:
    """LlavaOnevisionProcessor's arguments that count each image's tokens as the model packs them."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return {
        "num_image_tokens": side * side,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_aspect_ratio": config.vision_aspect_ratio,
    }


def onevision_processor(config: Any, built: Any, chat_template: str) -> Any:
    """A `LlavaOnevisionProcessor` counting each image's anyres tokens as the model packs them: g*g base
    tokens per crop grid, the unpadded crops with their newlines.

    None without torchvision: the processor insists on its video processor, which needs it (the CPU
    stack leaves it out); the export then holds the tokenizer and image processor, each loadable
    with its Auto class, and the model's count is `LlavaOnevisionFamily.scale_tokens`."""
    import importlib.util  # noqa: PLC0415

    from transformers import LlavaOnevisionProcessor  # noqa: PLC0415

    if importlib.util.find_spec("torchvision") is None:
        return None
    return LlavaOnevisionProcessor(
        image_processor=built.image_processor,
        tokenizer=built.tokenizer,
        chat_template=chat_template,
        **onevision_arguments(config),
    )


def save_adapter_gathered(peft_model: Any, folder: Path, is_main: bool) -> None:
    """Every rank calls this: gather only the adapters' parameters (ZeRO-3), rank 0 writes a stock PEFT folder.

    The frozen base stays partitioned; only the adapters and `modules_to_save` are ever whole.
    """
    import deepspeed  # noqa: PLC0415
    from peft import get_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    # The LoRA weights too when frozen (`checkpoint.init_from_adapters=freeze`): every adapter is saved whole.
    saved = [param for name, param in peft_model.named_parameters() if param.requires_grad or ".lora_" in name]
    names = list(peft_model.peft_config)
    states: dict[str, dict[str, torch.Tensor]] = {}
    with deepspeed.zero.GatheredParameters(saved, modifier_rank=None):
        if is_main:
            for name in names:
                adapter = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
                states[name] = {key: tensor.detach().clone().contiguous() for key, tensor in adapter.items()}
    if is_main:
        for name in names:
            target = adapter_folder(folder, name, names)
            target.mkdir(parents=True, exist_ok=True)
            save_file(states[name], target / "adapter_model.safetensors", metadata={"format": "pt"})
            peft_model.peft_config[name].save_pretrained(target)


def adapter_folder(folder: Path, name: str, names: list[str]) -> Path:
    """PEFT's layout: a lone `default` adapter at the root, named adapters (shared, scale_<s>) in subfolders."""
    return folder if names == ["default"] else folder / name


def merged_adapters(cfg: TrainConfig) -> list[str] | None:
    """The adapters merged into export/model: every one for `shared`; at the default visual scale, that
    scale's adapter (plus the shared one) for the scale-specific strategies."""
    from mtrain.model.scale_lora import SHARED_ADAPTER, scale_adapter  # noqa: PLC0415

    tokens, strategy = cfg.matryoshka.tokens, cfg.model.lora.strategy
    if tokens.mode == "none" or strategy == "shared":
        return None
    scale = scale_adapter(tokens.default_scale or tokens.scales[-1])
    return [scale] if strategy == "per_scale" else [SHARED_ADAPTER, scale]


def adapter_config_files(folder: Path) -> list[Path]:
    """Every adapter's `adapter_config.json` in a PEFT folder: the lone `default` at its root, named ones below."""
    return sorted(folder.glob("adapter_config.json")) + sorted(folder.glob("*/adapter_config.json"))


def export_adapter_only(root: Path, tag: str, cfg: TrainConfig, folder: Path) -> dict[str, Any]:
    """Copy every adapter the checkpoint holds (gathered from the trainable parameters at save time)."""
    import shutil  # noqa: PLC0415

    saved = root / tag / ADAPTER_DIR
    if not adapter_config_files(saved):
        raise FileNotFoundError(
            f"{root / tag} holds no PEFT adapter under {ADAPTER_DIR}/ (no adapter_config.json there or in a "
            "subfolder); export the whole model instead (mtrain export without --adapter-only)"
        )
    shutil.copytree(saved, folder, dirs_exist_ok=True)
    for config_file in adapter_config_files(folder):
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = cfg.model.path
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    return {"source": cfg.model.path or f"preset:{cfg.model.preset}", "visual_tokens": None}
