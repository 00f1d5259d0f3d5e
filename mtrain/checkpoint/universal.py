"""Resuming at another world size through DeepSpeed's universal checkpoint format.

ZeRO partitions are cut for one world size; a plain load at another fails. DeepSpeed's own
converter rewrites them per parameter:

    python -m deepspeed.checkpoint.ds_to_universal \
        --input_folder  RUN/checkpoints/step_XXXXXXXX \
        --output_folder RUN/checkpoints/universal/step_XXXXXXXX

and an engine built with `"checkpoint": {"load_universal": true}` loads that at any world size.
mtrain runs exactly this on rank 0 when the world size changed (once; the result is kept). The
universal load restores trainable parameters and optimizer state only: frozen base weights come
from the model source (preset, `model.path` or `checkpoint.init_from`), which the run builds
anyway.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mtrain.checkpoint.manifest import fsync_dir

UNIVERSAL_DIR = "universal"


def universal_folder(checkpoint_folder: Path) -> Path:
    return checkpoint_folder.parent / UNIVERSAL_DIR / checkpoint_folder.name


def conversion_command(checkpoint_folder: Path, output_folder: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint_folder),
        "--output_folder",
        str(output_folder),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]


def convert_to_universal(checkpoint_folder: Path) -> Path:
    """Convert once (rank 0 only) into `<root>/universal/<tag>`; returns that folder."""
    target = universal_folder(checkpoint_folder)
    if (target / ".complete").is_file():
        return target
    staging = target.with_name(f".staging-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(conversion_command(checkpoint_folder, staging), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"ds_to_universal failed on {checkpoint_folder} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    (staging / ".complete").write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    fsync_dir(target.parent)
    return target
