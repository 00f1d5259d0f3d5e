"""The qwen2_vl family end to end on the tiny-qwen2-vl preset, in one process: Qwen's patches and grids
from its own image processor, M3 pooling per side with M-RoPE ids from the pooled grid, the one-pass
all-scale loss against separate stock forwards, packed against unpacked documents, the Qwen-shaped chat
template against `apply_chat_template`, the pre-process-group folder check, and an export that stock
transformers reloads with equal logits."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLProcessor

from data_pipeline.formats import SampleRules, build_sample, conversation_messages
from data_pipeline.tokenize import IGNORE_INDEX, tokenize_sample
from mtrain.config import load_config
from mtrain.engine.data import token_spec
from mtrain.launch.model_checks import model_problems
from mtrain.model.build import build_model
from mtrain.model.families.qwen2_vl import (
    IMAGE_PAD,
    build_tiny_qwen_tokenizer,
    merged_grid,
    pool_merged,
    pooled_grid_thw,
)
from mtrain.task.registry import build_task
from mtrain.task.token_layout import shrink_image_runs
from tests.family_checks import (
    TWO_TURNS,
    assert_one_pass_equals_separate_grads,
    assert_packed_equals_unpacked_per_document,
    assert_template_equals_apply_chat_template,
    assert_text_only_batch_reaches_vision_at_zero_weight,
    conversation,
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

PRESETS = {"tiny-qwen2-vl": "Qwen2VLForConditionalGeneration", "tiny-qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration"}


def qwen_config(*overrides: str, preset: str = "tiny-qwen2-vl"):
    return m3_lora_config(preset, SCALES, *overrides)


def make_task(strategy: str = "shared_plus_per_scale", layout: str = "packed", preset: str = "tiny-qwen2-vl"):
    return lora_task(
        qwen_config(f"model.lora.strategy={strategy}", f"matryoshka.tokens.layout={layout}", preset=preset)
    )


def documents(built) -> list[tuple[list[int], list[int], int]]:
    """(input_ids, labels, images) of three documents: one image, two images, one image and a longer answer."""
    return family_documents(built, "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def pixels_for(built, images: int) -> torch.Tensor:
    """Each image through the preset's processor (Qwen's own, after the fixed resize): (images, patches, dim)."""
    return processed_images(lambda image: built.image_processor(images=image)["pixel_values"], images)


def padded_batch(built, docs) -> dict:
    return family_padded_batch(built, docs, pixels_for(built, sum(images for _, _, images in docs)))


def reference_scale_loss(task, built, batch, scale: int) -> torch.Tensor:
    """One scale through the stock model: its own vision features and loss, each image pooled by
    `pool_merged`, M-RoPE ids from `get_rope_index` on the pooled grids of the shrunk rows."""
    model = task.llava
    images = batch["pixel_values"].shape[0]
    rows, columns = built.visual_grid
    grid_thw = torch.tensor([[1, rows * 2, columns * 2]] * images)  # in patches, before the 2x2 merger
    features = model.model.get_image_features(pixel_values=batch["pixel_values"].flatten(0, 1), image_grid_thw=grid_thw)
    factor = round((rows * columns / scale) ** 0.5)
    pooled = torch.cat(
        [pool_merged(f, merged_grid(g, 2), factor) for f, g in zip(features.pooler_output, grid_thw, strict=True)]
    )
    ids, labels, mask = shrink_image_runs(
        batch["input_ids"], batch["labels"], batch["attention_mask"], task.image_token_id, rows * columns, scale, 0
    )
    is_image = ids == task.image_token_id
    positions, _ = model.model.get_rope_index(
        ids, is_image.int(), image_grid_thw=pooled_grid_thw(grid_thw, factor), attention_mask=mask
    )
    embeds = model.get_input_embeddings()(ids).masked_scatter(is_image.unsqueeze(-1), pooled)
    with rows_at_scale(task, ids.shape[0], scale):
        return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels).loss


def assert_one_pass_equals_separate(task, built, batch) -> None:
    loss, metrics = task(batch)
    assert_one_pass_equals_separate_grads(
        task,
        loss,
        lambda: torch.stack([reference_scale_loss(task, built, batch, s) for s in task.tokens.scales]).mean(),
    )
    learned = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(metrics["scale_label_tokens"].sum()) == len(task.tokens.scales) * learned


@pytest.mark.parametrize(
    "preset,layout", [("tiny-qwen2-vl", "packed"), ("tiny-qwen2-vl", "padded"), ("tiny-qwen2.5-vl", "packed")]
)
def test_one_pass_equals_mean_of_separate_per_scale_stock_forwards(preset, layout):
    task, built = make_task(layout=layout, preset=preset)
    assert type(task.llava).__name__ == PRESETS[preset]
    assert (built.visual_tokens, built.visual_grid) == (16, (4, 4))
    batch = padded_batch(built, documents(built))
    assert tuple(batch["pixel_values"].shape) == (4, 64, 3 * 2 * 4 * 4)  # Qwen's flattened patches
    assert_one_pass_equals_separate(task, built, batch)


def test_a_saved_folder_trains_non_square_images_with_m3_factors(tmp_path):
    """The local-folder path: a tiny Qwen2-VL saved to disk (model, tokenizer, Qwen's image processor),
    loaded at model.image_size=[32,64]: a 4x8 merged grid, scales 2, 8, 32 (factors 4, 2, 1)."""
    tiny = load_config(
        None, ["model.preset=tiny-qwen2-vl", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1]"]
    )
    preset = build_model(tiny.model, torch.float32, None, seed=0)
    folder = tmp_path / "qwen"
    preset.model.save_pretrained(folder)
    preset.tokenizer.save_pretrained(folder)
    preset.image_processor.save_pretrained(folder)
    cfg = load_config(
        None,
        [
            "model.preset=none", f"model.path={folder}", "model.image_size=[32,64]", "model.lora.enabled=true",
            "model.lora.strategy=per_scale", "model.lora.dropout=0.0", "matryoshka.tokens.mode=m3",
            "matryoshka.tokens.scales=[2,8,32]", "matryoshka.tokens.layout=packed",
        ],
    )  # fmt: skip
    assert model_problems(cfg) == []
    task, built = lora_task(cfg)
    assert (built.visual_tokens, built.visual_grid) == (32, (4, 8))
    batch = padded_batch(built, documents(built))
    assert tuple(batch["pixel_values"].shape) == (4, 128, 96)  # 8x16 patches per image
    assert_one_pass_equals_separate(task, built, batch)


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_documents_give_each_documents_unpacked_loss_with_mrope_ids(preset):
    task, built = make_task(layout="packed", preset=preset)
    docs = documents(built)
    unpacked = padded_batch(built, docs)
    packed = packed_batch(docs, unpacked["pixel_values"])
    row = packed["input_ids"][0].tolist()
    assert_packed_equals_unpacked_per_document(task, packed, unpacked, SCALES)
    # The ids the packed row ran with: 1-D per document first, then M-RoPE's three, each document from 0.
    _, layout = task.run(packed, [16])
    ids = task.family.layout_position_ids(task.llava, layout, built.visual_grid, built.image_token_id, packed=True)
    second = len(docs[0][0])
    assert ids.shape == (4, 1, len(row)) and ids[0, 0, second] == 0 and (ids[1:, 0, second] == 0).all()
    image = (layout.input_ids[0] == built.image_token_id).nonzero().flatten()
    first = image[0].item()  # a 4x4 grid: heights 0,0,0,0,1,... widths 0,1,2,3,0,... from the image's start
    assert ids[2, 0, image[:16]].tolist() == [first + r for r in range(4) for _ in range(4)]
    assert ids[3, 0, image[:16]].tolist() == [first + c for _ in range(4) for c in range(4)]


def test_the_qwen_template_gives_apply_chat_templates_token_ids_and_assistant_mask():
    tokenizer = build_tiny_qwen_tokenizer()
    assert tokenizer.apply_chat_template(conversation_messages(TWO_TURNS), tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat digit is this?<|im_end|>\n"
        "<|im_start|>assistant\nseven<|im_end|>\n"
        "<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n"
    )
    # One visual token per image lines the ids up with the template's single <|image_pad|>; with sixteen, the
    # image's run sits between vision_start and vision_end.
    assert_template_equals_apply_chat_template(
        tokenizer, IMAGE_PAD, "<|vision_start|>", "<|vision_end|>", "seven<|im_end|>\nIt is red.<|im_end|>\n"
    )


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's stock processor without its video processor, which needs torchvision (not in the CPU stack):
    the same expansion of each <|image_pad|> to its image's tokens, tokenizer call and mm_token_type_ids."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def png(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_captions_and_interleaved_documents_get_qwens_vision_markers_as_its_processor_writes_them():
    """A caption and an interleaved document (two images side by side) tokenized for training give the ids
    Qwen's processor gives for the same text with <|vision_start|><|image_pad|><|vision_end|> at each image,
    the markers unlearned like the image's tokens, and the M-RoPE ids of the packed row are, per document, those
    of the model's get_rope_index on the processor's ids (adjacent images are two grids, not one run)."""
    task, built = make_task(preset="tiny-qwen2-vl")
    cfg = qwen_config()
    stock = ImageOnlyQwen2VLProcessor(built.image_processor.processor, built.tokenizer)
    vision, eos = "<|vision_start|>" + IMAGE_PAD + "<|vision_end|>", built.tokenizer.eos_token
    marker_ids = {built.model.config.vision_start_token_id, built.model.config.vision_end_token_id}
    red, blue = png((200, 30, 30)), png((30, 30, 200))
    interleaved = {
        "texts": ["Shapes: ", None, None, " a red and a blue one."],
        "images": [None, "0.png", "1.png", None],
    }
    samples = [
        ({"png": red, "txt": b"a red square"}, f"{vision}\na red square{eos}", [red], "a red square" + eos),
        (
            {"json": json.dumps(interleaved).encode(), "0.png": red, "1.png": blue},
            f"Shapes: {vision}{vision} a red and a blue one.{eos}",
            [red, blue],
            "Shapes:  a red and a blue one." + eos,
        ),
    ]
    spec = token_spec(cfg, built)
    docs, pixels, references = [], [], []
    for members, text, images, learned_text in samples:
        tokens = tokenize_sample(build_sample("doc", members, SampleRules()), spec, built.visual_tokens)
        decoded = [Image.open(io.BytesIO(image)).convert("RGB") for image in images]
        reference = stock(text=[text], images=decoded, return_tensors="pt")
        assert tokens.input_ids == reference["input_ids"][0].tolist()
        marker_labels = [label for t, label in zip(tokens.input_ids, tokens.labels, strict=True) if t in marker_ids]
        assert len(marker_labels) == 2 * len(images) and set(marker_labels) == {IGNORE_INDEX}
        learned = [t for t, label in zip(tokens.input_ids, tokens.labels, strict=True) if label != IGNORE_INDEX]
        assert built.tokenizer.decode(learned) == learned_text
        docs.append((tokens.input_ids, tokens.labels, len(images)))
        pixels += [built.image_processor(images=image)["pixel_values"] for image in decoded]
        references.append(reference)
    _, layout = task.run(packed_batch(docs, torch.cat(pixels)), [16])
    ids = task.family.layout_position_ids(task.llava, layout, built.visual_grid, built.image_token_id, packed=True)
    start = 0
    for (doc_ids, _, _), reference in zip(docs, references, strict=True):
        want, _ = task.llava.model.get_rope_index(
            reference["input_ids"], reference["mm_token_type_ids"], image_grid_thw=reference["image_grid_thw"]
        )
        assert torch.equal(ids[1:, 0, start : start + len(doc_ids)], want[:, 0])
        start += len(doc_ids)
    # A conversation has its markers from the chat template, once: the template's own ids.
    chat = tokenize_sample(conversation(built.tokenizer, TWO_TURNS), spec, 1)
    messages = conversation_messages(TWO_TURNS)
    assert chat.input_ids == built.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_a_qwen2_vl_folder_passes_the_check_before_any_process_group(tmp_path):
    built = build_model(qwen_config().model, torch.float32, None, seed=0, config_only=False)
    folder = tmp_path / "qwen"
    built.model.config.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)
    base = ["model.preset=none", f"model.path={folder}", "matryoshka.tokens.mode=m3"]
    fits = load_config(None, [*base, "model.image_size=[32,64]", "matryoshka.tokens.scales=[2,8,32]"])
    assert model_problems(fits) == []  # a 4x8 merged grid pooled by 4, 2, 1 per side
    (problem,) = model_problems(load_config(None, [*base, "model.image_size=[32,64]", "matryoshka.tokens.scales=[4]"]))
    assert "scale 4 does not pool a 4x8 grid" in problem and "[2, 8, 32]" in problem
    (problem,) = model_problems(load_config(None, [*base, "matryoshka.tokens.scales=[1,4]"]))
    assert "set model.image_size=[height,width]" in problem


@pytest.mark.parametrize("preset", PRESETS)
def test_export_reloads_in_stock_transformers_with_equal_logits(tmp_path, preset):
    task, built = make_task(strategy="shared", preset=preset)
    model, stock, tokenizer, processor, prompt = export_and_reload(task, built, tmp_path / "model")
    assert type(stock).__name__ == PRESETS[preset]
    ids = tokenizer(prompt.replace(IMAGE_PAD, IMAGE_PAD * 16), add_special_tokens=False, return_tensors="pt").input_ids
    image = Image.new("RGB", (32, 32), (30, 200, 30))
    inputs = processor(images=image, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # the saved processor keeps the trained size
    torch.testing.assert_close(inputs["pixel_values"], built.image_processor(images=image)["pixel_values"][0])
    kwargs = {"input_ids": ids, "mm_token_type_ids": (ids == built.image_token_id).int(), **inputs}
    with torch.no_grad():
        torch.testing.assert_close(stock(**kwargs).logits, model(**kwargs).logits)
        # And the trained path at full scale gives the same logits (task.run: our features, layout and M-RoPE ids).
        batch = {
            "input_ids": ids,
            "labels": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": inputs["pixel_values"][None],
        }
        task.model = model
        logits, _ = task.run(batch, [16])
        torch.testing.assert_close(logits, stock(**kwargs).logits, rtol=1e-4, atol=1e-5)


def test_a_text_only_batch_runs_the_vision_path_at_zero_weight():
    """ZeRO-3 lockstep: a micro-batch without images still runs Qwen's tower and merger, on a blank image."""
    task, built = make_task(preset="tiny-qwen2-vl")
    ids = text_ids(built, "<|im_start|>a red circle.<|im_end|>")
    assert_text_only_batch_reaches_vision_at_zero_weight(task, ids, "visual.merger")


def test_what_the_qwen_families_do_not_run_yet_is_refused_at_config_load():
    from mtrain.config.core import ConfigError

    # MQT and contrastive train and MQT exports (tests/unit/test_family_objectives.py).
    load_config(None, ["model.preset=tiny-qwen2.5-vl", "matryoshka.tokens.mode=mqt"])
    with pytest.raises(ConfigError, match=r"perfect square; \[8\]"):  # a tiny preset's grid is square
        load_config(None, ["model.preset=tiny-qwen2-vl", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,8]"])


def test_language_modeling_without_scales_equals_the_stock_forward_packed_or_not():
    """matryoshka.tokens.mode=none: the language-modeling task, every image at full size, M-RoPE ids per document."""
    cfg = load_config(None, ["model.preset=tiny-qwen2-vl", "model.freeze.language_model=false"])
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0)
    docs = documents(built)
    unpacked = padded_batch(built, docs)
    packed = packed_batch(docs, unpacked["pixel_values"])
    ids = unpacked["input_ids"]
    stock = task.llava(
        input_ids=ids,
        attention_mask=unpacked["attention_mask"],
        pixel_values=unpacked["pixel_values"].flatten(0, 1),
        image_grid_thw=torch.tensor([[1, 8, 8]] * 4),
        mm_token_type_ids=(ids == built.image_token_id).int(),
        labels=unpacked["labels"],
    ).loss
    torch.testing.assert_close(task(unpacked)[0], stock, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(task(packed)[0], stock, rtol=1e-5, atol=1e-6)
