"""`checkpoint.init_from`: start a new run from another run's weights only.

The source is an export (`OUT/` or `OUT/model/`), any Hugging Face model folder, or an mtrain
checkpoint. A checkpoint is exported once, on rank 0, to `<run.dir>/init_from/<tag>-<hash>/`;
its merged model folder then replaces the model source, so the model is loaded already
partitioned under ZeRO-3 like any `model.path`. Adapters of the source run are merged into
those weights; this run attaches fresh adapters (if it has LoRA on), and its optimizer,
schedule and data position start fresh. This is how stage 1 (projector) leads to stage 2
(LoRA or full fine-tuning), and how a finished run continues on new data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

INIT_FROM_DIR = "init_from"


def _hf_folder(path: Path) -> Path | None:
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    return None


def init_from_model_folder(source: str, run_dir: Path, create: bool) -> Path:
    """The Hugging Face model folder `source` stands for; exports a checkpoint first when `create`."""
    from mtrain.checkpoint.export import export_checkpoint, resolve_checkpoint  # noqa: PLC0415

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint.init_from={source!r} does not exist; give an export folder, a model folder or a checkpoint"
        )
    folder = _hf_folder(path)
    if folder is not None:
        return folder
    root, tag = resolve_checkpoint(path)
    digest = hashlib.sha256(str((root / tag).resolve()).encode()).hexdigest()[:8]
    target = run_dir / INIT_FROM_DIR / f"{tag}-{digest}"
    if (target / "model" / "config.json").is_file():
        return target / "model"
    if not create:
        raise FileNotFoundError(f"checkpoint.init_from: {target} was not exported yet (rank 0 exports it first)")
    staging = target.with_name(f".staging-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    export_checkpoint(root / tag, staging)
    os.rename(staging, target)
    return target / "model"
