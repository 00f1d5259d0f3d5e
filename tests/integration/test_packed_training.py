"""A real training run on packed rows: the task passes position ids (no mask) through DeepSpeed."""

from __future__ import annotations

import math

import pytest

from tests.conftest import mtrain_train, read_metrics, run

pytestmark = pytest.mark.timeout(300)


def test_packed_training_runs_and_counts_documents(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    overrides = ["run.max_steps=4", "data.packing=true", "data.max_len=256", "data.micro_batch_size=2"]
    proc = run(mtrain_train(run_dir, shards_pattern, *overrides, "checkpoint.save_at_end=false"), cwd=tmp_path)
    assert proc.returncode == 0
    metrics = read_metrics(run_dir)
    assert len(metrics) == 4 and all(math.isfinite(m["loss"]) for m in metrics)
    # Three 72-token captions fit in a 256-token row: 4 steps x 2 rows carry 24 documents.
    assert metrics[-1]["data/samples"] >= 3 * 2 * 4
    assert metrics[-1]["data/bad/corrupt_image"] == 0
