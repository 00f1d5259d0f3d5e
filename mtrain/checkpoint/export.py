"""Export a checkpoint to stock Hugging Face folders: the model (merged) and the LoRA adapter.

Runs in one process from the checkpoint on disk: DeepSpeed's own `zero_to_fp32` consolidates
the ZeRO-3 partitions, then the model is rebuilt from the checkpoint's resolved config and
saved with safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mtrain import __version__
from mtrain.checkpoint.save import CONFIG_FILE
from mtrain.config import load_config


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint root, tag) from either a root holding `latest` or a tag folder."""
    path = Path(path)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if (path / CONFIG_FILE).is_file() and path.parent.is_dir():
        return path.parent, path.name
    raise FileNotFoundError(
        f"{path} is neither a checkpoint folder (with {CONFIG_FILE}) nor a checkpoint root (with 'latest')"
    )


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir/model` (HF model, tokenizer, image processor), `out_dir/adapter` if LoRA."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: PLC0415

    from mtrain.model.build import build_model  # noqa: PLC0415
    from mtrain.task.captioning import LanguageModelingTask  # noqa: PLC0415

    root, tag = resolve_checkpoint(checkpoint)
    cfg = load_config(root / tag / CONFIG_FILE)
    unset_hf_deepspeed_config()  # this process may have trained under ZeRO-3; export builds a plain model
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    built = build_model(cfg.model, torch.float32, None, cfg.run.seed)
    task = LanguageModelingTask(built.model)
    task.load_state_dict(state, strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = built.model
    if cfg.model.lora.enabled:
        model.save_pretrained(out / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(out / "model", safe_serialization=True)
    built.tokenizer.save_pretrained(out / "model")
    built.image_processor.save_pretrained(out / "model")
    metadata = {
        "mtrain_version": __version__,
        "checkpoint": str((root / tag).resolve()),
        "source": built.source,
        "visual_tokens": built.visual_tokens,
        "lora": cfg.model.lora.enabled,
    }
    (out / "mtrain.json").write_text(json.dumps(metadata, indent=1))
    return out
