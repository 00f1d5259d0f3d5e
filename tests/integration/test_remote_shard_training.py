"""Training from remote and compressed shards keeps every guarantee of local tars: a 2-rank run
streaming from a loopback HTTP server that cuts one shard's body part-way every time, SIGKILLed
after a save, resumes bit-exactly; so does a run over gzipped copies of the same shards, read as
local `.tar.gz` files and through `pipe:cat`. The cut shard's samples before the break are
delivered and the rest counted, exactly as from a local tar cut at the same byte."""

from __future__ import annotations

import gzip
import os
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
        "data.max_bad_fraction=1.0",  # the cut shard's lost samples are counted, not a reason to stop
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


def assert_same_ledger(got: Path, expected: Path) -> None:
    """Samples delivered and samples counted as lost (summed over ranks, carried across the resume)."""
    last = [read_metrics(run_dir)[-1] for run_dir in (got, expected)]
    ledgers = [{name: m[name] for name in ("data/samples", "data/bad/truncated_tar")} for m in last]
    assert ledgers[0] == ledgers[1] and ledgers[0]["data/bad/truncated_tar"] > 0, ledgers
    assert ledgers[0]["data/samples"] == STEPS * 2 * 8  # every step trained on full micro-batches


def test_http_gzipped_and_pipe_shards_train_and_resume_bit_exactly(tmp_path, sample_shards):
    """One source mixing every road: two shards over loopback HTTP (the server drops the connection
    40% into shard 1's body, every time), one local `.tar.gz`, one gzipped shard through `pipe:cat`;
    the same samples as the local tars with shard 1 cut at the same byte, so the same losses bit for
    bit, and the same ledger: the samples before the break delivered, the rest counted."""
    names = [f"shard-{i:06d}.tar" for i in range(4)]
    cut = int((sample_shards / names[1]).stat().st_size * 0.4)
    local = tmp_path / "local"
    local.mkdir()
    for name in names:
        shutil.copyfile(sample_shards / name, local / name)
    (local / names[1]).write_bytes((sample_shards / names[1]).read_bytes()[:cut])
    shutil.copyfile(sample_shards / "index.json", local / "index.json")  # says 48 samples, as the server's does
    later = local.stat().st_mtime + 10
    os.utime(local / "index.json", (later, later))  # the folder untouched since: its entries are trusted
    straight = tmp_path / "straight"
    assert run(train_cmd(straight, str(local / "shard-{000000..000003}.tar")), cwd=tmp_path).returncode == 0

    gz = tmp_path / "gz"
    gz.mkdir()
    for name in names[2:]:
        with open(sample_shards / name, "rb") as src, gzip.open(gz / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    with serve_folder(sample_shards, drop_after={names[1]: cut}) as (url, requests):
        shards = "::".join(
            [f"{url}/{names[0]}", f"{url}/{names[1]}", str(gz / f"{names[2]}.gz"), f"pipe:cat {gz}/{names[3]}.gz"]
        )
        crashed, resumed = killed_and_resumed(tmp_path / "remote", shards)
    assert_resumed_bit_exactly(crashed, resumed, tmp_path / "remote", straight)
    assert_same_ledger(tmp_path / "remote", straight)
    assert set(requests) == {"index.json", *names[:2]}
    # Each rank's loader tries the cut shard once and retries it data.remote_retries (3) times, per launch.
    assert requests.count(names[1]) == 2 * 2 * (3 + 1)
    # Each launch copies each remote shard once per machine (ranks and workers share the copy).
    assert requests.count(names[0]) <= 2
