"""M3 and MQT with every LoRA strategy under real 2-rank ZeRO-3 (every parameter sharded).

The ranks read different shards, and under sample_per_sample they hold different scales in the
same step: a module sequence that differed between ranks would hang the parameter gathers.
"""

from __future__ import annotations

import pytest

from tests.conftest import REPO, read_metrics, run, torchrun

pytestmark = pytest.mark.timeout(300)

CASES = [
    ("m3", "[1,4,16,64]", "shared", "all"),
    ("m3", "[1,4,16,64]", "per_scale", "sample_per_sample"),
    ("m3", "[1,4,16,64]", "shared_plus_per_scale", "all"),
    ("mqt", "[2,8,32,64]", "shared", "sample_per_step"),
    ("mqt", "[2,8,32,64]", "per_scale", "all"),
    ("mqt", "[2,8,32,64]", "shared_plus_per_scale", "sample_per_step"),
]


@pytest.mark.parametrize("mode,scales,strategy,policy", CASES, ids=["-".join(c[::2] + c[3:]) for c in CASES])
def test_two_rank_zero3_training(tmp_path, shards_pattern, mode, scales, strategy, policy):
    run_dir = tmp_path / "run"
    steps = 10
    cmd = [
        *torchrun(), "-m", "mtrain",
        "train", str(REPO / "configs/tiny.yaml"), f"run.dir={run_dir}", f"data.shards={shards_pattern}",
        f"run.max_steps={steps}", "optim.warmup_steps=2", "logging.progress=false",
        "checkpoint.export_at_end=false", "zero.param_persistence_threshold=0",
        f"matryoshka.tokens.mode={mode}", f"matryoshka.tokens.scales={scales}",
        f"matryoshka.tokens.policy={policy}", f"model.lora.strategy={strategy}",
    ]  # fmt: skip
    proc = run(cmd, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0

    metrics = read_metrics(run_dir)
    assert len(metrics) == steps
    assert metrics[-1]["loss"] < 0.75 * metrics[0]["loss"]
    scale_list = [int(s) for s in scales.strip("[]").split(",")]
    if policy == "all":
        # Every scale has its own loss every step.
        assert all(f"loss/scale_{s}" in m for m in metrics for s in scale_list)
    if policy == "sample_per_step":
        drawn = [m["scale_drawn"] for m in metrics]
        assert all(m["scale_drawn_rank_spread"] == 0 for m in metrics), "ranks drew different scales"
        assert set(drawn) <= set(scale_list) and len(set(drawn)) > 1
        # The one scale with a loss in each step is the drawn one.
        assert all(
            [k for k in m if k.startswith("loss/scale_")] == [f"loss/scale_{int(m['scale_drawn'])}"] for m in metrics
        )
    # Scales and LoRA strategy are stored with the checkpoint.
    saved = (run_dir / "checkpoints" / f"step_{steps:08d}" / "config.yaml").read_text()
    assert f"mode: {mode}" in saved and f"strategy: {strategy}" in saved


def test_two_rank_accumulation_draws_per_micro_batch_alike_on_both_ranks(tmp_path, shards_pattern):
    """grad_accum_steps 2: each micro-batch draws its own m (so a step can train two), every rank the same."""
    run_dir = tmp_path / "run"
    steps = 6
    cmd = [
        *torchrun(), "-m", "mtrain",
        "train", str(REPO / "configs/tiny.yaml"), f"run.dir={run_dir}", f"data.shards={shards_pattern}",
        f"run.max_steps={steps}", "optim.warmup_steps=2", "logging.progress=false",
        "checkpoint.export_at_end=false", "checkpoint.save_at_end=false", "optim.grad_accum_steps=2",
        "data.micro_batch_size=2", "matryoshka.tokens.mode=mqt", "matryoshka.tokens.mqt_queries=16",
        "matryoshka.tokens.policy=sample_per_step",
    ]  # fmt: skip
    proc = run(cmd, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0
    metrics = read_metrics(run_dir)
    assert len(metrics) == steps
    assert all(m["scale_drawn_rank_spread"] == 0 for m in metrics), "ranks drew different scales"
    trained = [sorted(int(k.split("_")[-1]) for k in m if k.startswith("loss/scale_")) for m in metrics]
    assert all(set(scales) <= set(range(2, 17, 2)) for scales in trained)
    assert any(len(scales) == 2 for scales in trained), trained  # two micro-batches, two draws
