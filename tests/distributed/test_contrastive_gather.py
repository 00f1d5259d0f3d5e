"""Gathered in-batch negatives over 2 real gloo processes equal one process holding the global batch.

Each rank embeds its half of the batch, gathers the other half without a graph and puts its own
slice back; the ranks' gradients averaged (what DeepSpeed applies) must equal the single-process
gradient of the whole batch, on the direct and the GradCache path, for MRL and 2DMSE, and for MRL
with hard negatives held by one rank only (the other gathers a blank, masked slice). The same through
the DeepSpeed engine under ZeRO-3: tests/distributed/test_global_batch_gradients_zero3.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port

pytestmark = pytest.mark.timeout(180)

POLICIES = {
    "mrl": ["matryoshka.dims.dims=[8,32,64]"],
    "2dmse": ["matryoshka.dims.dims=[8,32,64]", "matryoshka.dims.policy=2dmse"],
    "mrl_hard_negatives": ["matryoshka.dims.dims=[8,32,64]"],
}
NEGATIVES = {"mrl_hard_negatives": [1, 2, 3]}  # samples with a hard negative: all in rank 0's half
ROWS, STEP = 8, 3


def loss_and_grads(task, batch: dict, chunk_size: int) -> tuple[float, dict[str, torch.Tensor], tuple]:
    """Reported loss, gradients averaged over ranks, and the step's term_set."""
    task.zero_grad()
    task.begin_step(STEP)
    if chunk_size:
        task.chunk_size = chunk_size
        loss, metrics = task.forward_backward(batch, forward=task, backward=lambda value: value.backward())
    else:
        loss, metrics = task(batch)
        loss.backward()
    world = dist.get_world_size() if dist.is_initialized() else 1
    grads = {}
    for name, param in task.named_parameters():
        if param.grad is not None:
            if world > 1:
                dist.all_reduce(param.grad)
            grads[name] = param.grad / world  # DeepSpeed averages gradients over ranks
    return float(task.summarize(metrics)["loss"]), grads, task.term_set()


def task_and_rows(policy: str, rows: slice):
    from mtrain.task.contrastive import slice_pairs
    from tests.unit.test_contrastive import make_batch, make_task, with_negatives

    task, built, _ = make_task(*POLICIES[policy])
    batch = make_batch(built, rows=ROWS)
    if policy in NEGATIVES:
        batch = with_negatives(built, batch, NEGATIVES[policy])
    return task, slice_pairs(batch, rows.start, rows.stop, task)


def worker(rank: int, port: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = ROWS // 2
    results = {}
    for policy in POLICIES:
        task, batch = task_and_rows(policy, slice(rank * half, (rank + 1) * half))
        for chunk_size in (0, 2):
            results[(policy, chunk_size)] = loss_and_grads(task, batch, chunk_size)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_negatives_equal_one_process_with_the_global_batch(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for policy in POLICIES:
        single_loss, single_grads, single_plan = loss_and_grads(*task_and_rows(policy, slice(0, ROWS)), 0)
        assert len(single_grads) > 10
        for chunk_size in (0, 2):
            for rank in ranks:
                loss, grads, term_set = rank[(policy, chunk_size)]
                assert term_set == single_plan  # every rank draws the same (layer, dim) pairs
                assert loss == pytest.approx(single_loss, rel=1e-5), (policy, chunk_size)
                assert grads.keys() == single_grads.keys()
                for name, grad in grads.items():
                    # Summation order differs across ranks: the absolute tolerance follows the gradient's scale.
                    scale = max(1.0, float(single_grads[name].abs().max()))
                    torch.testing.assert_close(
                        grad, single_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=f"{policy} {chunk_size} {name}"
                    )
