"""launchers/ against the real launchers on loopback: torchrun with two rendezvous agents, the
deepspeed runner with a hostfile and Open MPI, mpirun, Slurm's sbatch on a real local cluster; a
rank that never starts; a rank killed mid-run. Every run logs its time from launch to first step
(first_step.json in the run folder), printed here with `-s`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, free_port, launcher_overrides, read_metrics, run, script_env

pytestmark = pytest.mark.timeout(420)

CONFIG = str(REPO / "configs/tiny.yaml")
AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def launcher(name: str) -> list[str]:
    return ["bash", str(REPO / "launchers" / name)]


def rank_reports(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]


def first_step_seconds(run_dir: Path, label: str) -> float:
    timing = json.loads((run_dir / "first_step.json").read_text())
    print(f"\n[launch timing] {label}: first step {timing['first_step_s']} s after launch", file=sys.stderr)
    return timing["first_step_s"]


def assert_trained(run_dir: Path, steps: int, launcher_name: str) -> None:
    reports = rank_reports(run_dir)
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["launcher"] == launcher_name for r in reports), reports
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert first_step_seconds(run_dir, launcher_name) > 0


# ── dry runs: validate first, print the command and the DeepSpeed JSON, start nothing ────────
DRY_RUNS = {
    "torchrun.sh": ({"NPROC_PER_NODE": "4"}, 4, "torch.distributed.run --nnodes 1 --nproc_per_node 4"),
    "deepspeed.sh": ({"NPROC_PER_NODE": "2"}, 2, "deepspeed.launcher.runner --num_gpus 2"),
    "torchrun-multinode.sh": (
        {"NNODES": "2", "NPROC_PER_NODE": "8", "RDZV_ENDPOINT": "node01:29400", "NODE_RANK": "1"},
        16,
        "--rdzv-backend c10d --rdzv-endpoint node01:29400",
    ),
    "deepspeed-multinode.sh": (
        {"HOSTFILE": "hosts", "MASTER_ADDR": "node01", "DS_LAUNCHER": "slurm", "NPROC_PER_NODE": "8"},
        16,
        "--hostfile hosts --launcher slurm --master_addr node01",
    ),
    "mpirun.sh": ({"NNODES": "2", "NPROC_PER_NODE": "8", "MASTER_ADDR": "node01"}, 16, "-np 16"),
    "slurm.sbatch": ({"NNODES": "2", "NPROC_PER_NODE": "8", "SLURM_MODE": "torchrun"}, 16, "--nnodes 2"),
}


@pytest.mark.parametrize("script", sorted(DRY_RUNS))
def test_dry_run_prints_command_and_deepspeed_json(tmp_path, script):
    knobs, world_size, expected = DRY_RUNS[script]
    (tmp_path / "hosts").write_text("node01 slots=8\nnode02 slots=8\n")
    proc = run(
        # The shards live on the (imaginary) cluster's filesystem, not on this machine.
        [*launcher(script), CONFIG, "data.micro_batch_size=3", "run.max_steps=7", "run.remote_paths=[data.shards]"],
        cwd=tmp_path,
        env=script_env(DRY_RUN="1", **knobs),
        timeout=120,
    )
    assert proc.returncode == 0
    command = proc.stdout.split("# command:\n")[1]
    assert expected in command
    assert f"train {CONFIG} " in command and "run.max_steps=7" in command
    ds_json = proc.stdout.split("\n{", 1)[1].split("\n}\n")[0]
    ds = json.loads("{" + ds_json + "\n}")
    assert ds["train_batch_size"] == 3 * world_size
    assert not (tmp_path / "runs").exists()  # nothing trained


@pytest.mark.parametrize("script", ["torchrun.sh", "slurm.sbatch", "mpirun.sh"])
def test_bad_config_fails_before_anything_spawns(tmp_path, script):
    proc = run([*launcher(script), CONFIG, "optim.lrr=1"], cwd=tmp_path, env=script_env(), timeout=60)
    assert proc.returncode == 2
    assert "optim.lrr: unknown key; did you mean 'optim.lr'" in proc.stderr
    assert "# command:" not in proc.stdout


# ── real launches ─────────────────────────────────────────────────────────────────────────────
def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start in the background with output to a file (a pipe nobody drains would block the job)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: int) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher passes SIGTERM on to its ranks; SIGKILL would orphan them
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def test_torchrun_two_rendezvous_agents_play_two_nodes(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    env = script_env(
        NNODES="2",
        NPROC_PER_NODE="1",
        RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
        RDZV_ID="two-agents",
        LOCAL_ADDR="127.0.0.1",
        MAX_RESTARTS="0",
        MTRAIN_LAUNCH_TIME=str(time.time()),
    )
    cmd = [*launcher("torchrun-multinode.sh"), CONFIG, *launcher_overrides(run_dir, shards_pattern, 4)]
    agents = [start(cmd, tmp_path, env, tmp_path / f"agent{i}.log") for i in range(2)]
    for agent in agents:
        assert finish(agent, 360) == 0, agent.log.read_text()[-5000:]
    assert_trained(run_dir, 4, "env")


def test_deepspeed_runner_hostfile_with_openmpi(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    env = script_env(
        HOSTFILE=str(tmp_path / "hostfile"),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        DS_LAUNCHER="openmpi",
        LAUNCHER_ARGS="--mca btl_tcp_if_include lo",
        **AS_ROOT,
    )
    proc = run(
        [*launcher("deepspeed-multinode.sh"), CONFIG, *launcher_overrides(run_dir, shards_pattern, 4)],
        tmp_path,
        360,
        env,
    )
    assert proc.returncode == 0
    assert "mpirun -n 2 -hostfile" in proc.stdout + proc.stderr  # the runner really went through Open MPI
    assert_trained(run_dir, 4, "openmpi")


def test_mpirun_script_two_ranks(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    env = script_env(NP="2", MPIRUN=str(BIN / "mpirun"), MASTER_PORT=str(free_port()), **AS_ROOT)
    proc = run([*launcher("mpirun.sh"), CONFIG, *launcher_overrides(run_dir, shards_pattern, 4)], tmp_path, 360, env)
    assert proc.returncode == 0
    assert_trained(run_dir, 4, "openmpi")


def test_missing_rank_fails_clearly_within_the_timeout(tmp_path, shards_pattern):
    # World size 2, but only rank 0 is ever started.
    env = script_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [
        str(BIN / "python"),
        "-m",
        "mtrain",
        "train",
        CONFIG,
        *launcher_overrides(tmp_path / "run", shards_pattern, 4),
    ]
    proc = run([*cmd, "dist.init_timeout_s=20"], tmp_path, 240, env)
    assert proc.returncode == 3
    assert "mtrain: preflight error: rendezvous failed: rank 0 waited 20 s at 127.0.0.1:" in proc.stderr
    assert "for the other 1 rank(s)" in proc.stderr and "1/2 clients joined" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ── Slurm: a real single-node cluster on loopback (scripts/slurm-local.sh) ─────────────────────
def slurm_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "LOUD SKIP: the local Slurm cluster needs root (slurmd starts jobs as their users)"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        return f"LOUD SKIP: {', '.join(missing)} not installed; scripts/install.sh installs slurm-wlm and munge"
    return None


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # as in the test environment: the node must still get every CPU
        "SLURM_LOCAL_DIR": str(folder),
        "SLURMCTLD_PORT": str(free_port()),
        "SLURMD_PORT": str(free_port()),
    }
    script = ["bash", str(REPO / "scripts/slurm-local.sh")]
    started = subprocess.run([*script, "start"], env=env, capture_output=True, text=True, timeout=90)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"up with {len(os.sched_getaffinity(0))} CPUs" in started.stdout
    yield folder / "slurm.conf"
    subprocess.run([*script, "stop"], env=env, capture_output=True, text=True, timeout=60)


def test_slurm_sbatch_trains_and_checkpoints(tmp_path, shards_pattern, local_slurm):
    run_dir = tmp_path / "run"
    env = script_env(
        SLURM_CONF=str(local_slurm),
        OMP_NUM_THREADS="1",
        MASTER_PORT=str(free_port()),
        MTRAIN_LAUNCH_TIME=str(time.time()),
    )
    job_log = tmp_path / "job.out"
    cmd = [
        "sbatch",
        "--wait",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--time=10",
        f"--output={job_log}",
        str(REPO / "launchers/slurm.sbatch"),
        CONFIG,
        *launcher_overrides(run_dir, shards_pattern, 4, "checkpoint.save_every=2"),
    ]
    proc = run(cmd, tmp_path, 360, env)  # submitted from tmp_path: the script finds its own folder
    log = job_log.read_text() if job_log.exists() else ""
    assert proc.returncode == 0, log[-5000:]
    assert "attempt 0" in log and "srun --kill-on-bad-exit=1" in log
    assert_trained(run_dir, 4, "slurm")
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert len(list((checkpoints / "step_00000002").glob("zero_pp_rank_*_model_states.pt"))) == 2
    assert len(list((checkpoints / "step_00000004").glob("rank*_state.pt"))) == 2  # every rank's RNG state
    assert (checkpoints / "step_00000004" / "manifest.json").is_file()


# ── fault: kill -9 one rank mid-run; torchrun restarts the job and it resumes ─────────────────
def worker_pid(tag: str, rank: int | None = None) -> int | None:
    """The training process (a direct child of a torchrun agent) in the job whose environment carries
    `tag`; of `rank` when given."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if f"MTRAIN_TEST_TAG={tag}".encode() not in environ:
            continue
        if rank is not None and f"RANK={rank}".encode() not in environ:
            continue
        if b"torch.distributed.run" in parent_cmdline:  # not a helper process the rank forked
            return int(proc.name)
    return None


def test_kill_one_rank_restarts_and_resumes_to_the_same_loss(tmp_path, shards_pattern):
    steps, save_every = 12, 4

    def launch(run_dir: Path, restarts: str) -> subprocess.Popen:
        env = script_env(MAX_RESTARTS=restarts, MASTER_PORT=str(free_port()), MTRAIN_TEST_TAG=str(run_dir))
        cmd = [*launcher("torchrun.sh"), CONFIG, *launcher_overrides(run_dir, shards_pattern, steps)]
        cmd.append(f"checkpoint.save_every={save_every}")
        return start(cmd, tmp_path, env, tmp_path / f"{run_dir.name}.log")

    reference = launch(tmp_path / "reference", "0")
    assert finish(reference, 360) == 0, reference.log.read_text()[-5000:]
    expected = read_metrics(tmp_path / "reference")[-1]

    faulty_dir = tmp_path / "faulty"
    faulty = launch(faulty_dir, "1")
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and faulty.poll() is None:
        if (faulty_dir / "checkpoints" / "latest").exists():
            killed = worker_pid(str(faulty_dir), 1)
            if killed:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.2)
    assert killed, "rank 1 was not found (or the run ended) before the first checkpoint"
    assert finish(faulty, 360) == 0, faulty.log.read_text()[-5000:]
    output = faulty.log.read_text()

    # torchrun restarted the workers; the restarted job resumed from a checkpoint, not from step 1:
    # its first step (first_step.json is rewritten by every attempt) follows a saved step.
    resumed_at = json.loads((faulty_dir / "first_step.json").read_text())["step"] - 1
    assert resumed_at > 0 and resumed_at % save_every == 0, resumed_at
    assert f"at step {resumed_at}" in output and "resumed from" in output
    # Each step logged once (metrics past the checkpoint are trimmed on resume); the same final loss.
    metrics = read_metrics(faulty_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[-1]["loss"] == expected["loss"]


# ── fault: two torchrun agents (two "nodes"), kill -9 the second agent's worker ────────────────


def test_multinode_kill_restarts_every_agent_and_resumes_from_latest(tmp_path, shards_pattern):
    steps, save_every = 12, 4
    reference_dir = tmp_path / "reference"
    env = script_env(MAX_RESTARTS="0", MASTER_PORT=str(free_port()))
    cmd = [*launcher("torchrun.sh"), CONFIG, *launcher_overrides(reference_dir, shards_pattern, steps)]
    reference = start([*cmd, f"checkpoint.save_every={save_every}"], tmp_path, env, tmp_path / "reference.log")
    assert finish(reference, 360) == 0, reference.log.read_text()[-5000:]
    expected = read_metrics(reference_dir)[-1]

    run_dir = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [*launcher("torchrun-multinode.sh"), CONFIG, *launcher_overrides(run_dir, shards_pattern, steps)]
    cmd.append(f"checkpoint.save_every={save_every}")
    agents = []
    for i in range(2):
        env = script_env(
            NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=endpoint, RDZV_ID="kill-test", LOCAL_ADDR="127.0.0.1",
            MAX_RESTARTS="1", RDZV_TIMEOUT="120", MTRAIN_TEST_TAG=f"{run_dir}-agent{i}",
        )  # fmt: skip
        agents.append(start(cmd, tmp_path, env, tmp_path / f"agent{i}.log"))
    deadline = time.time() + 300
    killed = latest_at_kill = None
    while time.time() < deadline and all(a.poll() is None for a in agents):
        if (run_dir / "checkpoints" / "latest").exists():
            killed = worker_pid(f"{run_dir}-agent1")
            if killed:
                latest_at_kill = (run_dir / "checkpoints" / "latest").read_text().strip()
                os.kill(killed, signal.SIGKILL)
                killed_at = time.time()
                break
        time.sleep(0.2)
    assert killed, "the second agent's worker was not found (or the run ended) before the first checkpoint"
    for agent in agents:
        assert finish(agent, 360) == 0, agent.log.read_text()[-5000:]
    output = "".join(agent.log.read_text() for agent in agents)

    # One restart of every agent, into the same rendezvous; the restarted job resumed from `latest`
    # (or the checkpoint saved right after it), fast: its first step came within 60 s of the kill.
    first_step = json.loads((run_dir / "first_step.json").read_text())
    resumed_at = first_step["step"] - 1
    assert resumed_at >= int(latest_at_kill.removeprefix("step_")), (resumed_at, latest_at_kill)
    assert output.count("resumed from") == 1 and f"at step {resumed_at}" in output
    assert (run_dir / "first_step.json").stat().st_mtime - killed_at < 60
    assert "DistStoreError" not in output and "connectFullMesh" not in output
    # The surviving rank says in one line what happened, without a traceback.
    assert "lost a peer rank mid-step" in output or "mtrain: interrupted at step" in output  # (SIGTERM by its agent)
    assert "Traceback" not in output
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[-1]["loss"] == expected["loss"]
