"""Run by torchrun with 2 ranks on gloo (tests/distributed/test_run_on_main.py).

The process group's collectives time out after 2 s; rank 0's work takes 5 s. Rank 1 waits in
`run_on_main` (polling the store), receives the result, then the error of a failing work, and a
barrier afterwards shows the group is still healthy. Any failed check raises: a non-zero exit.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch.distributed as dist

from mtrain.launch.distributed import run_on_main

COLLECTIVE_TIMEOUT_S, WORK_S = 2, 5


def slow_work() -> str:
    time.sleep(WORK_S)
    return "exported"


def failing_work() -> str:
    raise OSError("disk full")


def main() -> None:
    # As mtrain's init_distributed: a patient rendezvous, then the short collective timeout.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    started = time.time()
    assert run_on_main(slow_work, "slow") == "exported"
    assert time.time() - started >= WORK_S - 0.5  # every rank waited for rank 0
    try:
        run_on_main(failing_work, "failing")
    except RuntimeError as exc:
        assert str(exc) == "OSError: disk full", exc
    else:
        raise AssertionError("rank 0's error did not reach this rank")
    dist.barrier()  # the group outlived waits longer than its timeout
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
