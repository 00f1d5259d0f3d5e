"""Crash-safe checkpoint writing.

A save goes through stages, each durable before the next begins:

    1. DeepSpeed writes its ZeRO partitions into `<root>/.staging-step_XXXXXXXX`
       (`save_latest=False`: mtrain owns `latest`).
    2. Every rank writes its own state: RNG (Python, NumPy, torch), data-loader position,
       Matryoshka sampler state.
    3. Every rank waits until the files it wrote are durable: each was hashed (SHA-256) while it
       was written and fsynced right after, in parallel (`durable.py`); rank 0 gathers sizes and
       SHA-256s.
    4. Rank 0 writes `manifest.json` (files, sizes, checksums, trainer state, config hash).
    5. Rank 0 renames the staging folder to `step_XXXXXXXX` and fsyncs the root.
    6. Rank 0 replaces `latest` atomically, last, then applies retention.

A crash anywhere leaves `latest` on the previous complete checkpoint; a folder without a valid
manifest is partial, and resume reports and removes it (see `resume.py`).

Before stage 1 rank 0 warns when the free space will not hold the save; a full, read-only or
forbidden disk stops the save with a `CheckpointSaveError` on every rank (see `disk.py`).

`MTRAIN_FAULT_INJECT=STAGE[@STEP]` SIGKILLs the process at a stage (tests use it): one of
`FAULT_STAGES`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtrain.checkpoint.disk import SaveFailures, check_free_space
from mtrain.checkpoint.durable import DurableFiles
from mtrain.checkpoint.layout import (
    CONFIG_FILE,
    DELETING_PREFIX,
    LATEST_FILE,
    STAGING_PREFIX,
    TAG_PATTERN,
    checkpoint_tag,
    rank_data_file,
    rank_state_file,
    scan_checkpoints,
)
from mtrain.checkpoint.manifest import fsync_dir, relative_files, write_manifest, write_text_durably
from mtrain.checkpoint.universal import universal_folder

FAULT_STAGES = ("engine_written", "rank_files", "manifest", "renamed", "latest", "saved")


# ── RNG state in a form torch.load(weights_only=True) reads back ──────────────────────────────
def rng_state() -> dict[str, Any]:
    """This rank's Python, NumPy and torch RNG state (DeepSpeed saves none of them), as tensors."""
    version, python_state, gauss = random.getstate()
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": numpy_kind,
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(numpy_has_gauss),
            "gauss": float(numpy_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ── fault injection for the crash-safety tests ────────────────────────────────────────────────
def inject_fault(stage: str, step: int) -> None:
    """SIGKILL this process at `stage` when MTRAIN_FAULT_INJECT=STAGE[@STEP] asks for it; with
    STAGE[@STEP]:sleep=SECONDS it stalls there instead, as slow storage would (tests only)."""
    wanted = os.environ.get("MTRAIN_FAULT_INJECT", "")
    if not wanted:
        return
    where, _, action = wanted.partition(":")
    name, _, at_step = where.partition("@")
    if name == stage and (not at_step or int(at_step) == step):
        if action.startswith("sleep="):
            time.sleep(float(action.removeprefix("sleep=")))
        else:
            os.kill(os.getpid(), signal.SIGKILL)


# ── the save ──────────────────────────────────────────────────────────────────────────────────
@dataclass
class RankState:
    """What each rank adds beside DeepSpeed's files."""

    data: dict[str, Any]  # the data loader's state_dict(), JSON-serialisable
    samplers: dict[str, Any]  # Matryoshka samplers' state (tensors, lists, numbers)


@dataclass(frozen=True)
class Retention:
    keep_last: int  # newest complete checkpoints to keep; 0 keeps all
    keep_every: int  # also keep every checkpoint whose step is a multiple of this; 0 disables


def file_owner(name: str) -> int:
    """The rank that wrote a file, from DeepSpeed's and mtrain's file names; rank 0 otherwise."""
    match = re.search(r"(?:zero_pp_rank_|^rank)(\d+)", Path(name).name)
    return int(match.group(1)) if match else 0


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(
    engine: Any,
    root: Path,
    step: int,
    meta: dict[str, Any],
    rank_state: RankState,
    config_yaml: str,
    retention: Retention,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Every rank calls this; returns the complete checkpoint folder `root/step_XXXXXXXX`.

    `meta` (trainer state, config hash, version, ...) goes into the manifest, which rank 0 writes
    after every rank has made its files durable. `write_extra(staging_folder)`, called on every
    rank after DeepSpeed's save, adds files that the manifest then covers (the adapter folder).
    """
    rank, world_size = _rank_and_world()
    tag = checkpoint_tag(step)
    staging = root / f"{STAGING_PREFIX}{tag}"
    # A write that fails for lack of space or rights is held until the next `agree()`, where every
    # rank raises the same error; `agree()` also stands in for a barrier.
    failures = SaveFailures(root, staging, rank, world_size)
    if rank == 0:
        with failures.writing():
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # left by an earlier crash at this very step
            failures.space = check_free_space(root, engine)
    failures.agree()

    files = DurableFiles(staging)  # hashes and fsyncs each file while the next one is written
    with failures.writing(), files.recording(engine):
        engine.save_checkpoint(
            str(root), tag=staging.name, client_state={"trainer": meta["trainer"]}, save_latest=False
        )
    failures.raise_alone()  # inside DeepSpeed's collectives no sync point is safe to join (disk.py)
    inject_fault("engine_written", step)
    if write_extra is not None:
        with failures.writing():
            write_extra(staging)

    with failures.writing():
        files.torch_save({"rng": rng_state(), "samplers": rank_state.samplers}, staging / rank_state_file(rank))
        files.write_text(staging / rank_data_file(rank), _json(rank_state.data))
        if rank == 0:
            files.write_text(staging / CONFIG_FILE, config_yaml)
    inject_fault("rank_files", step)
    # Each rank waits for its own files only (no barrier between the ranks' writes), then one
    # agreement carries every rank's failure, if any, and its files' entries to rank 0.
    entries: dict[str, Any] = {}
    with failures.writing():
        entries = files.entries([name for name in relative_files(staging) if file_owner(name) == rank])
    gathered = failures.agree(entries)

    folder = root / tag
    if rank == 0:
        with failures.writing():
            files = {name: entry for per_rank in gathered for name, entry in per_rank.items()}
            write_manifest(staging, files, {**meta, "tag": tag, "step": step, "world_size": world_size})
            inject_fault("manifest", step)
            if folder.exists():  # re-saving a step (a resume that ends where it started): replace it
                discard(folder)
            os.rename(staging, folder)
            fsync_dir(root)
            inject_fault("renamed", step)
            write_text_durably(root / LATEST_FILE, tag)
            inject_fault("latest", step)
            apply_retention(root, retention)
    failures.agree()
    inject_fault("saved", step)
    return folder


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def discard(folder: Path) -> None:
    """Remove a checkpoint folder: renamed first, so a crash mid-delete never leaves it looking valid."""
    doomed = folder.with_name(f"{DELETING_PREFIX}{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(folder, doomed)
    fsync_dir(folder.parent)
    shutil.rmtree(doomed)


def checkpoints_to_delete(steps: list[int], latest_step: int | None, retention: Retention) -> list[int]:
    """Steps retention removes: not among the newest `keep_last`, not a `keep_every` multiple, not latest."""
    if retention.keep_last <= 0:
        return []
    newest = set(sorted(steps)[-retention.keep_last :])
    kept_every = {s for s in steps if retention.keep_every and s % retention.keep_every == 0}
    return [s for s in sorted(steps) if s not in newest and s not in kept_every and s != latest_step]


def apply_retention(root: Path, retention: Retention) -> None:
    if retention.keep_last <= 0:  # keeps all: no need to scan the folder
        return
    complete, _ = scan_checkpoints(root)
    latest = (root / LATEST_FILE).read_text().strip() if (root / LATEST_FILE).is_file() else None
    latest_match = TAG_PATTERN.match(latest or "")
    latest_step = int(latest_match.group(1)) if latest_match else None
    for step in checkpoints_to_delete([c.step for c in complete], latest_step, retention):
        discard(root / checkpoint_tag(step))
        shutil.rmtree(universal_folder(root / checkpoint_tag(step)), ignore_errors=True)
