"""Shared fixtures: sample shards, free ports, and running real launchers as subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict[str, str]:
    """Environment for child launches: repo importable, no inherited rank variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "SLURM_"))
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(
    cmd: list[str], cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command; on failure show its output so the test report says why."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or launch_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-10000:])
    return proc


def torchrun(*args: str, ranks: int = 2) -> list[str]:
    """torchrun on one node with `ranks` processes and a free master port, then `args`."""
    return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()), *args]


def script_env(**knobs: str) -> dict[str, str]:
    """The child environment plus launcher knobs; the venv's launchers come first on PATH."""
    env = launch_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = str(BIN / "python")
    env.update(knobs)
    return env


def launcher_overrides(run_dir: Path, shards: str, steps: int, *extra: str) -> list[str]:
    """The overrides a launcher test passes after the config: a short quiet run without export."""
    return [
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"run.max_steps={steps}",
        "logging.progress=false",
        "logging.tensorboard=false",
        "checkpoint.export_at_end=false",
        *extra,
    ]


def mtrain_train(run_dir: Path, shards: str, *overrides: str, ranks: int = 1) -> list[str]:
    """`mtrain train configs/tiny.yaml` as a command: plain python for 1 rank, torchrun for more."""
    launcher = [str(BIN / "python"), "-m", "mtrain"]
    if ranks > 1:
        launcher = torchrun("-m", "mtrain", ranks=ranks)
    config = [str(REPO / "configs/tiny.yaml"), f"run.dir={run_dir}", f"data.shards={shards}", "logging.progress=false"]
    return [*launcher, "train", *config, *overrides]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    from data_pipeline.sample_data import write_sample_shards

    out = tmp_path_factory.mktemp("sample")
    write_sample_shards(out, num_shards=4, samples_per_shard=48, seed=0)
    return out


@pytest.fixture
def shards_pattern(sample_shards: Path) -> str:
    return str(sample_shards / "shard-{000000..000003}.tar")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; GPU-only paths (flash-attn, NCCL, bf16) are switched by config")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
