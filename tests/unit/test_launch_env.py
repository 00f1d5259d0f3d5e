import pytest

from mtrain.launch.env import first_slurm_host, world_info_from_env


def test_single_process_defaults():
    world = world_info_from_env({})
    assert (world.rank, world.world_size, world.launcher, world.master_addr) == (0, 1, "none", "127.0.0.1")


def test_torchrun_and_deepspeed_variables():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "1234",
    }
    world = world_info_from_env(env)
    assert (world.rank, world.world_size, world.local_rank, world.master_addr, world.master_port) == (
        3,
        4,
        1,
        "n0",
        1234,
    )


def test_open_mpi_single_node_uses_loopback():
    env = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    world = world_info_from_env(env)
    assert (world.rank, world.world_size, world.local_rank, world.launcher) == (1, 2, 1, "openmpi")
    assert world.master_addr == "127.0.0.1"


def test_pmi_variables():
    world = world_info_from_env({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "4"})
    assert (world.rank, world.world_size, world.launcher) == (2, 4, "pmi")


def test_slurm_multi_node_takes_first_host_of_nodelist():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    world = world_info_from_env(env)
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (9, 16, 1, 8)
    assert world.master_addr == "gpu07"


def test_launch_variables_take_precedence_over_slurm():
    # torchrun inside an srun allocation: torchrun's per-process RANK wins over SLURM_PROCID.
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert world_info_from_env(env).rank == 1


@pytest.mark.parametrize(
    "nodelist,host",
    [("node1", "node1"), ("gpu[03-05,09]", "gpu03"), ("a[1,2],b7", "a1"), ("c-[010-011]", "c-010")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_multi_node_mpi_without_master_is_a_clear_error():
    env = {"PMI_RANK": "0", "PMI_SIZE": "16", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "8"}
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        world_info_from_env(env)


def test_export_gives_deepspeeds_cpu_accelerator_its_device_count(monkeypatch):
    """Under torchrun, mpirun or srun (not DeepSpeed's launcher) LOCAL_SIZE was unset, and DeepSpeed's
    CPU accelerator counted NUMA nodes with a `numactl --hardware` subprocess on every gradient reduce."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    environ: dict[str, str] = {}
    world_info_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}).export(environ)
    monkeypatch.setattr("os.environ", environ)
    assert environ["LOCAL_SIZE"] == "2"
    assert CPU_Accelerator().device_count() == 2  # a count of this node's ranks, read without a subprocess


def test_process_group_start_neither_builds_nor_starts_deepspeeds_shared_memory_allreduce(tmp_path):
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce at every start and, when
    LOCAL_SIZE equals the world size, creates a 66 MiB /dev/shm workspace per rank. ZeRO training
    never uses it, its files were never unlinked (20 GiB of RAM held on this machine after a day of
    tests), and where /dev/shm is small (Docker's 64 MiB default) every rank spins forever in its
    set-up. DeepSpeed's own launcher sets LOCAL_SIZE itself; mtrain exports it (the device count)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port, launch_env

    port = free_port()
    extensions = tmp_path / "extensions"
    env = {**launch_env(), "LOCAL_SIZE": "1", "MASTER_PORT": str(port), "TORCH_EXTENSIONS_DIR": str(extensions)}
    code = (
        "import os; from mtrain.launch.distributed import init_distributed; "
        f"init_distributed('gloo', 60, {port}); print('LOCAL_SIZE', os.environ['LOCAL_SIZE'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    workspaces = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for leftover in workspaces:
        leftover.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOCAL_SIZE 1" in proc.stdout
    assert workspaces == []
    assert not (extensions / "deepspeed_shm_comm").exists()  # not even compiled


def test_deepspeed_ops_build_in_this_environments_own_folder(monkeypatch):
    """One ~/.cache/torch_extensions for every checkout: each start rebuilt the previous checkout's
    op, and a process killed holding its lock file left every later start waiting forever."""
    import os
    import sys

    from mtrain.launch.distributed import use_environment_extension_cache

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    use_environment_extension_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    use_environment_extension_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/elsewhere"
