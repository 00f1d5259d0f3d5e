"""A NaN loss, injected at one step (MTRAIN_FAULT_INJECT=nan_loss@STEP), stops the job naming the
step and its samples (run.nonfinite=stop), or is skipped (run.nonfinite=skip); no checkpoint ever
holds a non-finite weight."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import launch_env, mtrain_train, read_metrics, run

pytestmark = pytest.mark.timeout(300)


def saved_weights_finite(run_dir) -> dict[str, bool]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    finite = {}
    for folder in sorted((run_dir / "checkpoints").glob("step_*")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        finite[folder.name] = all(bool(torch.isfinite(v).all()) for v in state.values())
    return finite


# stop: the NaN at log step 3 is found by the log step's reduce (with the metrics); skip: the NaN at
# step 4 (no log step) is found by the check before that step's save.
@pytest.mark.parametrize(("policy", "nan_step"), [("stop", 3), ("skip", 4)])
def test_an_injected_nan_loss_stops_or_is_skipped_and_no_checkpoint_holds_it(
    tmp_path, shards_pattern, policy, nan_step
):
    run_dir = tmp_path / "run"
    cmd = mtrain_train(
        run_dir, shards_pattern, "run.max_steps=6", "checkpoint.save_every=2", "checkpoint.export_at_end=false",
        "logging.log_every=3", f"run.nonfinite={policy}", "data.micro_batch_size=4",
    )  # fmt: skip
    proc = run(cmd, tmp_path, 240, {**launch_env(), "MTRAIN_FAULT_INJECT": f"nan_loss@{nan_step}"})
    finite = saved_weights_finite(run_dir)
    assert finite and all(finite.values()), finite
    if policy == "stop":
        # Found at log step 3, before its metrics are logged and before the save at step 4.
        assert proc.returncode != 0
        assert "non-finite loss or gradient norm at step 3" in proc.stderr
        assert "samples:" in proc.stderr
        assert sorted(finite) == ["step_00000002"]
        assert not (run_dir / "metrics.jsonl").exists() or read_metrics(run_dir) == []
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert sorted(finite) == ["step_00000002", "step_00000004", "step_00000006"]
        logged = read_metrics(run_dir)
        assert [m["step"] for m in logged] == [3, 6]
        assert logged[-1]["nonfinite_steps_skipped"] == 1 and math.isfinite(logged[-1]["loss"])
