"""Run folders that cannot mix two runs.

- `checkpoint.resume=never` in a folder that already holds a run (checkpoints or logged metrics)
  is refused before any process starts: the old checkpoints would stay beside the new ones, and
  a later `resume=auto` could pick one of them.
- `checkpoint.start_over=true` (with `resume=never`) moves everything the old run wrote into
  `<run.dir>/previous/<UTC time>/` (a rename: instant, nothing is lost) and starts fresh.
- `resume=auto` takes the complete checkpoint saved last (manifest `saved_at`): the one `latest`
  names, or a newer one when a save was cut between its rename and the `latest` update.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtrain.config.core import ConfigError

ARCHIVE_DIR = "previous"
# Everything a run writes into its folder; start_over moves each one that exists.
RUN_ARTEFACTS = (
    "checkpoints",
    "metrics.jsonl",
    "tensorboard",
    "wandb",
    "export",
    "plots",
    "init_from",
    "ranks",
    "first_step.json",
    "config.yaml",
    "ds_config.json",
)


def run_evidence(run_dir: Path) -> list[str]:
    """What shows that `run_dir` holds a run: saved checkpoints and logged metrics."""
    evidence = []
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        saved = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_") or p.name == "latest")
        if saved:
            evidence.append(f"checkpoints/ ({', '.join(saved[:3])}{' ...' if len(saved) > 3 else ''})")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        evidence.append("metrics.jsonl")
    return evidence


def check_fresh_start(run_dir: Path, resume: str, start_over: bool) -> None:
    """Refuse `resume=never` over an existing run unless the user asked to start over."""
    if resume != "never" or start_over:
        return
    evidence = run_evidence(run_dir)
    if evidence:
        raise ConfigError(
            f"checkpoint.resume=never: {run_dir} already holds a run ({', '.join(evidence)}). "
            "Continue it with checkpoint.resume=auto, start it over with checkpoint.start_over=true "
            f"(moves the old run into {run_dir / ARCHIVE_DIR}/), or choose another run.dir"
        )


def archive_previous_run(run_dir: Path) -> Path | None:
    """Move the old run's files into `<run_dir>/previous/<UTC time>/`; the folder it made, or None."""
    present = [name for name in RUN_ARTEFACTS if (run_dir / name).exists()]
    if not present:
        return None
    archive = run_dir / ARCHIVE_DIR / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    suffix = 0
    while archive.exists():  # two start-overs within a second
        suffix += 1
        archive = archive.with_name(f"{archive.name.split('.')[0]}.{suffix}")
    archive.mkdir(parents=True)
    for name in present:
        (run_dir / name).rename(archive / name)
    return archive


def last_saved(complete: Sequence[Any]) -> Any:
    """The complete checkpoint saved last (by its manifest's `saved_at`, then step)."""
    return max(complete, key=lambda c: (float(c.meta.get("saved_at", 0.0)), c.step))
