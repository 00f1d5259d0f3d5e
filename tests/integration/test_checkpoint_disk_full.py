"""A save that runs out of disk stops the run with the cause, the folder, the space needed and free and
`latest`'s step (exit status 2, no retry), and leaves `latest` on a complete checkpoint that loads."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import mtrain_train, run

pytestmark = pytest.mark.timeout(300)

# One checkpoint of configs/tiny.yaml (LoRA) takes about 1.5 MiB: the first fits, the second does not.
TMPFS_SIZE = "2400k"


def test_a_full_disk_stops_the_save_with_its_cause_and_latest_still_loads(tmp_path, shards_pattern):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mtrain.checkpoint.export import resolve_checkpoint
    from mtrain.checkpoint.manifest import manifest_problems

    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(checkpoints)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        proc = run(mtrain_train(run_dir, shards_pattern, "run.max_steps=2", "checkpoint.save_every=1",
                                "checkpoint.export_at_end=false", "optim.warmup_steps=0"), cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        stderr = proc.stderr
        # Warned before the second save: the first checkpoint's size does not fit in what is left.
        assert f"warning: checkpoint: {checkpoints} has " in stderr and "(the size of step_00000001)" in stderr
        errors = [line for line in stderr.splitlines() if line.startswith("mtrain: error: ")]
        assert len(errors) == 1, stderr[-3000:]
        error = errors[0]
        assert f"checkpoint save into {checkpoints} failed: no space left on the device (rank 0: " in error
        assert "This save needs about 1." in error and "MiB (the size of step_00000001); " in error
        assert "KiB were free when it began" in error or "MiB were free when it began" in error
        assert "`latest` still names step_00000001 (step 1), complete and untouched" in error
        assert "lower checkpoint.keep_last" in error and "Traceback" not in stderr

        # `latest` is intact, the partial save gone, and the checkpoint loads.
        assert (checkpoints / "latest").read_text().strip() == "step_00000001"
        assert sorted(path.name for path in checkpoints.glob("*step_*")) == ["step_00000001"]  # no .staging-*
        root, tag = resolve_checkpoint(checkpoints)
        assert tag == "step_00000001" and manifest_problems(root / tag, checksums=True) == []
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        assert any("lora_A" in name for name in state)
    finally:
        # --lazy: the consolidated state above may still map the checkpoint's files.
        subprocess.run(["umount", "--lazy", str(checkpoints)], check=True)
