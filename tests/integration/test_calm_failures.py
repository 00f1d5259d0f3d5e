"""Failures a user lives through: mtrain's own errors print one line and are not retried by the
launchers' restart loops; Ctrl-C ends a torchrun job with one line that says where the run stands."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, launch_env, launcher_overrides, mtrain_train, run, script_env
from tests.data_factory import write_bad_shards

pytestmark = pytest.mark.timeout(420)

CONFIG = str(REPO / "configs/tiny.yaml")


def test_own_error_is_one_line_and_the_traceback_needs_debug(tmp_path):
    cmd = mtrain_train(tmp_path / "run", str(tmp_path / "missing-{000000..000001}.tar"))
    calm = run(cmd, tmp_path, 120)
    assert calm.returncode == 2
    assert calm.stderr.strip().splitlines() == [calm.stderr.strip()]  # one line
    assert calm.stderr.startswith("mtrain: error: data.shards: 2 shard(s) not found")
    loud = run(cmd, tmp_path, 120, {**launch_env(), "MTRAIN_DEBUG": "1"})
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr


def test_bad_data_under_torchrun_restarts_is_not_retried(tmp_path):
    bad = write_bad_shards(tmp_path / "bad")
    env = script_env(MAX_RESTARTS="2", MASTER_PORT=str(free_port()))
    knobs = ("data.max_bad_fraction=0.0", "data.bad_fraction_min_samples=1", "data.num_workers=0")
    cmd = [
        "bash",
        str(REPO / "launchers/torchrun.sh"),
        CONFIG,
        *launcher_overrides(tmp_path / "run", bad["pattern"], 4, *knobs),
    ]
    proc = run(cmd, tmp_path, 300, env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-5000:]
    assert output.count("mtrain: attempt ") == 1  # ran once, although two restarts were allowed
    assert "mtrain: data error" in output and "data.max_bad_fraction=0.0" in output
    assert "mtrain: not retrying" in output
    frames = "".join(line for line in output.splitlines() if line.strip().startswith('File "'))
    assert f"{REPO / 'mtrain'}/" not in frames  # no frame of mtrain's own code (the clone may sit in a folder "mtrain")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("target", ["job", "ranks"])
def test_sigint_ends_a_torchrun_job_with_one_summary_line(tmp_path, shards_pattern, target):
    """Ctrl-C on the job's process group, or SIGINT to torchrun alone (a scheduler signalling the ranks; also
    what the script sees when bash skips its INT trap because torchrun then exits normally): no restart."""
    run_dir = tmp_path / "run"
    env = script_env(MAX_RESTARTS="2", MASTER_PORT=str(free_port()))
    cmd = ["bash", str(REPO / "launchers/torchrun.sh"), CONFIG]
    cmd += launcher_overrides(run_dir, shards_pattern, 10_000, "checkpoint.save_every=2")
    log = tmp_path / "job.log"
    with log.open("w") as out:
        # Its own session, as a terminal's foreground job: Ctrl-C signals the whole group.
        job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and job.poll() is None and not (run_dir / "checkpoints" / "latest").exists():
            time.sleep(0.2)
        assert job.poll() is None, log.read_text()[-5000:]
        if target == "job":
            os.killpg(job.pid, signal.SIGINT)
        else:
            for agent in children(job.pid):
                os.kill(agent, signal.SIGINT)
        try:
            status = job.wait(120)
        finally:
            if job.poll() is None:  # a restarted job would run on beside the rest of the suite
                os.killpg(job.pid, signal.SIGKILL)
    output = log.read_text()
    assert status == 130, output[-5000:]
    assert output.count("mtrain: attempt ") == 1
    last = output.strip().splitlines()[-1]
    assert last.startswith("mtrain: interrupted at step "), output[-5000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert f"latest checkpoint {run_dir / 'checkpoints' / latest}" in last
    continue_with = last.split("continue with: ", 1)[1]
    assert continue_with.startswith(f"{REPO / 'launchers/torchrun.sh'} {CONFIG} run.dir={run_dir} ")
    assert continue_with.endswith("checkpoint.save_every=2")
