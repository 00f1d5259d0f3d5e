"""Checkpoint writing: DeepSpeed engine state plus mtrain's client state and every rank's RNG."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

CONFIG_FILE = "config.yaml"


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """This rank's Python, NumPy and torch RNG state (DeepSpeed saves none of them)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(engine: Any, root: Path, step: int, client_state: dict[str, Any], config_yaml: str) -> Path:
    """Every rank calls this; returns the checkpoint folder `root/step_XXXXXXXX`."""
    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    folder = root / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(rng_state(), folder / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        (folder / CONFIG_FILE).write_text(config_yaml)
    if dist.is_initialized():
        dist.barrier()
    return folder
