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


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-gemma3", "tiny-llava-onevision"])
def test_embed_on_a_family_export_equals_the_training_tasks_embedding_at_every_dim(tmp_path, preset):
    """`MatryoshkaModel.embed` on an embedding export runs the stock forward with the family's image arguments
    (Qwen's image_grid_thw and M-RoPE ids, Gemma 3's image attention, anyres image sizes): image queries and
    text-only positives give the contrastive task's own embeddings at every trained dim."""
    from mtrain.checkpoint.export import _save_hf_folder
    from mtrain.config import load_config
    from mtrain.embed import save_embedding_head
    from mtrain.model.build import build_model
    from mtrain.model.embedding_head import truncate
    from mtrain.task.registry import build_task
    from tests.unit.test_family_objectives import pair_batch, preset_overrides, stock_image_inputs

    dims = [16, 32, 64]
    cfg = load_config(None, [*preset_overrides(preset), "task.objective=contrastive", f"matryoshka.dims.dims={dims}",
                             "checkpoint.export_at_end=false"])  # fmt: skip
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0).eval()
    batch = pair_batch(built, preset)
    with torch.no_grad():
        queries, positives = (side[0] for side in task.encode_pairs(batch, [task.depth]))
    _save_hf_folder(built.model, built, tmp_path / "model")
    save_embedding_head(task, tmp_path)
    (tmp_path / EXPORT_METADATA).write_text(json.dumps({"matryoshka": matryoshka_metadata(cfg)}))
    model = MatryoshkaModel.from_export(tmp_path)
    images = stock_image_inputs(built, batch["query_pixel_values"], batch.get("query_image_sizes"))
    for dim in dims:
        got = model.embed(batch["query_input_ids"], attention_mask=batch["query_attention_mask"], dim=dim, **images)
        torch.testing.assert_close(got, truncate(queries, dim), rtol=1e-5, atol=1e-5)
        text = model.embed(batch["positive_input_ids"], attention_mask=batch["positive_attention_mask"], dim=dim)
        torch.testing.assert_close(text, truncate(positives, dim), rtol=1e-5, atol=1e-5)
    # mtrain.embed's Embedder on the same export (a Qwen export is resized to the size it trained at) as on the task.
    from PIL import Image

    from mtrain.embed import Embedder
    from mtrain.engine.data import pair_spec

    picture = Image.new("RGB", (40, 40), (200, 20, 20))
    inputs = [picture, "a red circle."]
    want = Embedder(task, pair_spec(cfg, built), built.image_processor).embed(inputs, dim=16)
    overrides = ["model.image_size=[32,32]"] if built.family.model_type.startswith("qwen") else []
    torch.testing.assert_close(Embedder.from_export(tmp_path, overrides).embed(inputs, dim=16), want)
