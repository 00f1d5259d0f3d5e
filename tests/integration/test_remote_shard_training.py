"""Training from remote and compressed shards keeps every guarantee of local tars: a 2-rank run
streaming from a loopback HTTP server, SIGKILLed after a save, resumes bit-exactly; so does a run
over gzipped copies of the same shards, read as local `.tar.gz` files and through `pipe:cat`."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from tests.conftest import launch_env, mtrain_train, read_metrics, run
from tests.shard_server import serve_folder

pytestmark = pytest.mark.timeout(900)

STEPS, SAVE_EVERY = 6, 3


def train_cmd(run_dir: Path, shards: str) -> list[str]:
    return mtrain_train(
        run_dir,
        shards,
        f"run.max_steps={STEPS}",
        f"checkpoint.save_every={SAVE_EVERY}",
        "checkpoint.export_at_end=false",
        f"data.shard_cache_dir={run_dir.parent / ('cache-' + run_dir.name)}",
        ranks=2,
    )


def killed_and_resumed(run_dir: Path, shards: str) -> tuple:
    crashed = run(
        train_cmd(run_dir, shards),
        cwd=run_dir.parent,
        env={**launch_env(), "MTRAIN_FAULT_INJECT": f"saved@{SAVE_EVERY}"},
    )
    resumed = run(train_cmd(run_dir, shards), cwd=run_dir.parent)
    return crashed, resumed


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss"], m["grad_norm"]) for m in read_metrics(run_dir)}


def assert_resumed_bit_exactly(crashed, resumed, got: Path, expected: Path) -> None:
    assert crashed.returncode != 0 and resumed.returncode == 0
    assert f"at step {SAVE_EVERY} (exact load, RNG restored)" in resumed.stderr
    a, b = losses(got), losses(expected)
    assert sorted(a) == list(range(1, STEPS + 1))
    assert all(a[step] == b[step] for step in range(1, STEPS + 1)), (a, b)


def test_http_gzipped_and_pipe_shards_train_and_resume_bit_exactly(tmp_path, sample_shards):
    """One source mixing every road: two shards over loopback HTTP, one local `.tar.gz`, one gzipped
    shard through `pipe:cat`; the same samples as the local tars, so the same losses bit for bit."""
    names = [f"shard-{i:06d}.tar" for i in range(4)]
    straight = tmp_path / "straight"
    assert run(train_cmd(straight, str(sample_shards / "shard-{000000..000003}.tar")), cwd=tmp_path).returncode == 0

    gz = tmp_path / "gz"
    gz.mkdir()
    for name in names[2:]:
        with open(sample_shards / name, "rb") as src, gzip.open(gz / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    with serve_folder(sample_shards) as (url, requests):
        shards = "::".join(
            [f"{url}/{names[0]}", f"{url}/{names[1]}", str(gz / f"{names[2]}.gz"), f"pipe:cat {gz}/{names[3]}.gz"]
        )
        crashed, resumed = killed_and_resumed(tmp_path / "remote", shards)
    assert_resumed_bit_exactly(crashed, resumed, tmp_path / "remote", straight)
    assert set(requests) == {"index.json", *names[:2]}
    # Each launch copies each remote shard once per machine (ranks and workers share the copy).
    assert requests.count(names[0]) <= 2
