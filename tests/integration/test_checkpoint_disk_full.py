"""A save that runs out of disk stops the run with the cause, the folder, the space needed and free and
`latest`'s step (exit status 2, no retry), and leaves `latest` on a complete checkpoint that loads.

With 2 ranks the ranks hit the full disk inside DeepSpeed's save at different points; the run must
still end (no rank left waiting in a collective) with the rank that failed exiting 2."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import mtrain_train, run

pytestmark = pytest.mark.timeout(420)

# One checkpoint of configs/tiny.yaml (LoRA) takes about 1.5 MiB: the first fits, the second does not.
TMPFS_SIZE = "2400k"


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_full_disk_stops_the_save_with_its_cause_and_latest_still_loads(tmp_path, shards_pattern, ranks):
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
        cmd = mtrain_train(run_dir, shards_pattern, "run.max_steps=2", "checkpoint.save_every=1",
                           "checkpoint.export_at_end=false", "optim.warmup_steps=0", ranks=ranks)  # fmt: skip
        proc = run(cmd, cwd=tmp_path, timeout=360)
        stderr = proc.stderr
        # Warned before the second save: the first checkpoint's size does not fit in what is left.
        assert f"warning: checkpoint: {checkpoints} has " in stderr and "(the size of step_00000001)" in stderr
        errors = re.findall(r"^mtrain: error(?: \(rank \d\))?: (.*)$", stderr, flags=re.MULTILINE)
        assert 1 <= len(errors) <= ranks, stderr[-3000:]
        for error in errors:
            assert f"checkpoint save into {checkpoints} failed: no space left on the device (rank " in error
            assert "This save needs about 1." in error and "MiB (the size of step_00000001); " in error
            assert re.search(r"[\d.]+ (KiB|MiB) were free when it began", error)
            assert "`latest` still names step_00000001 (step 1), complete and untouched" in error
            assert "lower checkpoint.keep_last" in error
        if ranks == 1:
            assert proc.returncode == 2 and "Traceback" not in stderr
        else:  # torchrun reports 1; the rank that hit the disk left with the no-retry status
            assert proc.returncode != 0 and re.search(r"exitcode\s*: 2 ", stderr), stderr[-3000:]

        # `latest` is intact and the checkpoint loads.
        assert (checkpoints / "latest").read_text().strip() == "step_00000001"
        assert [path.name for path in checkpoints.glob("step_*")] == ["step_00000001"]
        if ranks == 1:
            assert not list(checkpoints.glob(".staging-*"))  # the partial save was removed
        root, tag = resolve_checkpoint(checkpoints)
        assert tag == "step_00000001" and manifest_problems(root / tag, checksums=True) == []
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        assert any("lora_A" in name for name in state)
    finally:
        # --lazy: the consolidated state above may still map the checkpoint's files.
        subprocess.run(["umount", "--lazy", str(checkpoints)], check=True)
