"""Run by torchrun with 2 ranks on gloo: preflight's checks on agreeing and disagreeing ranks.

Writes OUT_DIR/rankN.jsonl: one line per case, {"case": ..., "rank": ..., "error": message or null}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mtrain.launch.env import world_info_from_env
from mtrain.launch.preflight import PreflightError, check_parameters_identical, check_ranks_agree


def main() -> None:
    world = world_info_from_env()
    dist.init_process_group("gloo")
    rank = world.rank
    results = open(Path(sys.argv[1]) / f"rank{rank}.jsonl", "w")

    def outcome(case: str, check) -> None:
        try:
            check()
            error = None
        except PreflightError as exc:
            error = str(exc)
        results.write(json.dumps({"case": case, "rank": rank, "error": error}) + "\n")

    outcome("agree", lambda: check_ranks_agree(world, "hash-same"))
    outcome("config", lambda: check_ranks_agree(world, f"hash-{rank}"))

    torch.manual_seed(0)  # the same seed on every rank: identical parameters
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    outcome("params_equal", lambda: check_parameters_identical(model))
    with torch.no_grad():
        if rank == 1:
            model[1].bias[0] += 1e-6  # the smallest drift still counts
    outcome("params_differ", lambda: check_parameters_identical(model))
    # A different model on one rank: the layout differs.
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3 if rank else 2))
    outcome("layout", lambda: check_parameters_identical(other))
    results.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
