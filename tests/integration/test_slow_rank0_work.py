"""Rank-0-only work that outlasts the collective timeout (a 7B export takes minutes) ends cleanly:
the other ranks wait for it outside any collective, so no watchdog kills them."""

from __future__ import annotations

import pytest

from tests.conftest import launch_env, mtrain_train, run

pytestmark = pytest.mark.timeout(300)

COLLECTIVE_TIMEOUT_S, EXPORT_STALL_S = 8, 20  # the stall outlasts the timeout 2.5 times


def test_slow_rank0_export_outlasts_a_short_collective_timeout(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    cmd = mtrain_train(
        run_dir,
        shards_pattern,
        "run.max_steps=2",
        f"dist.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
        "checkpoint.export_at_end=true",
        ranks=2,
    )
    env = {**launch_env(), "MTRAIN_FAULT_INJECT": f"export:sleep={EXPORT_STALL_S}"}
    proc = run(cmd, cwd=tmp_path, env=env)
    assert proc.returncode == 0
    assert (run_dir / "export" / "model" / "model.safetensors").is_file()
    assert "done: 2 steps" in proc.stderr
