"""Disk space and failed writes of a checkpoint save: warn before, explain after.

Out of space, a save used to die inside `torch.save` with `basic_ios::clear: iostream error`. Now:

- before each save, rank 0 compares the free space under the checkpoints folder with the size
  the save will take (the newest complete checkpoint's, else an estimate from the parameters) and
  warns when it will not fit;
- a write that fails with ENOSPC / EDQUOT, EACCES / EPERM or EROFS (or with torch's errno-less
  RuntimeError on a full or read-only disk) becomes a `CheckpointSaveError` that names the folder,
  the space needed and free, and the step `latest` still points to. `latest` is never touched by a
  failed save, and rank 0 removes the partial staging folder to give the space back.

Where a failure can be agreed on: in mtrain's own stages every rank reaches the same sync point
(`agree`, which replaces a barrier), so all raise the same error. Inside DeepSpeed's
`save_checkpoint` the ranks run collectives of their own (tag checks, optimizer state, the closing
barrier), and a rank that left it early cannot tell which one its peers wait in; joining any would
mismatch them and hang (seen with 2 ranks on a full tmpfs). So a rank whose DeepSpeed write fails
raises at once (`raise_alone`); a peer whose write went through then fails on the lost rank and the
launcher stops the job, and the no-retry status of the failed rank keeps launchers/ from retrying.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mtrain.checkpoint.layout import LATEST_FILE, scan_checkpoints
from mtrain.checkpoint.manifest import read_manifest
from mtrain.launch.outcome import NoRetryError, is_lost_peer

WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}
FIXES = {
    "no space left on the device": "free space there, lower checkpoint.keep_last, or put run.dir on a larger disk",
    "the disk quota is exceeded": "free space within the quota, lower checkpoint.keep_last, or put run.dir elsewhere",
    "permission denied": "make the folder writable by this user, or put run.dir elsewhere",
    "the file system is read-only": "put run.dir on a writable file system",
}
FULL_DISK_BYTES = 1 << 20  # less than this free after an errno-less write error: the disk filled up


class CheckpointSaveError(NoRetryError):
    """A checkpoint could not be written: the disk is full, read-only or not ours."""


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


@dataclass(frozen=True)
class SpaceCheck:
    """What rank 0 measured before a save."""

    needed: int  # bytes the save is expected to write
    basis: str  # where `needed` comes from
    free: int  # bytes free under the checkpoints folder when the save began


def expected_save_bytes(root: Path, engine: Any) -> tuple[int, str]:
    """(bytes, basis): the newest complete checkpoint's size, else an estimate from the parameters."""
    complete, _ = scan_checkpoints(root)
    if complete:
        files = read_manifest(complete[-1].folder)["files"]
        return sum(entry["bytes"] for entry in files.values()), f"the size of {complete[-1].folder.name}"
    # No checkpoint yet: every weight in its dtype, plus fp32 master weights and two Adam moments of
    # each trainable one (a partitioned ZeRO-3 parameter reports its full size as `ds_numel`).
    weights = trainable = 0
    for param in engine.module.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        weights += numel * param.element_size()
        trainable += numel if param.requires_grad else 0
    return weights + 12 * trainable, "an estimate from the parameters"


def check_free_space(root: Path, engine: Any) -> SpaceCheck:
    """Measure the free space under `root` and warn (stderr) when the save will not fit."""
    needed, basis = expected_save_bytes(root, engine)
    free = shutil.disk_usage(root).free
    if free < needed:
        print(
            f"warning: checkpoint: {root} has {human_bytes(free)} free; this save needs about "
            f"{human_bytes(needed)} ({basis}) and will likely fail: {FIXES['no space left on the device']}",
            file=sys.stderr,
            flush=True,
        )
    return SpaceCheck(needed, basis, free)


def write_failure_cause(exc: BaseException, folder: Path) -> str | None:
    """Why a write under `folder` failed, when the disk is the cause (full, read-only, not ours); else None."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return WRITE_ERRNOS.get(exc.errno)
    if not isinstance(exc, RuntimeError) or is_lost_peer(exc):
        return None
    # torch.save's C++ writer reports a failed write without errno ("basic_ios::clear: iostream error",
    # "PytorchStreamWriter failed writing file"): ask the file system what went wrong.
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return WRITE_ERRNOS[errno.EROFS]
    if not os.access(existing, os.W_OK):
        return WRITE_ERRNOS[errno.EACCES]
    if shutil.disk_usage(existing).free < FULL_DISK_BYTES:
        return WRITE_ERRNOS[errno.ENOSPC]
    return None


def latest_description(root: Path) -> str:
    latest = root / LATEST_FILE
    if not latest.is_file():
        return "no earlier checkpoint exists (`latest` was never written)"
    tag = latest.read_text().strip()
    return f"`latest` still names {tag} (step {int(tag.removeprefix('step_'))}), complete and untouched"


class SaveFailures:
    """A save's write failures: caught where they happen, agreed on by every rank at the save's sync points."""

    def __init__(self, root: Path, staging: Path, rank: int, world_size: int) -> None:
        self.root = root
        self.staging = staging
        self.rank = rank
        self.world_size = world_size
        self.failure: tuple[str, str] | None = None  # (cause, what the rank saw)
        self.space: SpaceCheck | None = None  # rank 0's measurement, shared at the first agreement

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Run a block of writes; a disk failure is recorded (not raised) until the next `agree`."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            cause = write_failure_cause(exc, self.staging)
            if cause is None or self.failure is not None:
                raise
            first_line = (str(exc).splitlines() or [""])[0][:200]
            self.failure = (cause, f"rank {self.rank}: {type(exc).__name__}: {first_line}")

    def agree(self, payload: Any = None) -> list[Any]:
        """Every rank calls this at the same point (it also serves as a barrier). If any rank failed,
        rank 0 removes the partial folder and every rank raises the same `CheckpointSaveError`;
        else every rank's `payload` comes back, indexed by rank (one collective carries both)."""
        reports: list[Any] = [(self.failure, self.space, payload)]
        if dist.is_initialized() and self.world_size > 1:
            reports = [None] * self.world_size
            dist.all_gather_object(reports, (self.failure, self.space, payload))
        self.space = self.space or reports[0][1]
        failures = [failure for failure, _, _ in reports if failure]
        if not failures:
            return [payload for _, _, payload in reports]
        if self.rank == 0:
            shutil.rmtree(self.staging, ignore_errors=True)  # give the space back; `latest` never moved
        raise CheckpointSaveError(self.describe(failures[0]))

    def raise_alone(self) -> None:
        """Raise this rank's failure now, joining no collective (see the module docstring)."""
        if self.failure is None:
            return
        if self.rank == 0:
            shutil.rmtree(self.staging, ignore_errors=True)
        raise CheckpointSaveError(self.describe(self.failure))

    def describe(self, failure: tuple[str, str]) -> str:
        cause, seen = failure
        space = ""
        if self.space is not None:
            space = (
                f" This save needs about {human_bytes(self.space.needed)} ({self.space.basis}); "
                f"{human_bytes(self.space.free)} were free when it began."
            )
        return (
            f"checkpoint save into {self.root} failed: {cause} ({seen}).{space} {latest_description(self.root)}; "
            f"the partial save {'was removed' if self.rank == 0 else 'is removed at the next start'}. "
            f"To continue: {FIXES[cause]}, then run the same command to resume."
        )
