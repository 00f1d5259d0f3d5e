"""`mtrain.infer` against the Matryoshka task's own per-scale forward: per-scale adapters from a stock
PEFT folder, padded batches of several rows, M3 pooling and MQT prefixes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mtrain.checkpoint.export import EXPORT_METADATA, matryoshka_metadata
from mtrain.infer import MatryoshkaModel, MatryoshkaSpec
from tests.unit.test_matryoshka_task import SCALES, make_batch, make_task


def per_scale_logits(task, batch, scales: list[int]) -> dict[int, list[torch.Tensor]]:
    """Each row's logits over its real tokens at each scale, from the task's one-pass forward."""
    out = {}
    for scale in scales:
        with torch.no_grad():
            logits, layout = task.run(batch, [scale] * batch["input_ids"].shape[0])
        real = layout.token_scales > 0
        out[scale] = [logits[row][real[row]] for row in range(logits.shape[0])]
    return out


def assert_rows_equal(inferred: torch.Tensor, mask: torch.Tensor, reference: list[torch.Tensor]) -> None:
    for row, want in enumerate(reference):
        got = inferred[row][mask[row].bool()]  # left-padded by infer
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_per_scale_adapters_load_from_stock_peft_folders_and_match_the_task(tmp_path):
    task, built = make_task("m3", "per_scale")
    with torch.no_grad():  # the trained projector (modules_to_save of the first adapter only) must count
        for name, param in task.named_parameters():
            if "modules_to_save" in name and "multi_modal_projector" in name:
                param.add_(torch.randn_like(param) * 0.05)
    batch = make_batch(built)
    scales = [1, 4, 16, 64]
    reference = per_scale_logits(task, batch, scales)

    # The export's layout: the frozen base, every adapter as a stock PEFT subfolder, mtrain.json.
    from mtrain.config import load_config

    copy.deepcopy(task.model).unload().save_pretrained(tmp_path / "base")
    task.model.save_pretrained(tmp_path / "adapter", selected_adapters=list(task.model.peft_config))
    cfg = load_config(None, ["matryoshka.tokens.mode=m3", f"matryoshka.tokens.scales={SCALES['m3']}",
                             "model.lora.enabled=true", "model.lora.strategy=per_scale"])  # fmt: skip
    (tmp_path / EXPORT_METADATA).write_text(json.dumps({"matryoshka": matryoshka_metadata(cfg)}))

    model = MatryoshkaModel.from_export(tmp_path)
    for scale in scales:
        inputs = model.scaled_inputs(**prompt_of(batch), scale=scale)
        inferred = model.logits(**prompt_of(batch), scale=scale)
        assert_rows_equal(inferred, inputs["attention_mask"], reference[scale])
    with pytest.raises(ValueError, match="scale=9 has no adapter"):
        model.logits(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], scale=9)


def prompt_of(batch: dict) -> dict:
    """What a processor gives for the batch's prompts: the `**inputs` of mtrain.infer's calls."""
    return {name: batch[name] for name in ("input_ids", "pixel_values", "attention_mask")}


def test_mqt_keeps_the_first_queries_as_the_task_does():
    task, built = make_task("mqt", "shared", lora=False)
    batch = make_batch(built)
    scales = [2, 8, 32, 64]
    reference = per_scale_logits(task, batch, scales)
    model = MatryoshkaModel(task.model, MatryoshkaSpec("mqt", scales, default_scale=64, mqt_queries=64))
    for scale in scales:
        inputs = model.scaled_inputs(**prompt_of(batch), scale=scale)
        assert int(inputs["inputs_embeds"].shape[1]) == max(len(r) for r in reference[scale])
        inferred = model.logits(**prompt_of(batch), scale=scale)
        assert_rows_equal(inferred, inputs["attention_mask"], reference[scale])

    # A projector giving another count than the trained queries (a stock load that fell back to
    # LLaVA's MLP projector) is refused, not read as queries.
    wrong = MatryoshkaModel(task.model, MatryoshkaSpec("mqt", scales, default_scale=64, mqt_queries=128))
    with pytest.raises(ValueError, match="gives 64 tokens per image, not the 128 MQT queries"):
        wrong.logits(**prompt_of(batch), scale=8)
