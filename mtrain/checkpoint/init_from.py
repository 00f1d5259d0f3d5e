"""`checkpoint.init_from`: start a new run from another run's weights only.

The source is an export (`OUT/` or `OUT/model/`), any Hugging Face model folder, or an mtrain
checkpoint. A checkpoint is exported once, on rank 0, to `<run.dir>/init_from/<tag>-<hash>/`; a
model folder from it then replaces the model source, so the model is loaded already partitioned
under ZeRO-3 like any `model.path`. Optimizer, schedule and data position start fresh. This is how
stage 1 (projector) leads to stage 2 (LoRA or full fine-tuning), and how a finished run continues
on new data.

The source run's LoRA adapters (`checkpoint.init_from_adapters`):
    train, freeze  the run loads the adapters' base (`OUT/base/`, or the base the adapters name) and
                   then every adapter, scale adapters included, into its own adapters of the same
                   names (`load_kept_adapters`); they train on, or stay fixed
    merge          the run loads `OUT/model/`, where the default scale's adapters are merged into
                   the weights, and attaches fresh adapters
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INIT_FROM_DIR = "init_from"


@dataclass(frozen=True)
class InitFromStart:
    """What a run starts from: the Hugging Face model folder it loads, and the adapters it keeps."""

    model: Path
    adapters: Path | None = None


def _hf_folder(path: Path) -> Path | None:
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    return None


def init_from_folder(source: str, run_dir: Path, create: bool) -> Path:
    """The export or Hugging Face model folder `source` stands for; exports a checkpoint first when `create`."""
    from mtrain.checkpoint.export import export_checkpoint, resolve_checkpoint  # noqa: PLC0415

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint.init_from={source!r} does not exist; give an export folder, a model folder or a checkpoint"
        )
    if _hf_folder(path) is not None:
        return path
    root, tag = resolve_checkpoint(path)
    digest = hashlib.sha256(str((root / tag).resolve()).encode()).hexdigest()[:8]
    target = run_dir / INIT_FROM_DIR / f"{tag}-{digest}"
    if (target / "model" / "config.json").is_file():
        return target
    if not create:
        raise FileNotFoundError(f"checkpoint.init_from: {target} was not exported yet (rank 0 exports it first)")
    staging = target.with_name(f".staging-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    export_checkpoint(root / tag, staging)
    os.rename(staging, target)
    return target


def init_from_start(folder: Path, adapters_mode: str) -> InitFromStart:
    """The model folder to load and the adapters to keep, for an export or model `folder`."""
    from mtrain.checkpoint.export import ADAPTER_DIR, adapter_config_files  # noqa: PLC0415

    adapters = folder / ADAPTER_DIR
    if adapters_mode == "merge" or (folder / "config.json").is_file() or not adapter_config_files(adapters):
        return InitFromStart(model=_hf_folder(folder))
    if (folder / "base" / "config.json").is_file():
        return InitFromStart(model=folder / "base", adapters=adapters)
    # The source trained on a local base folder, which its export names instead of copying.
    base = json.loads(adapter_config_files(adapters)[0].read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"checkpoint.init_from: the adapters in {adapters} apply to the base {base!r}, which is not a local model "
            "folder here; restore that folder, or set checkpoint.init_from_adapters=merge to start from the merged model"
        )
    return InitFromStart(model=Path(base), adapters=adapters)


def saved_adapter_names(folder: Path) -> list[str]:
    """Adapter names in a PEFT folder: `default` at its root, named ones (shared, scale_<s>) in subfolders."""
    from mtrain.checkpoint.export import adapter_config_files  # noqa: PLC0415

    return sorted(
        "default" if config.parent == folder else config.parent.name for config in adapter_config_files(folder)
    )


def load_kept_adapters(model: Any, folder: Path, frozen: bool) -> list[str]:
    """Load every adapter saved in `folder` into the run's adapter of the same name; freeze their LoRA weights
    when `frozen`. Their `modules_to_save` (trained projector, lm_head) load too and train as configured."""
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from mtrain.checkpoint.export import adapter_folder  # noqa: PLC0415

    saved = saved_adapter_names(folder)
    names = sorted(getattr(model, "peft_config", {}))
    if names != saved:
        what = f"this run's adapters are {names}" if names else "this run has model.lora.enabled=false"
        raise ValueError(
            f"checkpoint.init_from holds the LoRA adapters {saved} and {what}; set model.lora (enabled, strategy) and "
            "matryoshka.tokens.scales as the source run had them, or checkpoint.init_from_adapters=merge to fold "
            "the default scale's adapters into the weights and start fresh ones"
        )
    with _gathered(model):
        for name in names:
            state = load_file(adapter_folder(folder, name, names) / "adapter_model.safetensors")
            try:
                result = set_peft_model_state_dict(model, state, adapter_name=name)
            except RuntimeError as error:  # a shape mismatch: another rank or other targets
                raise ValueError(
                    f"checkpoint.init_from's adapter {name!r} does not fit this run's (model.lora.rank or "
                    f"target_modules differ from the source run's): {error}"
                ) from error
            if result.unexpected_keys:
                raise ValueError(
                    f"checkpoint.init_from's adapter {name!r} has weights this run's lacks: "
                    f"{sorted(result.unexpected_keys)[:4]}; match model.lora.target_modules to the source run's"
                )
    if frozen:
        for parameter_name, parameter in model.named_parameters():
            if ".lora_" in parameter_name:
                parameter.requires_grad_(False)
        if not any(parameter.requires_grad for parameter in model.parameters()):
            raise ValueError(
                "checkpoint.init_from_adapters=freeze keeps every adapter fixed and nothing else trains; "
                "unfreeze a part (model.freeze.projector=false, model.freeze.always_train) or use train"
            )
    return names


def _gathered(model: Any) -> contextlib.AbstractContextManager:
    """Under ZeRO-3 gather the adapters' parameters (only them) so they can be written; a no-op otherwise."""
    from mtrain.launch.preflight import is_partitioned  # noqa: PLC0415

    partitioned = [
        param
        for name, param in model.named_parameters()
        if is_partitioned(param) and (".lora_" in name or "modules_to_save" in name)
    ]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # noqa: PLC0415

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
