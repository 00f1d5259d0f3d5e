"""A process SIGKILLed at each stage inside a save leaves `latest` on a complete, loadable
checkpoint; re-running the same command removes the partial folder and finishes the run."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from mtrain.checkpoint.inspect import inspect_path
from mtrain.checkpoint.layout import scan_checkpoints
from mtrain.checkpoint.manifest import manifest_problems
from mtrain.checkpoint.resume import find_resume_checkpoint
from tests.conftest import launch_env, mtrain_train, read_metrics, run

pytestmark = pytest.mark.timeout(600)

# Killed while saving step 4 (step 2 saved fine): what `latest` and the newest complete checkpoint must be.
STAGES = {
    "engine_written": ("step_00000002", 2),  # DeepSpeed's files are in the staging folder, nothing else
    "rank_files": ("step_00000002", 2),  # every rank's RNG and data state written too, no manifest yet
    "manifest": ("step_00000002", 2),  # the manifest is written, the folder not yet renamed
    "renamed": ("step_00000002", 4),  # step 4 is complete, `latest` not yet moved: resume takes step 4
    "latest": ("step_00000004", 4),  # killed before retention
    "saved": ("step_00000004", 4),  # the save returned; killed before the next step
}


def train_cmd(run_dir: Path, shards: str, steps: int = 4) -> list[str]:
    return mtrain_train(
        run_dir, shards, f"run.max_steps={steps}", "checkpoint.save_every=2", "checkpoint.export_at_end=false"
    )


def test_kill_at_each_save_stage_leaves_latest_loadable(tmp_path, shards_pattern):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # The runs are independent single-rank jobs: start them together to halve the wall time.
    jobs = {
        stage: subprocess.Popen(
            train_cmd(tmp_path / stage, shards_pattern),
            cwd=tmp_path,
            env={**launch_env(), "MTRAIN_FAULT_INJECT": f"{stage}@4"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for stage in STAGES
    }
    for stage, (latest, newest_step) in STAGES.items():
        assert jobs[stage].wait(timeout=400) == -signal.SIGKILL, stage  # killed by the injected fault
        root = tmp_path / stage / "checkpoints"
        assert (root / "latest").read_text() == latest, stage
        assert manifest_problems(root / latest, checksums=True) == [], stage
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=latest)  # loadable
        assert any("lora_B" in name for name in state) and all(torch.isfinite(t).all() for t in state.values())
        complete, partial = scan_checkpoints(root)
        assert complete[-1].step == newest_step, stage
        assert bool(partial) == (newest_step == 2), (stage, partial)
        assert find_resume_checkpoint("auto", root, remove_partials=False).step == newest_step

    # `mtrain inspect` names the partial folder without touching it.
    run_dir = tmp_path / "manifest"
    summary = inspect_path(run_dir / "checkpoints")
    assert "1 complete checkpoint(s), latest -> step_00000002" in summary
    assert ".staging-step_00000004: PARTIAL" in summary and "adapter/: a stock PEFT adapter folder" in summary

    # The same command again: the partial folder is reported and removed, the run finishes from step 2.
    proc = run(train_cmd(run_dir, shards_pattern), cwd=tmp_path)
    assert proc.returncode == 0
    assert "removing partial folder" in proc.stderr and ".staging-step_00000004" in proc.stderr
    assert "at step 2 (exact load, RNG restored)" in proc.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
    complete, partial = scan_checkpoints(run_dir / "checkpoints")
    assert [c.step for c in complete] == [2, 4] and partial == []
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"

    # Resuming with an incompatible config names the change and fails before any process group.
    proc = run([*train_cmd(run_dir, shards_pattern, steps=6), "model.lora.rank=4"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "cannot resume from" in proc.stderr and "model.lora.rank: 8 -> 4" in proc.stderr
    assert "run.max_steps" not in proc.stderr  # a benign change is no reason to refuse
    assert "mtrain: 1 rank(s)" not in proc.stderr
