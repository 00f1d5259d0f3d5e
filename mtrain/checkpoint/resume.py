"""Finding, checking and loading the checkpoint a run resumes from.

`checkpoint.resume`:
  auto   the newest complete checkpoint in `<run.dir>/checkpoints` (none: start fresh), so
         re-running the same command after a crash continues the run;
  never  always start fresh;
  PATH   a checkpoint folder (`step_XXXXXXXX`) or a checkpoints root.

Only folders with a valid manifest count; partial ones (a crash mid-save) are reported and
removed. A resume at another world size goes through DeepSpeed's universal format
(`universal.py`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from mtrain.checkpoint.layout import (
    CONFIG_FILE,
    TAG_PATTERN,
    CheckpointInfo,
    checkpoint_info,
    rank_data_file,
    rank_state_file,
    scan_checkpoints,
)
from mtrain.checkpoint.run_folder import last_saved
from mtrain.checkpoint.save import set_rng_state
from mtrain.config.core import to_dict
from mtrain.config.schema import TrainConfig


def remove_partial(partial: list[tuple[Path, str]]) -> None:
    for folder, reason in partial:
        print(f"checkpoint: removing partial folder {folder} ({reason})", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)


def find_resume_checkpoint(resume: str, checkpoints_root: Path, remove_partials: bool) -> CheckpointInfo | None:
    """The checkpoint `checkpoint.resume` names, or None to start fresh."""
    if resume == "never":
        return None
    root = checkpoints_root if resume == "auto" else Path(resume)
    if resume != "auto" and not root.exists():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} does not exist; give a checkpoint folder, auto or never")
    if resume != "auto" and TAG_PATTERN.match(root.name):
        return checkpoint_info(root)
    complete, partial = scan_checkpoints(root)
    if remove_partials:
        remove_partial(partial)
    if complete:
        return last_saved(complete)  # `latest`, unless a save was cut before updating it (run_folder.py)
    if resume != "auto":
        raise ValueError(f"checkpoint.resume={resume!r} holds no complete checkpoint")
    return None


# ── config mismatch ───────────────────────────────────────────────────────────────────────────
# Changing these makes the saved state meaningless or unloadable: an error.
INCOMPATIBLE = (
    "model.preset",
    "model.path",
    "model.tiny.",
    "model.freeze.",
    "model.lora.",
    "model.matryoshka.",
    "matryoshka.",
    "run.seed",
    "zero.stage",
    "data.micro_batch_size",
    "checkpoint.init_from",
)
# Changing these is expected between a run and its resume: not even a warning.
SILENT = ("run.dir", "checkpoint.resume", "checkpoint.start_over", "logging.", "dist.")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(incompatible changes, benign changes) between the checkpoint's config and this run's."""
    old, new = flatten(saved), flatten(current)
    errors, benign = [], []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key) or key.startswith(SILENT):
            continue
        change = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        (errors if key.startswith(INCOMPATIBLE) else benign).append(change)
    return errors, benign


def check_config_matches(checkpoint: CheckpointInfo, current: dict[str, Any]) -> list[str]:
    """Raise naming every incompatible change; return the benign ones for a warning."""
    import yaml  # noqa: PLC0415

    saved = yaml.safe_load((checkpoint.folder / CONFIG_FILE).read_text())
    errors, benign = config_changes(saved, current)
    if errors:
        raise ValueError(
            f"cannot resume from {checkpoint.folder}: the config differs in what the checkpoint depends on: "
            + "; ".join(errors)
            + ". Restore those values, or start a new run (checkpoint.resume=never checkpoint.start_over=true, or "
            "another run.dir; "
            "checkpoint.init_from to take its weights only)"
        )
    return benign


def preflight_resume(cfg: TrainConfig) -> None:
    """Before any process group forms: the checkpoint `checkpoint.resume` names exists and fits the config."""
    checkpoint = find_resume_checkpoint(cfg.checkpoint.resume, Path(cfg.run.dir) / "checkpoints", remove_partials=False)
    if checkpoint is not None:
        check_config_matches(checkpoint, to_dict(cfg))


# ── loading per-rank state ────────────────────────────────────────────────────────────────────
def load_data_states(checkpoint: CheckpointInfo) -> list[dict[str, Any]]:
    """Every saved rank's data-loader state, indexed by saved rank."""
    return [json.loads((checkpoint.folder / rank_data_file(r)).read_text()) for r in range(checkpoint.world_size)]


def load_rank_state(checkpoint: CheckpointInfo, rank: int) -> dict[str, Any]:
    # weights_only: mtrain never unpickles its own files (RNG states are stored as tensors).
    return torch.load(checkpoint.folder / rank_state_file(rank), weights_only=True)


def restore_rng(checkpoint: CheckpointInfo, rank: int, world_size: int, seed: int) -> bool:
    """This rank's saved RNG when the world size matches (bit-exact resume), else a fresh seed per rank."""
    if world_size == checkpoint.world_size:
        set_rng_state(load_rank_state(checkpoint, rank)["rng"])
        return True
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    derived = seed * 1_000_003 + checkpoint.step * 1_009 + rank
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)
    return False
