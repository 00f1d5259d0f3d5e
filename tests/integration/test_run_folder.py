"""A run folder holds one run: resume=never over a run refuses, start_over archives it, auto-resume
takes the checkpoint saved last, a resume leaves no duplicate TensorBoard steps, and re-running a
finished run does not export again."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrain.checkpoint.resume import CheckpointInfo
from mtrain.checkpoint.run_folder import last_saved
from tests.conftest import mtrain_train, read_metrics, run

pytestmark = pytest.mark.timeout(600)


def tensorboard_steps(run_dir: Path, tag: str = "loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_auto_resume_takes_the_checkpoint_saved_last_not_the_highest_step():
    old_run = CheckpointInfo(Path("step_00000100"), 100, {"saved_at": 1000.0})
    this_run = CheckpointInfo(Path("step_00000010"), 10, {"saved_at": 2000.0})
    assert last_saved([this_run, old_run]) is this_run


def test_one_run_per_folder(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"

    def train(*overrides: str):
        return run(mtrain_train(run_dir, shards_pattern, "checkpoint.save_every=2", *overrides), tmp_path, 300)

    first = train("run.max_steps=4")
    assert first.returncode == 0
    exported = (run_dir / "export" / "model" / "config.json").stat().st_mtime_ns

    again = train("run.max_steps=4")  # a finished run, re-run: nothing to train, nothing to export again
    assert again.returncode == 0
    assert "already holds step 4" in again.stdout + again.stderr
    assert (run_dir / "export" / "model" / "config.json").stat().st_mtime_ns == exported

    refused = train("run.max_steps=4", "checkpoint.resume=never")
    assert refused.returncode == 2
    assert "already holds a run" in refused.stderr and "checkpoint.start_over=true" in refused.stderr
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()  # untouched

    # Start over: 3 steps, a checkpoint at step 2 only, so TensorBoard holds step 3 past the checkpoint.
    fresh = train(
        "run.max_steps=3", "checkpoint.resume=never", "checkpoint.start_over=true", "checkpoint.save_at_end=false"
    )
    assert fresh.returncode == 0
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(("step_", "latest")))
    assert left == ["latest", "step_00000002"]
    (archive,) = (run_dir / "previous").iterdir()
    assert (archive / "checkpoints" / "step_00000004").is_dir() and (archive / "export").is_dir()
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]

    resumed = train("run.max_steps=4", "checkpoint.export_at_end=false")
    assert resumed.returncode == 0
    assert "at step 2" in resumed.stdout + resumed.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert tensorboard_steps(run_dir) == [1, 2, 3, 4]
