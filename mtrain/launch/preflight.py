"""Checks every rank runs before step 1, so a broken job fails at once with a clear message.

1. Bounded rendezvous. `init_distributed` passes `dist.init_timeout_s` through
   `deepspeed.init_distributed` to `torch.distributed.init_process_group`. On env:// rendezvous
   rank 0's TCPStore then waits that long for the others ("Timed out after N seconds waiting for
   clients. 1/2 clients joined", DistStoreError), and every other rank retries its connection to
   rank 0 for that long (DistNetworkError; torch's retry back-off can add up to one more timeout).
   Under torchrun the agents' own rendezvous is bounded by its join_timeout (the launchers'
   RDZV_TIMEOUT). `rendezvous_failure` turns torch's error into one that names the address, the
   ranks expected and the knobs to check.
2. Agreement. Every rank all-gathers a small record (config hash, world size, mtrain version) and
   compares it with rank 0's; a mismatch lists the ranks that disagree.
3. Identical parameters across data-parallel ranks. Parameters held in full on every rank
   (everything under ZeRO 0-2) are hashed bytewise and compared. A ZeRO-3 parameter exists only
   once in the job: each rank owns a disjoint slice, and even a persistent (small, kept-gathered)
   parameter is assembled from those slices by an all-gather, so every rank's full view is equal
   by construction and gathering it to compare would compare a tensor with itself. For those the
   ranks compare the layout instead (names, full shapes), which is what differs when ranks build
   different models, and which would otherwise hang ZeRO-3 at its first gather.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

import mtrain
from mtrain.launch.env import WorldInfo


class PreflightError(RuntimeError):
    """The job cannot start as launched; the message says what is wrong and how to fix it."""


# ── 1. rendezvous ─────────────────────────────────────────────────────────────────────────────
def rendezvous_failure(exc: Exception, world: WorldInfo, timeout_s: int) -> PreflightError:
    """A clear error for a process group that did not form within `timeout_s`."""
    where = f"{world.master_addr}:{world.master_port}"
    if world.rank == 0:
        what = f"rank 0 waited {timeout_s} s at {where} for the other {world.world_size - 1} rank(s)"
    else:
        what = f"rank {world.rank} could not reach rank 0 at {where} within {timeout_s} s"
    return PreflightError(
        f"rendezvous failed: {what} (dist.init_timeout_s={timeout_s}, launcher {world.launcher}). "
        f"Check that all {world.world_size} ranks were started, that MASTER_ADDR/MASTER_PORT name rank 0's host "
        f"and a free port reachable from every node, and raise dist.init_timeout_s if nodes start slowly. "
        f"torch said: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    )


# ── 2. agreement ──────────────────────────────────────────────────────────────────────────────
def rank_record(world: WorldInfo, config_hash: str) -> dict[str, Any]:
    """What every rank must agree on, plus where it runs (for the error message)."""
    return {
        "rank": world.rank,
        "host": os.uname().nodename,
        "config_hash": config_hash,
        "world_size": world.world_size,
        "mtrain_version": mtrain.__version__,
    }


AGREED_FIELDS = ("config_hash", "world_size", "mtrain_version")


def disagreements(records: list[dict[str, Any]], fields: Iterable[str] = AGREED_FIELDS) -> list[str]:
    """One line per field on which some rank differs from rank 0, naming those ranks."""
    reference = records[0]
    problems = []
    for name in fields:
        odd = [r for r in records if r[name] != reference[name]]
        if odd:
            listed = ", ".join(f"rank {r['rank']} ({r['host']}) has {r[name]!r}" for r in odd[:8])
            more = f" and {len(odd) - 8} more" if len(odd) > 8 else ""
            problems.append(f"{name}: rank 0 ({reference['host']}) has {reference[name]!r}; {listed}{more}")
    return problems


def check_ranks_agree(world: WorldInfo, config_hash: str, device: str = "cpu") -> list[dict[str, Any]]:
    """All-gather every rank's record; raise on any disagreement. Returns the records."""
    records = all_gather_json(rank_record(world, config_hash), device)
    problems = disagreements(records)
    if problems:
        raise PreflightError(
            "ranks disagree: "
            + "; ".join(problems)
            + ". Start every rank with the same mtrain install, config file and overrides, "
            "and let the launcher set the world size."
        )
    return records


def all_gather_json(record: Any, device: str = "cpu") -> list[Any]:
    """All-gather a small JSON-able object from every rank (as bytes in a tensor, so nccl works too)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [record]
    payload = torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [json.loads(bytes(g[: int(s.item())].cpu().tolist()).decode()) for g, s in zip(gathered, sizes, strict=True)]


# ── 3. identical parameters ───────────────────────────────────────────────────────────────────
def is_partitioned(param: torch.nn.Parameter) -> bool:
    """A ZeRO-3 parameter: its elements live in slices across ranks (see the module docstring)."""
    return hasattr(param, "ds_id")


def parameter_fingerprints(module: torch.nn.Module) -> dict[str, str]:
    """name -> layout, plus a bytewise hash of the data for parameters each rank holds in full."""
    prints = {}
    for name, param in module.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if is_partitioned(param):
            prints[name] = f"{shape} partitioned"
            continue
        data = param.detach().contiguous().cpu().view(torch.uint8).numpy()  # bytes: bf16 has no numpy dtype
        prints[name] = f"{shape} {param.dtype} {hashlib.sha256(data).hexdigest()[:16]}"
    return prints


def check_parameters_identical(module: torch.nn.Module, device: str = "cpu") -> tuple[int, int]:
    """Raise if any replicated parameter or the layout differs between ranks.

    Returns the number of parameters compared by value (held in full) and by layout (ZeRO-3 slices).
    """
    mine = parameter_fingerprints(module)
    everyone = all_gather_json(mine, device)
    reference = everyone[0]
    differing: dict[str, list[int]] = {}
    for rank, prints in enumerate(everyone[1:], start=1):
        for name in sorted(set(reference) | set(prints)):
            if reference.get(name) != prints.get(name):
                differing.setdefault(name, []).append(rank)
    if differing:
        names = sorted(differing)
        listed = "; ".join(f"{n} differs on rank(s) {differing[n]}" for n in names[:8])
        more = f" (and {len(names) - 8} more parameters)" if len(names) > 8 else ""
        raise PreflightError(
            f"parameters are not identical across data-parallel ranks after initialisation: {listed}{more}. "
            "Every rank must build the model from the same seed and source (run.seed, model.path), "
            "and nothing may change weights on one rank before training."
        )
    partitioned = sum(1 for p in mine.values() if p.endswith("partitioned"))
    return len(mine) - partitioned, partitioned


def collective_device(device: str, world: WorldInfo) -> str:
    """Where preflight's small tensors live: gloo reduces CPU tensors, nccl this rank's GPU."""
    return f"cuda:{world.local_rank}" if device == "cuda" else "cpu"
