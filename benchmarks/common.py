"""Helpers shared by the benchmark scripts (not a test helper: nothing here asserts on speed)."""

from __future__ import annotations

import time
from typing import Any


def timed_engine_steps(engine: Any, batches: list[dict], warmup: int) -> float:
    """Seconds per optimizer step over `batches[warmup:]`, after `warmup` untimed steps.

    The warm-up traces ZeRO-3's prefetch and allocates optimizer state; a barrier lines the ranks
    up before the clock starts, and another after the last step so the slowest rank is counted.
    """
    import torch.distributed as dist  # noqa: PLC0415

    for index, batch in enumerate(batches):
        if index == warmup:
            dist.barrier()
            started = time.perf_counter()
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
    dist.barrier()
    return (time.perf_counter() - started) / (len(batches) - warmup)
