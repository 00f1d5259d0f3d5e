"""The one-pass all-scale step against separate per-scale passes, and scale-adapter gradient routing."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config import load_config
from mtrain.model.token_scales import pool_grid
from mtrain.task.token_layout import shrink_image_runs
from tests.family_checks import assert_one_pass_equals_separate_grads, lora_task, rows_at_scale

SCALES = {"m3": "[1,4,16,64]", "mqt": "[2,8,32,64]"}


def make_task(mode: str, strategy: str = "shared", policy: str = "all", lora: bool = True, layout: str = "packed"):
    cfg = load_config(
        None,
        [
            f"matryoshka.tokens.mode={mode}",
            f"matryoshka.tokens.scales={SCALES[mode]}",
            f"matryoshka.tokens.policy={policy}",
            f"matryoshka.tokens.layout={layout}",
            f"model.lora.enabled={str(lora).lower()}",
            f"model.lora.strategy={strategy}",
            "model.lora.dropout=0.0",
            "model.freeze.always_train=[lm_head]",
        ],
    )
    return lora_task(cfg)


def make_batch(built, rows: int = 3) -> dict:
    torch.manual_seed(1)
    tokenizer, n = built.tokenizer, built.visual_tokens
    ids, labels = [], []
    for row in range(rows):
        caption = tokenizer(["a red circle.", "a blue square shape.", "a green cross."][row % 3]).input_ids
        ids.append([tokenizer.bos_token_id] + [built.image_token_id] * n + caption)
        labels.append([IGNORE_INDEX] * (n + 1) + caption)
    width = max(map(len, ids))
    batch = {
        "input_ids": torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in ids]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
        "pixel_values": torch.randn(rows, 3, 32, 32),
    }
    return batch


def reference_scale_loss(task, batch, scale: int) -> torch.Tensor:
    """One scale through Hugging Face's own forward and loss, as a per-scale model would train."""
    llava = task.llava
    features = torch.stack(list(llava.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    scaled = features[:, :scale] if task.tokens.mode == "mqt" else pool_grid(features, scale)
    ids, labels, mask = shrink_image_runs(
        batch["input_ids"], batch["labels"], batch["attention_mask"], task.image_token_id, task.visual_tokens, scale, 0
    )
    embeds = llava.get_input_embeddings()(ids).masked_scatter((ids == task.image_token_id).unsqueeze(-1), scaled)
    with rows_at_scale(task, ids.shape[0], scale):
        return llava(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize(
    "mode,strategy,layout",
    [
        ("m3", "shared", "packed"),
        ("m3", "shared_plus_per_scale", "packed"),
        ("mqt", "per_scale", "packed"),
        ("m3", "per_scale", "padded"),
    ],
)
def test_one_pass_equals_mean_of_separate_scale_passes(mode, strategy, layout):
    task, built = make_task(mode, strategy, layout=layout)
    batch = make_batch(built)
    loss, metrics = task(batch)
    assert_one_pass_equals_separate_grads(
        task, loss, lambda: torch.stack([reference_scale_loss(task, batch, s) for s in task.tokens.scales]).mean()
    )
    assert int(metrics["scale_label_tokens"].sum()) == 4 * int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_vision_tower_runs_once_per_step():
    task, built = make_task("m3")
    calls = []
    task.llava.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    task(make_batch(built))
    assert len(calls) == 1


@pytest.mark.parametrize(
    "strategy,expected", [("per_scale", {"scale_16"}), ("shared_plus_per_scale", {"shared", "scale_16"})]
)
def test_only_the_current_scales_adapters_get_gradient(strategy, expected):
    task, built = make_task("m3", strategy, policy="sample_per_step")
    step = next(s for s in range(100) if task.sampler.step_scale(s) == 16)
    task.begin_step(step)
    loss, _ = task(make_batch(built))
    loss.backward()
    with_grad = set()
    for name, param in task.named_parameters():
        if "lora_" in name and param.grad is not None and param.grad.abs().sum() > 0:
            with_grad.add(name.split(".")[-2])  # lora_A.<adapter>.weight
    assert with_grad == expected


def test_packed_layout_has_no_padding_but_row_tails():
    from mtrain.task.token_layout import lay_out, place_variants, row_counts

    # Image id 9 with 4 visual tokens: row 0 holds an image and 2 text tokens, row 1 an image and 1.
    image, pad = 9, 0
    batch = {
        "input_ids": torch.tensor([[5, 9, 9, 9, 9, 6], [5, 9, 9, 9, 9, pad]]),
        "labels": torch.tensor([[IGNORE_INDEX] * 5 + [6], [IGNORE_INDEX] * 6]),
    }
    tokens, images = row_counts(batch, image, 4, pad)
    assert (tokens, images) == ([6, 5], [1, 1])
    variant_scales = [1, 1, 4, 4]  # every row at scales 1 and 4
    packed = lay_out(batch, place_variants(variant_scales, tokens, images, 4, packed=True), True, image, 4, pad)
    assert packed.input_ids.shape == (2, 9) and packed.attention_mask is None
    assert packed.input_ids[0].tolist() == [5, 9, 6, 5, 9, 9, 9, 9, 6]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert packed.token_scales[1].tolist() == [1, 1, 4, 4, 4, 4, 4, 0, 0]
    assert packed.position_ids[1, 7:].tolist() == [0, 1]  # the tail is a segment of its own
    assert packed.labels[0].tolist()[2] == 6 and packed.labels[1, 7:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    padded = lay_out(batch, place_variants(variant_scales, tokens, images, 4, packed=False), False, image, 4, pad)
    assert padded.input_ids.shape == (4, 6) and padded.attention_mask.sum() == 16


def test_packed_input_rows_restart_positions_per_document_after_shrinking():
    from mtrain.task.token_layout import lay_out, place_variants, row_counts

    # One packed row of two documents, each with an image of 4 tokens; shrunk to 1 token per image.
    batch = {
        "input_ids": torch.tensor([[5, 9, 9, 9, 9, 6, 5, 9, 9, 9, 9, 7, 0]]),
        "labels": torch.full((1, 13), IGNORE_INDEX),
        "attention_mask": torch.tensor([[1] * 12 + [0]]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0]]),
    }
    tokens, images = row_counts(batch, 9, 4, 0)
    layout = lay_out(batch, place_variants([1], tokens, images, 4, packed=True), True, 9, 4, 0)
    assert layout.input_ids[0].tolist() == [5, 9, 6, 5, 9, 7]
    assert layout.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2]
