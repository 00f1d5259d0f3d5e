"""Where checkpoints live and what their files are called: the naming and scanning that saving,
resuming, exporting and inspecting share.

    <run.dir>/checkpoints/
        step_XXXXXXXX/            a complete checkpoint: manifest.json, config.yaml, DeepSpeed's files,
                                  rankNNNNN_state.pt (RNG, samplers), rankNNNNN_data.json (data position)
        .staging-step_XXXXXXXX/   a save in progress (partial after a crash)
        .deleting-step_XXXXXXXX/  a delete in progress
        latest                    the tag of the newest complete checkpoint, replaced atomically
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrain.checkpoint.manifest import manifest_problems, read_manifest

CONFIG_FILE = "config.yaml"
LATEST_FILE = "latest"
STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(rank: int) -> str:
    return f"rank{rank:05d}_state.pt"


def rank_data_file(rank: int) -> str:
    return f"rank{rank:05d}_data.json"


@dataclass(frozen=True)
class CheckpointInfo:
    folder: Path
    step: int
    meta: dict[str, Any]

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])


def scan_checkpoints(root: Path) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
    """(complete checkpoints by step, partial folders with the reason) under a checkpoints root."""
    complete, partial = [], []
    if not root.is_dir():
        return [], []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        if folder.name.startswith((STAGING_PREFIX, DELETING_PREFIX)):
            partial.append((folder, "an interrupted save or delete"))
            continue
        match = TAG_PATTERN.match(folder.name)
        if not match:
            continue
        problems = manifest_problems(folder)
        if problems:
            partial.append((folder, "; ".join(problems[:3])))
        else:
            complete.append(CheckpointInfo(folder, int(match.group(1)), read_manifest(folder)["meta"]))
    return sorted(complete, key=lambda c: c.step), partial


def checkpoint_info(folder: Path) -> CheckpointInfo:
    """A complete checkpoint folder, or a clear error saying why it is not one."""
    match = TAG_PATTERN.match(folder.name)
    problems = manifest_problems(folder)
    if not match or problems:
        reason = "; ".join(problems) if problems else "its name is not step_XXXXXXXX"
        raise ValueError(f"checkpoint {folder} is not a complete mtrain checkpoint: {reason}")
    return CheckpointInfo(folder, int(match.group(1)), read_manifest(folder)["meta"])
