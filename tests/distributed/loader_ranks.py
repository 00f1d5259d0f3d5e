"""Run by torchrun with 2 ranks on gloo (tests/distributed/test_loader_ranks.py).

Scenarios, in one launch: exact resume with 0, 1 and 2 workers; the key ledger across 2 -> 1 and
1 -> 2; equal batch counts per epoch with unequal shards; the resampled mode; pair shards (exact
resume, and the key ledger across 2 -> 1 -> 2, on fewer shards than ranks x workers). Every check that
fails raises, so the launch exits non-zero; the summary goes to <out>/rank<R>.json.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.loader import torch_distributed_sync
from tests.data_factory import make_loader, rest_of_epoch

TENSORS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values")
PACKED = {"batch_size": 3, "max_len": 256, "visual_tokens": 16, "image_size": 16, "packing": True, "pack_window": 8}
PAIRS = {"batch_size": 4, "max_len": 48, "visual_tokens": 4, "pairs": True}
PAIR_TENSORS = [
    f"{side}_{name}" for side in ("query", "positive") for name in ("input_ids", "attention_mask", "pixel_values")
]


def gather(value):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def resume_exactly(mixed: str, workers: int, sync) -> int:
    first = make_loader(mixed, dist.get_rank(), 2, num_workers=workers, sync=sync, **PACKED)
    for _ in range(5):
        next(first)
    states = json.loads(json.dumps(gather(first.state_dict())))  # JSON round trip, as a checkpoint does
    expected = [next(first) for _ in range(8)]  # crosses epoch ends (about 4 batches per epoch)
    resumed = make_loader(mixed, dist.get_rank(), 2, num_workers=workers, sync=sync, **PACKED)
    resumed.load_state_dict(states)
    for batch in expected:
        got = next(resumed)
        assert got["keys"] == batch["keys"], (workers, got["keys"], batch["keys"])
        for name in TENSORS:
            assert torch.equal(got[name], batch[name]), (workers, name)
    return first.epoch


def ledger(sample: str, sync) -> dict:
    rank = dist.get_rank()
    every_key = Counter(rest_of_epoch(make_loader(sample, 0, 1)))
    # 2 -> 1: both ranks take 5 batches; rank 0 alone finishes the epoch from both states.
    loader = make_loader(sample, rank, 2, sync=sync)
    taken = [k for _ in range(5) for k in next(loader)["keys"]]
    states, taken_by_rank = gather(loader.state_dict()), gather(taken)
    two_to_one = None
    if rank == 0:
        alone = make_loader(sample, 0, 1)
        alone.load_state_dict(states)
        seen = Counter(k for keys in taken_by_rank for k in keys) + Counter(rest_of_epoch(alone))
        assert seen == every_key, "2 -> 1 lost or repeated samples"
        two_to_one = sum(seen.values())
    # 1 -> 2: one rank's worth of state (world size 1, 7 batches), finished by 2 ranks.
    single = make_loader(sample, 0, 1)
    first_part = [k for _ in range(7) for k in next(single)["keys"]]
    loader = make_loader(sample, rank, 2, sync=sync)
    loader.load_state_dict([single.state_dict()])
    rest = rest_of_epoch(loader)
    seen = Counter(first_part) + Counter(k for keys in gather(rest) for k in keys)
    assert seen == every_key, "1 -> 2 lost or repeated samples"
    return {"two_to_one": two_to_one, "one_to_two": sum(seen.values()), "keys": len(every_key)}


def ranks_in_step(unequal: str, sync) -> list[int]:
    loader = make_loader(unequal, dist.get_rank(), 2, sync=sync, **PACKED)
    per_epoch = Counter()
    while loader.epoch < 3:
        next(loader)
        per_epoch[loader.epoch] += 1
    counts = [per_epoch[e] for e in range(3)]
    all_counts = gather(counts)
    assert all_counts[0] == all_counts[1], all_counts
    return counts + [loader.dropped]


def shared_scans(unequal: str, sync) -> int:
    """Shards without index.json are scanned once over the ranks, and both ranks get every count."""
    from data_pipeline.loader import torch_distributed_gather

    shared = make_loader(unequal, dist.get_rank(), 2, sync=sync, gather=torch_distributed_gather(), **PACKED)
    alone = make_loader(unequal, dist.get_rank(), 2, sync=sync, **PACKED)
    assert shared.stream.shards == alone.stream.shards and alone.stream.scanned == 5
    return shared.stream.scanned


def pair_ledger(pairs: str, sync) -> dict:
    """Pair shards: bit-exact resume at 2 ranks x 2 workers, then every key once across 2 -> 1 -> 2."""
    rank = dist.get_rank()
    every_key = Counter(rest_of_epoch(make_loader(pairs, 0, 1, **PAIRS)))
    first = make_loader(pairs, rank, 2, sync=sync, num_workers=2, **PAIRS)
    [next(first) for _ in range(2)]
    states = json.loads(json.dumps(gather(first.state_dict())))
    expected = [next(first) for _ in range(3)]
    resumed = make_loader(pairs, rank, 2, sync=sync, num_workers=2, **PAIRS)
    resumed.load_state_dict(states)
    for batch in expected:
        got = next(resumed)
        assert got["keys"] == batch["keys"], (got["keys"], batch["keys"])
        for name in PAIR_TENSORS:
            assert torch.equal(got[name], batch[name]), name
    # 2 ranks take 3 batches each; 1 rank takes 4 from both their states; 2 ranks finish the epoch.
    two = make_loader(pairs, rank, 2, sync=sync, **PAIRS)
    taken = gather([k for _ in range(3) for k in next(two)["keys"]])
    one = make_loader(pairs, 0, 1, **PAIRS)  # every rank plays the same single rank; rank 0's keys count once
    one.load_state_dict(json.loads(json.dumps(gather(two.state_dict()))))
    middle = [k for _ in range(4) for k in next(one)["keys"]]
    back = make_loader(pairs, rank, 2, sync=sync, **PAIRS)
    back.load_state_dict([json.loads(json.dumps(one.state_dict()))])
    rest = gather(rest_of_epoch(back))
    seen = Counter(k for keys in taken for k in keys) + Counter(middle) + Counter(k for keys in rest for k in keys)
    # After a change of world size the leftovers may split unevenly; at the epoch's end the rank
    # ahead drops its last batch (counted in `dropped`, as loader.py says), and nothing else is lost.
    dropped = sum(gather(back.dropped))
    assert max(seen.values()) == 1 and set(seen) <= set(every_key), "2 -> 1 -> 2 repeated pairs"
    assert len(seen) + dropped == len(every_key), "2 -> 1 -> 2 lost pairs"
    return {"keys": len(every_key), "seen": len(seen), "dropped": dropped, "stretches": [len(taken[0]), len(middle)]}


def main(mixed: str, sample: str, unequal: str, pairs: str, out: str) -> None:
    dist.init_process_group("gloo")
    sync = torch_distributed_sync()
    summary = {"resume_epochs": [resume_exactly(mixed, workers, sync) for workers in (0, 1, 2)]}
    summary["ledger"] = ledger(sample, sync)
    summary["in_step"] = ranks_in_step(unequal, sync)
    resampled = make_loader(unequal, dist.get_rank(), 2, epoch_mode="resampled", sync=sync, **PACKED)
    summary["resampled_batches"] = len([next(resampled) for _ in range(10)])
    summary["shared_scans"] = shared_scans(unequal, sync)
    summary["pairs"] = pair_ledger(pairs, sync)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(summary))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
