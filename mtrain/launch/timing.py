"""Time from launch to the first optimizer step, written to the run folder for every launcher."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mtrain.launch.env import WorldInfo

# Launch scripts in launchers/ export this (seconds since the epoch) once, when they start the job;
# it survives torchrun restarts and Slurm loop attempts, so a restart's figure includes recovery.
LAUNCH_TIME_VAR = "MTRAIN_LAUNCH_TIME"
PROCESS_START = time.time()


def record_first_step(run_dir: Path, world: WorldInfo, step: int) -> dict[str, float | int | str | None]:
    """Rank 0 writes `first_step.json`: seconds from launch (when known) and from process start."""
    now = time.time()
    launched = os.environ.get(LAUNCH_TIME_VAR, "")
    try:
        since_launch = round(now - float(launched), 2) if launched else None
    except ValueError:
        since_launch = None
    timing = {
        "launcher": world.launcher,
        "world_size": world.world_size,
        "step": step,
        "first_step_s": since_launch,
        "process_to_first_step_s": round(now - PROCESS_START, 2),
    }
    if world.is_main:
        (run_dir / "first_step.json").write_text(json.dumps(timing))
    return timing
