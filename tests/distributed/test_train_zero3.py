"""Real 2-rank ZeRO-3 training under real launchers (torchrun, deepspeed), and plain python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, free_port, read_metrics, run, torchrun

pytestmark = pytest.mark.timeout(420)


def train_args(run_dir: Path, shards: str, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        str(REPO / "configs/tiny.yaml"),
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"run.max_steps={steps}",
        "logging.progress=false",
        *extra,
    ]


def test_torchrun_two_ranks_shards_parameters_and_learns(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    cmd = [
        *torchrun(),
        "-m",
        "mtrain",
        *train_args(run_dir, shards_pattern, 24, "zero.param_persistence_threshold=0"),
    ]
    proc = run(cmd, cwd=tmp_path)
    assert proc.returncode == 0

    # Each rank holds about half of the parameter elements right after construction, and again once
    # the engine has partitioned the adapters and PEFT's trainable module copies.
    reports = [json.loads((run_dir / "ranks" / f"rank{r:05d}.json").read_text()) for r in range(2)]
    for stage in ("constructed", "engine"):
        total = reports[0]["parameter_elements"][stage]["total"]
        assert total > 100_000
        for report in reports:
            assert report["world_size"] == 2
            assert abs(report["parameter_elements"][stage]["local"] / total - 0.5) < 0.05, (stage, report)
    assert reports[0]["config_hash"] == reports[1]["config_hash"]

    # The loss falls clearly.
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-4:]) / 4
    assert last < 0.6 * first, (first, last)
    assert metrics[-1]["tokens"] > 0 and metrics[-1]["lr"] > 0

    # The run folder holds the resolved config, DeepSpeed JSON, metrics, checkpoint and export.
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["train_batch_size"] == 2 * 8
    assert "param_persistence_threshold: 0" in (run_dir / "config.yaml").read_text()
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000024"
    assert len(list((ckpt / "step_00000024").glob("zero_pp_rank_*_model_states.pt"))) == 2
    assert (run_dir / "export" / "model" / "model.safetensors").is_file()
    assert (run_dir / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_deepspeed_launcher_two_ranks(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "mtrain",
        *train_args(
            run_dir,
            shards_pattern,
            4,
            "checkpoint.export_at_end=false",
            "logging.log_every=3",
            "checkpoint.save_every=2",
            "checkpoint.keep_last=0",
        ),
    ]
    proc = run(cmd, cwd=tmp_path)
    assert proc.returncode == 0
    reports = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("*.json"))]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["launcher"] == "env" and r["world_size"] == 2 for r in reports)

    # Metrics are reduced and logged every 3rd step and at the last; the steps in between make no
    # collective, yet the token count a checkpoint holds still covers every step of both ranks.
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [3, 4]

    def tokens_seen(step: int) -> int:
        manifest = run_dir / "checkpoints" / f"step_{step:08d}" / "manifest.json"
        return json.loads(manifest.read_text())["meta"]["trainer"]["tokens_seen"]

    assert tokens_seen(2) > 0  # steps 1 and 2 were never logged
    assert tokens_seen(4) - tokens_seen(2) == sum(m["tokens"] for m in metrics)


def test_plain_python_is_world_size_one(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    proc = run(
        [
            str(BIN / "python"),
            "-m",
            "mtrain",
            *train_args(run_dir, shards_pattern, 3, "checkpoint.export_at_end=false"),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0
    report = json.loads((run_dir / "ranks" / "rank00000.json").read_text())
    assert (report["world_size"], report["launcher"]) == (1, "none")
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 8
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_missing_shards_fail_before_any_process_group(tmp_path):
    proc = run(
        [str(BIN / "python"), "-m", "mtrain", *train_args(tmp_path / "run", str(tmp_path / "none-{0..1}.tar"), 3)],
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "data.shards" in proc.stderr and "mtrain data sample" in proc.stderr
    assert not (tmp_path / "run").exists()
