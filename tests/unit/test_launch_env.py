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
