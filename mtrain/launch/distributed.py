"""Process-group start-up from the launcher's environment, rank-0 work, and rank-0 printing.

Two timeouts: `dist.init_timeout_s` bounds the rendezvous (a missing peer fails start-up fast);
`dist.collective_timeout_s` then bounds every collective of the run. Rank-0-only work that can
take minutes never sits inside a collective: `run_on_main` makes the other ranks poll a store key.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from mtrain.launch.env import WorldInfo, world_info_from_env
from mtrain.launch.preflight import rendezvous_failure

_WORLD: WorldInfo | None = None


def leave_finished_job(code: int) -> int:
    """Return `code`; a multi-rank process that finished its run exits here without finalisation.

    After `destroy_process_group`, a thread of the CPU communication stack can still be joinable
    when the interpreter runs C++ static destructors; that destructor calls std::terminate
    ("terminate called without an active exception", SIGABRT), which turned about 1 in 10 finished
    2-rank runs into failed ones. By this point every file mtrain writes is closed (checkpoint,
    export, metrics sinks), so flushing the standard streams and logging is all that is left.
    """
    if _WORLD is None or _WORLD.world_size == 1:
        return code
    import logging  # noqa: PLC0415

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_environment_extension_cache() -> None:
    """Build and load DeepSpeed's C++ ops (CPU Adam) in this Python environment's own folder.

    torch's default cache, ~/.cache/torch_extensions, is shared by every checkout and venv of a
    user: each one's DeepSpeed path differs, so each start rebuilt the op of the last one, and a
    process killed while holding the cache's lock file left every later start of every checkout
    waiting on it forever. `scripts/install.sh` prebuilds into the same folder. A user's
    TORCH_EXTENSIONS_DIR wins; an environment that is not writable keeps torch's default.
    """
    if os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def keep_deepspeed_shm_allreduce_off() -> None:
    """Stop DeepSpeed's CPU backend from building and starting its shared-memory all-reduce.

    Only DeepSpeed's tensor-parallel inference calls it (ZeRO reduce-scatters and all-gathers). Yet
    at every process-group start the backend JIT-compiles it, and where LOCAL_SIZE equals the world
    size it creates a 66 MiB /dev/shm workspace per rank that is never unlinked (RAM lost per job),
    and where /dev/shm is smaller than the workspaces (Docker's 64 MiB default) every rank spins
    forever in its set-up. Marking the op incompatible makes the backend use the process group.
    """
    import deepspeed.ops  # noqa: PLC0415
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def init_distributed(
    backend: str,
    timeout_s: int,
    default_port: int,
    collective_timeout_s: int | None = None,
    device: str = "cpu",
) -> WorldInfo:
    """Join (or, for a single process, create) the default process group through DeepSpeed.

    `timeout_s` bounds the rendezvous; once every rank is in, collectives are bounded by
    `collective_timeout_s` (unchanged when None). On CUDA each rank first takes its local GPU.
    """
    global _WORLD
    import deepspeed  # noqa: PLC0415  (slow import, kept off the `validate` path)
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    # DeepSpeed calls these collectives on every gather; torch warns on each call.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")
    use_environment_extension_cache()
    keep_deepspeed_shm_allreduce_off()
    world = world_info_from_env(default_port=default_port)
    if world.launcher == "none":
        # A lone process still needs a process group for DeepSpeed; pick a port nobody holds.
        world = WorldInfo(0, 1, 0, 1, "127.0.0.1", free_port(), "none")
    world.export()
    if device == "cuda":
        # Before any CUDA work: otherwise every rank's NCCL communicator and allocations start on GPU 0.
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        try:
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                join_agent_store(backend, world, timedelta(seconds=timeout_s))
            # The timeout bounds the rendezvous too: rank 0's store waits that long for the others,
            # the others retry reaching rank 0 that long. No rank hangs forever on a missing peer.
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=False,  # its MPI discovery takes MASTER_ADDR from `hostname -I`
                timeout=timedelta(seconds=timeout_s),
                rank=world.rank,
                world_size=world.world_size,
                verbose=False,
            )
        except dist.DistError as exc:
            raise rendezvous_failure(exc, world, timeout_s) from exc
        if collective_timeout_s is not None:
            # The group was created with the rendezvous timeout; from here on collectives get their own.
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=collective_timeout_s))
    _WORLD = world
    return world


_MAIN_WORK_CALLS = 0


def run_on_main(work: Callable[[], Any], label: str, poll_s: float = 0.2) -> Any:
    """Run `work` on rank 0 and hand its JSON-serialisable result (or its error) to every rank.

    The other ranks wait by polling a key of the process group's store with a sleep, outside any
    collective: rank-0 work of many minutes on a 7B model (the export, a universal conversion, the
    `init_from` export) would outlast `dist.collective_timeout_s`, and a rank waiting in a barrier or
    broadcast is then killed by the watchdog. If rank 0 dies meanwhile, the launcher stops the job
    (or the store rank 0 hosts goes away and the poll raises), so no rank waits forever.
    """
    import torch.distributed as dist  # noqa: PLC0415

    global _MAIN_WORK_CALLS
    world = current_world()
    if world.world_size == 1 or not dist.is_initialized():
        return work()
    _MAIN_WORK_CALLS += 1  # every rank makes the same calls in the same order: the keys match
    key = f"mtrain/main_work/{_MAIN_WORK_CALLS}/{label}"
    store = dist.distributed_c10d._get_default_store()
    if world.is_main:
        try:
            outcome = ["ok", work()]
        except Exception as exc:  # noqa: BLE001  (re-raised on every rank below)
            outcome = ["error", f"{type(exc).__name__}: {exc}"]
        store.set(key, json.dumps(outcome))
    else:
        while not store.check([key]):
            time.sleep(poll_s)
        outcome = json.loads(store.get(key))
    if outcome[0] == "error":
        raise RuntimeError(outcome[1])
    return outcome[1]


def join_agent_store(backend: str, world: WorldInfo, timeout: timedelta) -> None:
    """Under torchrun, form the process group in a namespace of this restart attempt.

    torchrun's agent keeps one store across restarts, and the process group's keys (gloo's peer
    addresses) carry no attempt in their names: after a restart, ranks could read the dead
    attempt's addresses and wait on them until the timeout. DeepSpeed then adopts this group.

    The attempt is TORCHELASTIC_RESTART_COUNT, which only one agent can be trusted to agree with
    itself on: with several agents (nodes) a restart counts on the agent whose worker failed, not
    on the others, which restart because a node re-joined. Their workers would then wait in
    different namespaces until the timeout (issue 21). Several agents must not share their store
    with the workers (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, set by launchers/common.sh): each
    rendezvous round then hands the workers a fresh store on a fresh port, and this path is not taken.
    """
    import torch.distributed as dist  # noqa: PLC0415

    agents = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if agents > 1:
        from mtrain.launch.preflight import PreflightError  # noqa: PLC0415

        raise PreflightError(
            f"torchrun with {agents} agents (nodes) shares its rendezvous store with the workers, whose "
            "restart counts then differ between nodes after a failure and the restarted job hangs. "
            "Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node before torchrun "
            "(launchers/torchrun-multinode.sh and launchers/slurm.sbatch do)"
        )
    agent_store = dist.TCPStore(
        world.master_addr, world.master_port, world.world_size, is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"mtrain/attempt_{attempt}", agent_store)
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.world_size, timeout=timeout)


def current_world() -> WorldInfo:
    return _WORLD if _WORLD is not None else world_info_from_env()


def print0(*parts: object) -> None:
    """Print on rank 0 only."""
    if current_world().is_main:
        print(*parts, flush=True, file=sys.stderr)
