"""The qwen3_vl family end to end on the tiny-qwen3-vl preset, in one process: at full size mtrain's forward gives
the stock Qwen3VLForConditionalGeneration's logits (DeepStack included); M3 pools every DeepStack set as the merged
tokens, the one-pass all-scale loss equals the mean of separate stock forwards given those pooled sets; packed
documents give their unpacked losses; the Qwen3-VL-shaped chat template against `apply_chat_template`; a saved
folder passes the pre-process-group check and trains non-square images; an export reloads in stock transformers
with equal logits; plain language modeling (mode=none) gives the stock loss, padded or packed. Dropping the DeepStack
sets changes each result (MQT and contrastive: tests/unit/test_family_objectives.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipeline.formats import conversation_messages
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.cli import _data_tokens
from mtrain.config import load_config
from mtrain.launch.model_checks import model_problems
from mtrain.model.build import build_model
from mtrain.model.families.qwen2_vl import IMAGE_PAD, merged_grid, pool_merged, pooled_grid_thw
from mtrain.model.families.qwen3_vl import CHAT_TEMPLATE, Qwen3VLFamily, build_tiny_qwen3_tokenizer
from mtrain.task.token_layout import shrink_image_runs
from tests.family_checks import (
    TWO_TURNS,
    WithoutDeepStack,
    assert_one_pass_equals_separate_grads,
    assert_packed_equals_unpacked_per_document,
    assert_template_equals_apply_chat_template,
    assert_text_only_batch_reaches_vision_at_zero_weight,
    export_and_reload,
    lora_task,
    m3_lora_config,
    packed_batch,
    processed_images,
    rows_at_scale,
    text_ids,
)
from tests.family_checks import documents as family_documents
from tests.family_checks import padded_batch as family_padded_batch

SCALES = [1, 4, 16]  # the 4x4 merged grid of a 32x32 image pooled by 4, 2 and 1 per side
PRESET = "tiny-qwen3-vl"


def make_task(strategy: str = "shared_plus_per_scale", layout: str = "packed"):
    return lora_task(
        m3_lora_config(PRESET, SCALES, f"model.lora.strategy={strategy}", f"matryoshka.tokens.layout={layout}")
    )


def documents(built) -> list[tuple[list[int], list[int], int]]:
    return family_documents(built, "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def padded_batch(built, docs) -> dict:
    images = sum(count for _, _, count in docs)
    pixels = processed_images(lambda image: built.image_processor(images=image)["pixel_values"], images)
    return family_padded_batch(built, docs, pixels)


def patch_grid_thw(built, images: int) -> torch.Tensor:
    rows, columns = built.visual_grid
    return torch.tensor([[1, rows * 2, columns * 2]] * images)  # in patches, before the 2x2 merger


def stock_logits(task, built, batch) -> torch.Tensor:
    """The stock forward of the whole model from token ids and pixels (its own vision, DeepStack, M-RoPE ids)."""
    ids = batch["input_ids"]
    with rows_at_scale(task, ids.shape[0], max(SCALES)):
        return task.llava(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].flatten(0, 1),
            image_grid_thw=patch_grid_thw(built, batch["pixel_values"].shape[0]),
            mm_token_type_ids=(ids == built.image_token_id).int(),
        ).logits


def test_full_scale_forward_equals_the_stock_forward_with_deepstack():
    task, built = make_task(layout="padded")
    assert type(task.llava).__name__ == "Qwen3VLForConditionalGeneration"
    assert task.llava.config.vision_config.deepstack_visual_indexes == [0, 1]  # one set per LM layer
    batch = padded_batch(built, documents(built))
    with torch.no_grad():
        features = task.image_features(batch["pixel_values"])
        assert tuple(features.shape) == (4, 16, 64 * 3)  # merged tokens, then two DeepStack sets
        logits, layout = task.run(batch, [16] * 3)
        want = stock_logits(task, built, batch)
        real = batch["attention_mask"].bool()
        assert torch.equal(layout.input_ids, batch["input_ids"])
        torch.testing.assert_close(logits[real], want[real], rtol=1e-4, atol=1e-5)
        # DeepStack moves the logits: without its sets the same forward is far from the stock one.
        task.given_family = WithoutDeepStack()
        without, _ = task.run(batch, [16] * 3)
        assert (without[real] - want[real]).abs().max() > 1e-2


def reference_scale_loss(task, built, batch, scale: int) -> torch.Tensor:
    """One scale through the stock forward: its own vision features, the merged tokens and every DeepStack set
    pooled per image by `pool_merged`, given as precomputed encoder outputs; M-RoPE ids from `get_rope_index` on
    the pooled grids of the shrunk rows."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    model = task.llava
    grid_thw = patch_grid_thw(built, batch["pixel_values"].shape[0])
    output = model.model.get_image_features(pixel_values=batch["pixel_values"].flatten(0, 1), image_grid_thw=grid_thw)
    rows, columns = built.visual_grid
    factor = round((rows * columns / scale) ** 0.5)

    def pooled(level):
        return [pool_merged(f, merged_grid(g, 2), factor) for f, g in zip(level, grid_thw, strict=True)]

    encoded = BaseModelOutputWithDeepstackFeatures(
        pooler_output=pooled(output.pooler_output),
        deepstack_features=[pooled(level) for level in output.deepstack_features],
    )
    ids, labels, mask = shrink_image_runs(
        batch["input_ids"], batch["labels"], batch["attention_mask"], task.image_token_id, rows * columns, scale, 0
    )
    is_image = (ids == task.image_token_id).int()
    positions, _ = model.model.get_rope_index(
        ids, is_image, image_grid_thw=pooled_grid_thw(grid_thw, factor), attention_mask=mask
    )
    with rows_at_scale(task, ids.shape[0], scale):
        return model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            mm_encoder_outputs={"image": encoded},
            labels=labels,
        ).loss


def assert_one_pass_equals_separate(task, built, batch) -> None:
    loss, metrics = task(batch)
    assert_one_pass_equals_separate_grads(
        task,
        loss,
        lambda: torch.stack([reference_scale_loss(task, built, batch, s) for s in task.tokens.scales]).mean(),
    )
    learned = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(metrics["scale_label_tokens"].sum()) == len(task.tokens.scales) * learned


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_one_pass_equals_mean_of_separate_per_scale_stock_forwards(layout):
    task, built = make_task(layout=layout)
    assert (built.visual_tokens, built.visual_grid) == (16, (4, 4))
    assert_one_pass_equals_separate(task, built, padded_batch(built, documents(built)))


def test_packed_documents_give_each_documents_unpacked_loss():
    """Packed rows: the DeepStack positions follow the packed layout, M-RoPE ids restart per document."""
    task, built = make_task(layout="packed")
    docs = documents(built)
    unpacked = padded_batch(built, docs)
    packed = packed_batch(docs, unpacked["pixel_values"])
    assert_packed_equals_unpacked_per_document(task, packed, unpacked, SCALES)
    _, layout = task.run(packed, [4])
    ids = task.family.layout_position_ids(task.llava, layout, built.visual_grid, built.image_token_id, packed=True)
    second = len(docs[0][0]) - 12  # the first document's image pooled from 16 to 4 tokens
    assert ids.shape[:2] == (4, 1) and (ids[:, 0, second] == 0).all()  # 1-D and M-RoPE ids restart there
    image = (layout.input_ids[0] == built.image_token_id).nonzero().flatten()
    first = image[0].item()  # a pooled 2x2 grid: heights 0,0,1,1 and widths 0,1,0,1 from the image's start
    assert ids[2, 0, image[:4]].tolist() == [first, first, first + 1, first + 1]
    assert ids[3, 0, image[:4]].tolist() == [first, first + 1, first, first + 1]


def test_the_qwen3_template_gives_apply_chat_templates_token_ids_and_assistant_mask():
    tokenizer = build_tiny_qwen3_tokenizer()
    assert tokenizer.apply_chat_template(conversation_messages(TWO_TURNS), tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat digit is this?<|im_end|>\n"
        "<|im_start|>assistant\nseven<|im_end|>\n"
        "<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n"
    )  # Qwen3-VL's shape: no default system turn
    assert_template_equals_apply_chat_template(
        tokenizer, IMAGE_PAD, "<|vision_start|>", "<|vision_end|>", "seven<|im_end|>\nIt is red.<|im_end|>\n"
    )
    # `mtrain data validate/inspect --config` tokenize with the preset's own template and counts too.
    overrides = [f"model.preset={PRESET}", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16]"]
    data = _data_tokens([str(Path(__file__).parents[2] / "configs/tiny.yaml"), *overrides])
    assert (data.tokenizer.chat_template, data.visual_tokens) == (CHAT_TEMPLATE, 16)
    assert data.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_PAD)


def test_a_saved_folder_passes_the_check_before_any_process_group_and_trains_non_square_images(tmp_path):
    """The local-folder path: a tiny Qwen3-VL saved to disk (model, tokenizer, Qwen's image processor), checked
    from its small files, then loaded at model.image_size=[32,64]: a 4x8 merged grid, scales 2, 8, 32."""
    tiny = load_config(None, [f"model.preset={PRESET}", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1]"])
    preset = build_model(tiny.model, torch.float32, None, seed=0)
    folder = tmp_path / "qwen3"
    for part in (preset.model, preset.tokenizer, preset.image_processor):
        part.save_pretrained(folder)
    base = ["model.preset=none", f"model.path={folder}", "model.image_size=[32,64]"]
    for mode in ("none", "mqt"):  # the plain language-modeling task and MQT carry DeepStack's sets too
        extra = ["checkpoint.export_at_end=false"] if mode == "mqt" else []
        assert model_problems(load_config(None, [*base, f"matryoshka.tokens.mode={mode}", *extra])) == []
    (problem,) = model_problems(load_config(None, [*base, "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[4]"]))
    assert "scale 4 does not pool a 4x8 grid" in problem
    cfg = load_config(
        None,
        [
            *base, "model.lora.enabled=true", "model.lora.strategy=per_scale", "model.lora.dropout=0.0",
            "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[2,8,32]", "matryoshka.tokens.layout=packed",
        ],
    )  # fmt: skip
    assert model_problems(cfg) == []
    task, built = lora_task(cfg)
    assert type(task.family) is Qwen3VLFamily and (built.visual_tokens, built.visual_grid) == (32, (4, 8))
    batch = padded_batch(built, documents(built))
    assert tuple(batch["pixel_values"].shape) == (4, 128, 96)  # 8x16 patches per image
    assert_one_pass_equals_separate(task, built, batch)


def test_export_reloads_in_stock_transformers_with_equal_logits(tmp_path):
    task, built = make_task(strategy="shared")
    model, stock, tokenizer, processor, prompt = export_and_reload(task, built, tmp_path / "model")
    assert type(stock).__name__ == "Qwen3VLForConditionalGeneration"
    ids = tokenizer(prompt.replace(IMAGE_PAD, IMAGE_PAD * 16), add_special_tokens=False, return_tensors="pt").input_ids
    inputs = processor(images=Image.new("RGB", (32, 32), (30, 200, 30)), return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # the saved processor keeps the trained size
    kwargs = {"input_ids": ids, "mm_token_type_ids": (ids == built.image_token_id).int(), **inputs}
    with torch.no_grad():
        want = stock(**kwargs).logits
        torch.testing.assert_close(model(**kwargs).logits, want)
        # The trained path at full scale (our features, DeepStack splice, layout and M-RoPE ids) gives them too.
        task.model = model
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        logits, _ = task.run({**batch, "pixel_values": inputs["pixel_values"][None]}, [16])
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


def test_a_text_only_batch_runs_the_deepstack_mergers_at_zero_weight():
    """ZeRO-3 lockstep: a micro-batch without images still runs the tower, its merger and DeepStack mergers."""
    cfg = m3_lora_config(PRESET, SCALES, "model.freeze.vision_tower=false")
    task, built = lora_task(cfg)
    ids = text_ids(built, "<|im_start|>a red circle.<|im_end|>")
    assert_text_only_batch_reaches_vision_at_zero_weight(task, ids, "deepstack_merger_list")


def test_plain_language_modeling_loss_equals_the_stock_forward_with_deepstack_packed_or_not():
    """`matryoshka.tokens.mode=none` (the preset's default): the language-modeling task's loss is the stock
    forward's (its own vision, DeepStack, M-RoPE ids), padded; packed rows give the same token mean; dropping the
    DeepStack sets moves it."""
    cfg = load_config(None, [f"model.preset={PRESET}", "model.lora.enabled=true", "model.lora.dropout=0.0"])
    task, built = lora_task(cfg)
    assert type(task).__name__ == "LanguageModelingTask"
    docs = documents(built)
    batch = padded_batch(built, docs)
    with torch.no_grad():
        loss, _ = task(batch)
        ids = batch["input_ids"]
        want = task.model(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].flatten(0, 1),
            image_grid_thw=patch_grid_thw(built, batch["pixel_values"].shape[0]),
            mm_token_type_ids=(ids == built.image_token_id).int(),
            labels=batch["labels"],
        ).loss
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        packed, _ = task(packed_batch(docs, batch["pixel_values"]))  # the packer ignores each document's first label
        torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-6)
        task.given_family = WithoutDeepStack()
        without, _ = task(batch)
        assert abs(float(without - want)) > 1e-3
