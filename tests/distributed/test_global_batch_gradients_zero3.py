"""A step under real 2-rank ZeRO-3 applies the gradient of one process holding the global batch.

LM and M3 (weighted scales): `grad_accum_steps: 2`, micro-batches whose learned-token counts
differ widely (one word beside paragraphs). Global token normalisation makes the step's loss every
learned token's mean (per scale for M3), whatever micro-batch and rank it lands on; the old
per-micro-batch mean (`task.token_normalisation=micro_batch`) weighs a token of a short micro-batch
more, and fails this test.

Contrastive GradCache (`chunk_size: 2`) through the DeepSpeed engine, several forwards and
backwards per micro-batch: its update equals the direct path's and the 1-process gradient.

One launch runs every case (plain SGD at lr 1 without clipping: the update is minus the gradient).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, launch_env, run, torchrun
from tests.distributed.global_batch_worker import LM_MICRO_BATCHES, PAIR_ROWS, caption_batch, config

pytestmark = pytest.mark.timeout(300)

WORKER = str(REPO / "tests/distributed/global_batch_worker.py")


def concat_rows(batches: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The micro-batches' rows as one right-padded batch."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fills = {"input_ids": pad_token_id, "labels": -100, "attention_mask": 0}

    def pad(name: str, batch: dict) -> torch.Tensor:
        return torch.nn.functional.pad(batch[name], (0, width - batch[name].shape[1]), value=fills[name])

    out = {name: torch.cat([pad(name, b) for b in batches]) for name in fills}
    out["pixel_values"] = torch.cat([b["pixel_values"] for b in batches])
    return out


def one_process_gradients(case: str, before: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and gradients of one process holding the global batch, from the step's starting weights."""
    from mtrain.model.build import build_model
    from mtrain.task.registry import build_task
    from tests.unit.test_contrastive import make_batch

    cfg = config(case)
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    task = build_task(cfg, built, rank=0)
    with torch.no_grad():
        for name, param in task.named_parameters():
            param.copy_(before[name])
    if case.startswith("contrastive"):
        task.begin_step(0, 0)
        batch = make_batch(built, rows=PAIR_ROWS)
    else:
        micro_batches = [caption_batch(built, c) for rank in sorted(LM_MICRO_BATCHES) for c in LM_MICRO_BATCHES[rank]]
        batch = concat_rows(micro_batches, built.tokenizer.pad_token_id)
    loss, metrics = task(batch)
    loss.backward()
    if case.startswith("contrastive"):
        loss = torch.tensor(task.summarize(metrics)["loss"])
    # A trainable parameter the objective does not reach (the contrastive lm_head) gets no update.
    grads = {
        n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in task.named_parameters() if p.requires_grad
    }
    return float(loss.detach()), grads


def assert_update_is_gradient(result: dict, grads: dict[str, torch.Tensor], case: str) -> None:
    assert result["after"].keys() == grads.keys() and len(grads) > 5
    for name, grad in grads.items():
        update = result["before"][name] - result["after"][name]  # SGD, lr 1: minus the applied gradient
        # Summation order differs across ranks, and the update loses the float32 rounding of the weight itself.
        atol = 2e-5 * float(grad.abs().max()) + 4 * torch.finfo(torch.float32).eps * float(
            result["before"][name].abs().max()
        )
        torch.testing.assert_close(update, grad, rtol=1e-4, atol=atol, msg=f"{case} {name}")


def test_one_step_equals_one_process_with_the_global_batch(tmp_path):
    out = tmp_path / "steps.pt"
    proc = run([*torchrun(WORKER, str(out), "lm", "m3", "contrastive_direct", "contrastive_gradcache")],
               cwd=tmp_path, timeout=280, env=launch_env())  # fmt: skip
    assert proc.returncode == 0
    results = torch.load(out, weights_only=False)
    for case in ("lm", "m3"):
        loss, grads = one_process_gradients(case, results[case]["before"])
        assert results[case]["loss"] == pytest.approx(loss, rel=1e-5), case  # logged: the global token mean
        assert_update_is_gradient(results[case], grads, case)
    loss, grads = one_process_gradients("contrastive_direct", results["contrastive_direct"]["before"])
    for case in ("contrastive_direct", "contrastive_gradcache"):
        assert results[case]["loss"] == pytest.approx(loss, rel=1e-5), case
        assert_update_is_gradient(results[case], grads, case)
