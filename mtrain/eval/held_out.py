"""The held-out data of an evaluation: each rank's share of the shards, read once, in rounds every rank runs.

    eval shards ──► this rank's share (the staged loader, in order, unpacked, its own instance)
                ──► one pass (the first epoch, or the first N batches)
                ──► lockstep rounds (a rank out of batches repeats its last one, uncounted)

Shared by the in-loop evaluation (`in_loop.py`) and `mtrain eval` (`run.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mtrain.config.schema import TrainConfig
from mtrain.launch.env import WorldInfo

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def held_out_loader(cfg: TrainConfig, built: Any, world: WorldInfo, shards: str | None, form: Any = None) -> Any:
    """This rank's loader over held-out `shards` (None: the config's data): the configured stages, in shard
    order, unpacked (one answer per row), no workers.

    Built apart from the training loader, so taking eval batches moves no training data position.
    Not synced across ranks: each rank reads its own share to the end (see `lockstep`)."""
    from data_pipeline.loader import build_loader, torch_distributed_gather  # noqa: PLC0415
    from mtrain.engine.data import loader_settings, token_spec  # noqa: PLC0415

    data = dataclasses.replace(cfg.data, shuffle=False, num_workers=0, epoch_mode="epoch", packing=False)
    if shards is not None:
        data = dataclasses.replace(data, shards=shards, sources=[])
    settings = loader_settings(dataclasses.replace(cfg, data=data), built.tokenizer)
    spec = token_spec(cfg, built)
    # Every rank builds its eval loader at the same point, so unindexed shards are scanned once over all ranks.
    gather = torch_distributed_gather() if world.world_size > 1 else None
    return build_loader(
        settings,
        world.rank,
        world.world_size,
        spec,
        built.image_processor,
        built.visual_tokens,
        gather=gather,
        form=form,
    )


def sum_over_ranks(world: WorldInfo, device: str = "cpu") -> AllReduce:
    """A sum over every rank of `world`, reduced on `device` (nccl reduces GPU tensors, gloo CPU ones) and
    handed back on the host; the identity on one rank."""
    import torch.distributed as dist  # noqa: PLC0415

    def all_reduce(values: torch.Tensor) -> torch.Tensor:
        if world.world_size == 1:
            return values
        on_device = values.to(device)
        dist.all_reduce(on_device)
        return on_device.cpu()

    return all_reduce


def one_pass(loader: Any, limit: int = 0) -> Iterator[dict[str, Any]]:
    """The loader's first epoch (this rank's whole share), or its first `limit` batches when `limit` > 0."""
    taken = 0
    while not limit or taken < limit:
        batch = next(loader)
        if loader.epoch > 0:  # the first batch of the next epoch: this rank's share is done
            return
        yield batch
        taken += 1


def lockstep(batches: Iterator[dict[str, Any]], all_reduce: AllReduce, world_size: int) -> Iterator[tuple[Any, bool]]:
    """(batch, counted) rounds until every rank is out of batches; every rank runs every round.

    Under ZeRO-3 each forward is a collective, so a rank whose share ended early runs its last batch
    again, uncounted. One tiny all-reduce per round says how many ranks still have a batch."""
    last = None
    for round_index in itertools.count():
        batch = next(batches, None)
        holding = int(all_reduce(torch.tensor([float(batch is not None)], dtype=torch.float64))[0])
        if holding == 0:
            return
        if round_index == 0 and holding < world_size:
            raise ValueError(
                f"eval.shards gave {world_size - holding} of {world_size} ranks no batch; the held-out set "
                "needs at least one sample per rank (give more held-out samples or fewer ranks)"
            )
        if batch is not None:
            last = batch
        yield (batch if batch is not None else last), batch is not None
