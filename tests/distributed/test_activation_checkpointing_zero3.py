"""Activation checkpointing under real 2-rank ZeRO-3: M3 at all scales with MSS LoRA on a frozen LM trains."""

from __future__ import annotations

import pytest

from tests.conftest import mtrain_train, read_metrics, run

pytestmark = pytest.mark.timeout(300)


def test_two_rank_zero3_run_with_activation_checkpointing_learns(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    cmd = mtrain_train(
        run_dir,
        shards_pattern,
        "run.max_steps=16",
        "model.activation_checkpointing=true",
        "zero.param_persistence_threshold=0",  # every parameter sharded: recomputation re-gathers them
        "matryoshka.tokens.mode=m3",
        "matryoshka.tokens.scales=[1,4,16,64]",
        "model.lora.strategy=shared_plus_per_scale",
        "checkpoint.save_at_end=false",
        ranks=2,
    )
    assert run(cmd, cwd=tmp_path).returncode == 0
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 17))
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < 0.7 * first, (first, last)
