"""Rank, world size and rendezvous address from whichever launcher started this process.

This is the one place that reads launcher variables. Supported, in order of precedence:

- torchrun and the deepspeed launcher ("env"): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE;
- Open MPI (mpirun, deepspeed --launcher openmpi): OMPI_COMM_WORLD_*;
- MPICH / Intel MPI / Hydra (PMI): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID;
- Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST;
- nothing: a single process (plain `python -m mtrain`).

The master address is never taken from `hostname -I` (it is not loopback on every machine):
MASTER_ADDR wins; otherwise a single-node job uses 127.0.0.1, a Slurm job the first host of its
node list, and an MPI job the host name of rank 0 broadcast through mpi4py.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self, environ: dict[str, str] | None = None) -> None:
        """Write the torch.distributed variables, so env:// rendezvous sees this world, and DeepSpeed's
        count of this node's ranks."""
        target = os.environ if environ is None else environ
        target.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            # Only DeepSpeed's own launcher sets LOCAL_SIZE. Without it, DeepSpeed's CPU accelerator
            # counts its devices by running `numactl --hardware` in a subprocess, on every ZeRO-3
            # gradient reduce (several per step: 2-8 ms of fork and exec each).
            LOCAL_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip().lstrip("-").isdigit():
            return int(env[name])
    return None


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    stem, ranges = match.groups()
    if not ranges:
        return stem
    first = ranges.split(",")[0].split("-")[0]
    return f"{stem}{first}"


def _mpi_rank0_host() -> str | None:
    """Rank 0's host name over MPI, when mpi4py is importable in an MPI-launched process."""
    try:
        from mpi4py import MPI  # noqa: PLC0415  (optional extra)
    except ImportError:
        return None
    return MPI.COMM_WORLD.bcast(socket.gethostname(), root=0)


def world_info_from_env(env: Mapping[str, str] | None = None, default_port: int = 29500) -> WorldInfo:
    """Read this process's place in the job from its launcher's environment."""
    real_process = env is None  # only a real MPI-launched process may ask mpi4py
    env = os.environ if env is None else env
    launchers = [
        ("env", ("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE",)),
        (
            "openmpi",
            ("OMPI_COMM_WORLD_RANK",),
            ("OMPI_COMM_WORLD_SIZE",),
            ("OMPI_COMM_WORLD_LOCAL_RANK",),
            ("OMPI_COMM_WORLD_LOCAL_SIZE",),
        ),
        ("pmi", ("PMI_RANK", "PMIX_RANK"), ("PMI_SIZE",), ("MPI_LOCALRANKID",), ("MPI_LOCALNRANKS",)),
        ("slurm", ("SLURM_PROCID",), ("SLURM_NTASKS",), ("SLURM_LOCALID",), ("SLURM_NTASKS_PER_NODE",)),
    ]
    for name, rank_keys, size_keys, local_keys, local_size_keys in launchers:
        rank, size = _int(env, *rank_keys), _int(env, *size_keys)
        if rank is None or size is None:
            continue
        local_rank = _int(env, *local_keys)
        local_size = _int(env, *local_size_keys)
        if name == "slurm" and local_size is None:
            nodes = _int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1
            local_size = max(1, size // nodes)
        local_rank = rank if local_rank is None else local_rank
        local_size = size if local_size is None else local_size
        return WorldInfo(
            rank=rank,
            world_size=size,
            local_rank=local_rank,
            local_world_size=local_size,
            master_addr=_master_addr(name, env, size, local_size, real_process),
            master_port=_int(env, "MASTER_PORT") or default_port,
            launcher=name,
        )
    return WorldInfo(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT") or default_port, "none")


def _master_addr(launcher: str, env: Mapping[str, str], world_size: int, local_world_size: int, use_mpi: bool) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if world_size == local_world_size:
        return "127.0.0.1"  # one node: loopback, whatever the host's interfaces are
    if launcher == "slurm" and env.get("SLURM_JOB_NODELIST"):
        return first_slurm_host(env["SLURM_JOB_NODELIST"])
    if launcher in ("openmpi", "pmi") and use_mpi:
        host = _mpi_rank0_host()
        if host:
            return host
    raise RuntimeError(
        f"{launcher}: a multi-node job needs MASTER_ADDR (rank 0's host); export it in the launch script"
    )
