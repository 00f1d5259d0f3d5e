"""A short tiny M3 training run, its TensorBoard event files read back with tensorboard's reader,
and `mtrain plot` on the same run folder."""

from __future__ import annotations

import sys

import pytest

from mtrain.cli import main
from mtrain.metrics.plot import loss_keys
from tests.conftest import REPO, read_metrics, run

pytestmark = pytest.mark.timeout(300)

SCALES = (1, 4, 16, 64)


def test_tensorboard_holds_per_scale_and_system_scalars(tmp_path, shards_pattern):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "mtrain", "train", str(REPO / "configs/tiny.yaml"),
        f"run.dir={run_dir}", f"data.shards={shards_pattern}", "run.max_steps=3",
        "matryoshka.tokens.mode=m3", f"matryoshka.tokens.scales=[{','.join(map(str, SCALES))}]",
        "logging.peak_tflops=1.0", "logging.progress=false",
        "checkpoint.save_at_end=false",
    ]  # fmt: skip
    assert run(cmd, cwd=tmp_path).returncode == 0

    (events_dir,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = [f"loss/scale_{s}" for s in SCALES] + [
        "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "data_wait_frac",
        "memory/rss_gb", "tflops_per_rank", "mfu",
    ]  # fmt: skip
    assert set(expected) <= tags, sorted(set(expected) - tags)
    logged = {m["step"]: m for m in read_metrics(run_dir)}
    for tag in expected:
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3], tag  # one value per step
        for scalar in scalars:
            assert scalar.value == pytest.approx(logged[scalar.step][tag], rel=1e-6), tag
    for scalar in events.Scalars("data_wait_frac"):
        assert 0.0 <= scalar.value < 1.0
    assert all(s.value > 0.1 for s in events.Scalars("memory/rss_gb"))  # GiB held by the rank-0 process
    # Every scale's loss starts near ln(vocab) for a random tiny model and the mean matches the total.
    for step, record in logged.items():
        mean = sum(record[f"loss/scale_{s}"] for s in SCALES) / len(SCALES)
        assert record["loss"] == pytest.approx(mean, rel=1e-4), step
    assert logged[3]["mfu"] == pytest.approx(logged[3]["tflops_per_rank"] / 1.0)

    # `mtrain plot` turns the same run into PNGs with the per-scale curves.
    assert loss_keys(read_metrics(run_dir)) == ["loss", *(f"loss/scale_{s}" for s in SCALES)]
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "plots")]) == 0
    for name in ("loss.png", "throughput.png", "utilisation.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 10_000, name
