"""A micro-batch without a single image trains, for every task that reads images.

It still runs the vision path, on a stand-in image whose output enters the loss times zero: under
ZeRO-3 every rank must gather and reduce the same parameters every step, whatever its batch holds
(tests/distributed/test_mixed_modality_zero3.py runs that across ranks).
"""

from __future__ import annotations

import pytest
import torch

from data_pipeline.packing import collate_rows
from tests.unit.test_device_true import (
    OBJECTIVES,
    build,
    counted_host_syncs,
    document,
    packed_batch,
    step,
    step_on_meta,
)

IMAGE_TASKS = ["lm_packed", "m3_all_scales_mss_lora", "m3_padded_per_scale_lora", "mqt"]


def text_only_batch(built) -> dict:
    """Two packed rows of documents without images: `pixel_values` is the loader's empty tensor."""
    rows = [
        [document(built, "a", "no image here at all.", 0), document(built, "b", "only words.", 0)],
        [document(built, "c", "a sentence of plain text.", 0)],
    ]
    return collate_rows(rows, built.tokenizer.pad_token_id, packed=True)


def with_gradient(task) -> set[str]:
    return {name for name, param in task.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("objective", IMAGE_TASKS)
def test_a_text_only_micro_batch_trains_and_reaches_every_vision_parameter(objective):
    cfg, built, task = build(OBJECTIVES[objective] + ["model.freeze.vision_tower=false"])
    batch = text_only_batch(built)
    assert batch["pixel_values"].numel() == 0 and sum(batch["row_images"]) == 0
    step(task, packed_batch(built))
    reached_by_images = with_gradient(task)
    task.zero_grad(set_to_none=True)
    loss = step(task, batch)
    assert torch.isfinite(loss) and loss > 0
    # Every parameter an image batch reaches takes part (a ZeRO-3 reduce hook fires for it); the
    # vision path's gradients are exactly zero.
    assert with_gradient(task) == reached_by_images
    vision = [p for n, p in task.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    assert any(p.grad is not None for p in vision)
    assert all(torch.count_nonzero(p.grad) == 0 for p in vision if p.grad is not None)
    # The loss is the text's own: the stand-in image adds exactly nothing.
    with torch.no_grad():
        again, _ = task(batch)
    assert torch.equal(again.detach(), loss.detach())


@pytest.mark.parametrize("objective", IMAGE_TASKS)
def test_a_text_only_step_is_device_true_and_makes_no_host_sync(objective):
    cfg, built, task = build(OBJECTIVES[objective])
    batch = text_only_batch(built)
    step(task, batch)  # a first step, so lazily built state does not count
    task.zero_grad()
    with counted_host_syncs() as calls:
        step(task, batch)
    assert calls == []
    task.zero_grad()
    loss = step_on_meta(task, batch)
    assert loss.device.type == "cpu" and torch.isfinite(loss)


def test_the_language_model_task_splices_images_as_the_model_itself_does():
    cfg, built, task = build(OBJECTIVES["lm_packed"])
    batch = packed_batch(built)
    with torch.no_grad():
        loss, _ = task(batch)
        inputs = {k: batch[k] for k in ("input_ids", "labels", "pixel_values", "position_ids")}
        reference = task.model(**inputs, use_cache=False).loss  # Hugging Face's own merge of the images
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)
