"""The gemma3 family end to end on the tiny-gemma3 preset, in one process: Gemma 3's own image processor,
SigLIP tower and pooling projector, M3 pooling of the projected 4x4 grid with the bidirectional image
attention following the pooled count, the one-pass all-scale loss against separate stock forwards, packed
against unpacked documents (a sliding-window layer included), the Gemma-shaped chat template against
`apply_chat_template`, captions and interleaved documents against the stock Gemma3Processor's ids, the
pre-process-group folder check, and an export that stock transformers reloads with equal logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.formats import conversation_messages
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config import load_config
from mtrain.launch.model_checks import model_problems
from mtrain.model.build import build_model
from mtrain.model.families.gemma3 import IMAGE_SOFT_TOKEN, build_tiny_gemma3_tokenizer
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

SCALES = [1, 4, 16]  # the projector's 4x4 grid of a 32x32 image pooled by 4, 2 and 1 per side


def gemma_config(*overrides: str):
    return m3_lora_config("tiny-gemma3", SCALES, *overrides)


def make_task(strategy: str = "shared_plus_per_scale", layout: str = "packed"):
    return lora_task(gemma_config(f"model.lora.strategy={strategy}", f"matryoshka.tokens.layout={layout}"))


def documents(built) -> list[tuple[list[int], list[int], int]]:
    """(input_ids, labels, images) of three documents: one image, two images (longer than the 32-token
    sliding window), one image and a longer answer."""
    return family_documents(built, "<bos><start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>")


def pixels_for(built, images: int) -> torch.Tensor:
    """Each image through the preset's processor (Gemma 3's own): (images, 3, 32, 32)."""
    return processed_images(
        lambda image: built.image_processor(images=image, return_tensors="pt")["pixel_values"], images
    )


def padded_batch(built, docs) -> dict:
    return family_padded_batch(built, docs, pixels_for(built, sum(images for _, _, images in docs)))


def reference_scale_output(task, built, batch, scale: int, bidirectional: bool = True):
    """One scale through the stock model: its own projected features (a 4x4 grid per image) average-pooled
    to sqrt(scale) per side, the shrunk rows, and stock Gemma 3's mask from `token_type_ids`."""
    model = task.llava
    features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    images, tokens, dim = features.shape
    side, out = round(tokens**0.5), round(scale**0.5)
    grid = features.transpose(1, 2).reshape(images, dim, side, side)
    pooled = F.avg_pool2d(grid, side // out).flatten(2).transpose(1, 2)
    ids, labels, mask = shrink_image_runs(
        batch["input_ids"], batch["labels"], batch["attention_mask"], task.image_token_id, tokens, scale, 0
    )
    is_image = ids == task.image_token_id
    embeds = model.get_input_embeddings()(ids).masked_scatter(is_image.unsqueeze(-1), pooled)
    token_type_ids = is_image.long() if bidirectional else None
    with rows_at_scale(task, ids.shape[0], scale):
        return model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=token_type_ids, labels=labels)


def assert_one_pass_equals_separate(task, built, batch) -> None:
    loss, metrics = task(batch)
    # grad rtol 5e-4: the projector weight gathers sums over every image token, in another order here
    assert_one_pass_equals_separate_grads(
        task,
        loss,
        lambda: torch.stack([reference_scale_output(task, built, batch, s).loss for s in task.tokens.scales]).mean(),
        grad_rtol=5e-4,
    )
    learned = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(metrics["scale_label_tokens"].sum()) == len(task.tokens.scales) * learned
    with torch.no_grad():  # the image attention matters: a plain causal forward gives other logits
        bidirectional = reference_scale_output(task, built, batch, 4).logits
        causal = reference_scale_output(task, built, batch, 4, bidirectional=False).logits
    assert (bidirectional - causal).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_one_pass_equals_mean_of_separate_per_scale_stock_forwards(layout):
    task, built = make_task(layout=layout)
    assert type(task.llava).__name__ == "Gemma3ForConditionalGeneration"
    assert built.visual_tokens == 16 and built.family.visual_grid(task.llava.config) == (4, 4)
    batch = padded_batch(built, documents(built))
    assert tuple(batch["pixel_values"].shape) == (4, 3, 32, 32)
    with torch.no_grad():  # the preset's seeded projection (stock starts it at zero): images differ
        features = task.image_features(batch["pixel_values"])
    assert features.shape == (4, 16, 64) and (features[0] - features[1]).abs().min() > 0
    assert_one_pass_equals_separate(task, built, batch)


def test_a_saved_folder_trains_with_m3_scales(tmp_path):
    """The local-folder path: a tiny Gemma 3 saved to disk (model, tokenizer, Gemma 3's image processor),
    loaded back by model.path with per-scale LoRA; the one-pass loss still equals the stock forwards."""
    preset = build_model(load_config(None, ["model.preset=tiny-gemma3"]).model, torch.float32, None, seed=0)
    folder = tmp_path / "gemma3"
    preset.model.save_pretrained(folder)
    preset.tokenizer.save_pretrained(folder)
    preset.image_processor.save_pretrained(folder)
    cfg = load_config(
        None,
        [
            "model.preset=none", f"model.path={folder}", "model.lora.enabled=true", "model.lora.strategy=per_scale",
            "model.lora.dropout=0.0", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16]",
            "matryoshka.tokens.layout=packed",
        ],
    )  # fmt: skip
    assert model_problems(cfg) == []
    task, built = lora_task(cfg)
    assert (built.visual_tokens, built.image_token_id) == (16, preset.image_token_id)
    assert built.tokenizer.image_token == IMAGE_SOFT_TOKEN
    assert_one_pass_equals_separate(task, built, padded_batch(built, documents(built)))


def test_packed_documents_give_each_documents_unpacked_loss_with_image_attention():
    """Packed rows use mtrain's masks (same document AND (causal OR same image), the sliding window on
    sliding layers); unpacked rows stock Gemma 3's. Their per-document losses agree at every scale."""
    task, built = make_task(layout="packed")
    docs = documents(built)
    assert len(docs[1][0]) > task.llava.config.text_config.sliding_window  # the sliding layer masks something
    unpacked = padded_batch(built, docs)
    packed = packed_batch(docs, unpacked["pixel_values"])
    assert_packed_equals_unpacked_per_document(task, packed, unpacked, SCALES)
    # The packed masks at scale 4: each image's 4 pooled tokens see each other both ways, nothing crosses documents.
    _, layout = task.run(packed, [4])
    masks = task.family.language_model_inputs(task.llava, layout, built.image_token_id, packed=True)["attention_mask"]
    full = masks["full_attention"][0, 0]
    image = (layout.input_ids[0] == built.image_token_id).nonzero().flatten()
    assert len(image) == 4 * 4  # four images of 4 tokens each
    first = image[:4]
    assert full[first[0], first[3]] and full[first[3], first[0]]  # bidirectional within the image
    assert not full[first[0], image[4]]  # not into the next image
    second = len(docs[0][0]) - sum(16 - 4 for _ in range(1))  # the second document's first column at scale 4
    assert layout.position_ids[0, second] == 0 and not full[second, second - 1]


def test_the_gemma_template_gives_apply_chat_templates_token_ids_and_assistant_mask():
    tokenizer = build_tiny_gemma3_tokenizer()
    assert tokenizer.apply_chat_template(conversation_messages(TWO_TURNS), tokenize=False) == (
        "<bos><start_of_turn>user\n<start_of_image><image_soft_token><end_of_image>\nWhat digit is this?"
        "<end_of_turn>\n<start_of_turn>model\nseven<end_of_turn>\n"
        "<start_of_turn>user\nAnd its colour?<end_of_turn>\n<start_of_turn>model\nIt is red.<end_of_turn>\n"
    )
    # One visual token per image lines the ids up with the template's single <image_soft_token>; with sixteen,
    # the image's run sits between start_of_image and end_of_image.
    ids = assert_template_equals_apply_chat_template(
        tokenizer,
        IMAGE_SOFT_TOKEN,
        "<start_of_image>",
        "<end_of_image>",
        "seven<end_of_turn>\nIt is red.<end_of_turn>\n",
    )
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_a_template_that_drops_the_image_token_is_refused():
    """Gemma 3's own template writes only <start_of_image> (its processor expands it): images would fall
    out of the sample silently, so the conversation is refused, naming model.chat_template."""
    from data_pipeline.chat_template import ChatTemplateError

    tokenizer = build_tiny_gemma3_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "<start_of_image>" + IMAGE_SOFT_TOKEN + "<end_of_image>", "<start_of_image>"
    )
    with pytest.raises(ChatTemplateError, match=r"renders 0 '<image_soft_token>' for this conversation's 1 image"):
        conversation(tokenizer, TWO_TURNS)


def test_a_gemma3_folder_passes_the_check_before_any_process_group(tmp_path):
    built = build_model(gemma_config().model, torch.float32, None, seed=0)
    folder = tmp_path / "gemma3"
    built.model.config.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)
    base = ["model.preset=none", f"model.path={folder}"]
    assert (
        model_problems(load_config(None, [*base, "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16]"]))
        == []
    )
    (problem,) = model_problems(load_config(None, [*base, "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[9]"]))
    assert "[9] do not fit this model's 4x4 grid" in problem
    (problem,) = model_problems(load_config(None, [*base, "model.image_size=[32,32]"]))
    assert "is for Qwen models" in problem


def test_export_reloads_in_stock_transformers_with_equal_logits(tmp_path):
    task, built = make_task(strategy="shared")
    model, stock, tokenizer, processor, prompt = export_and_reload(task, built, tmp_path / "model")
    assert type(stock).__name__ == "Gemma3ForConditionalGeneration"
    expanded = prompt.replace(IMAGE_SOFT_TOKEN, IMAGE_SOFT_TOKEN * 16)
    ids = tokenizer(expanded, add_special_tokens=False, return_tensors="pt").input_ids
    image = Image.new("RGB", (40, 50), (30, 200, 30))
    inputs = processor(images=image, return_tensors="pt")
    torch.testing.assert_close(
        inputs["pixel_values"], built.image_processor(images=image, return_tensors="pt")["pixel_values"]
    )
    kwargs = {"input_ids": ids, "token_type_ids": (ids == built.image_token_id).long(), **inputs}
    with torch.no_grad():
        want = stock(**kwargs).logits
        torch.testing.assert_close(want, model(**kwargs).logits)
        # And the trained path at full scale gives the same logits (task.run: our features, layout and mask).
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids), **inputs}
        task.model = model
        for layout in ("padded", "packed"):
            task.tokens = dataclasses.replace(task.tokens, layout=layout)
            logits, _ = task.run(batch, [16])
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


def test_a_text_only_batch_runs_the_vision_path_at_zero_weight():
    """ZeRO-3 lockstep: a micro-batch without images still runs the SigLIP tower and projector, on a blank image."""
    task, built = make_task()
    ids = text_ids(built, "<bos><start_of_turn>a red circle.<end_of_turn>")
    assert_text_only_batch_reaches_vision_at_zero_weight(task, ids, "multi_modal_projector")


def test_what_the_gemma3_preset_does_not_run_yet_is_refused_at_config_load():
    from mtrain.config.core import ConfigError

    # MQT and contrastive train and MQT exports (tests/unit/test_family_objectives.py).
    load_config(None, ["model.preset=tiny-gemma3", "matryoshka.tokens.mode=mqt"])
    with pytest.raises(ConfigError, match=r"the side of each scale must divide the 4x4 grid"):
        load_config(None, ["model.preset=tiny-gemma3", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,9]"])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # packed masks: boolean for SDPA, additive for eager
def test_language_modeling_without_scales_equals_the_stock_forward_packed_or_not(attention):
    """matryoshka.tokens.mode=none: the language-modeling task, every image at full size, image attention per document."""
    cfg = load_config(
        None,
        ["model.preset=tiny-gemma3", "model.freeze.language_model=false", f"model.attn_implementation={attention}"],
    )
    built = build_model(cfg.model, torch.float32, None, seed=0)
    task = build_task(cfg, built, rank=0)
    docs = documents(built)
    unpacked = padded_batch(built, docs)
    ids = unpacked["input_ids"]
    stock = task.llava(
        input_ids=ids,
        attention_mask=unpacked["attention_mask"],
        pixel_values=unpacked["pixel_values"],
        token_type_ids=(ids == built.image_token_id).long(),
        labels=unpacked["labels"],
    ).loss
    torch.testing.assert_close(task(unpacked)[0], stock, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(task(packed_batch(docs, unpacked["pixel_values"]))[0], stock, rtol=1e-5, atol=1e-6)


def test_flash_attention_falls_back_to_sdpa_for_gemma3():
    """Stock Gemma 3 refuses flash_attention_2 (it would drop the image mask): `auto` on a GPU with
    flash-attn installed must not pick it for a gemma3 model."""
    from mtrain.model.build import family_attention
    from mtrain.model.families import family_for

    assert family_attention(family_for("gemma3"), "flash_attention_2") == "sdpa"
    assert family_attention(family_for("gemma3"), "eager") == "eager"
    assert family_attention(family_for("llava"), "flash_attention_2") == "flash_attention_2"


# ── captions and interleaved documents: Gemma3Processor's text around every image ──────────────────────────
MARKER_CORPUS = [
    "Look at this:\n\n",
    "\n\nthen this one:\n\n",
    "\n\na red circle.",
    "\n\n\n\nthe end.",
    "a red circle.",
]


def gemma_shaped_tokenizer():
    """The Gemma 3 preset's special tokens and template over a BPE that, like Gemma's own, does not split text at
    whitespace before merging (so "\\n\\n" merges with the letters beside it) and writes <bos> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from mtrain.model.families.gemma3 import CHAT_TEMPLATE, SPECIAL_TOKENS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(MARKER_CORPUS * 8, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, chat_template=CHAT_TEMPLATE, bos_token="<bos>", eos_token="<end_of_turn>",
        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_SOFT_TOKEN, "boi_token": "<start_of_image>",
                                                 "eoi_token": "<end_of_image>"},
    )  # fmt: skip


def test_captions_and_documents_get_gemma3_processors_exact_ids_around_every_image():
    """The stock Gemma3Processor writes `\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n` for each
    image and tokenizes the whole prompt at once: the blank lines merge with the text beside them. Tokenization
    with the family's markers gives its ids exactly (the EOS mtrain adds aside), the markers unlearned."""
    from transformers import Gemma3Processor

    from data_pipeline.formats import ImageSegment, Sample, TextSegment
    from data_pipeline.pairs import PairSpec, side_ids
    from data_pipeline.tokenize import TokenSpec, tokenize_sample
    from mtrain.model.families import family_for
    from mtrain.model.families.gemma3 import tiny_gemma3_image_processor

    tokenizer = gemma_shaped_tokenizer()
    soft, start, end = tokenizer.convert_tokens_to_ids([IMAGE_SOFT_TOKEN, "<start_of_image>", "<end_of_image>"])
    processor = Gemma3Processor(image_processor=tiny_gemma3_image_processor(32), tokenizer=tokenizer,
                                image_seq_length=4)  # fmt: skip
    spec = TokenSpec.with_markers(tokenizer, soft, 200, family_for("gemma3").image_markers)
    assert (spec.image_start_ids, spec.image_end_ids, spec.image_start_text) == ((start,), (end,), "\n\n")
    image = Image.new("RGB", (32, 32), "red")
    samples = {  # (segments, the processor's text: <start_of_image> where each image goes)
        "caption": ([ImageSegment("jpg"), TextSegment("a red circle.", True)], "<start_of_image>a red circle."),
        "interleaved": (
            [TextSegment("Look at this:", True), ImageSegment("0.jpg"), TextSegment("then this one:", True),
             ImageSegment("1.jpg"), TextSegment("the end.", True)],
            "Look at this:<start_of_image>then this one:<start_of_image>the end.",
        ),
        "adjacent images": (  # no text between, before or after them: the blank lines on their own
            [ImageSegment("0.jpg"), ImageSegment("1.jpg"), TextSegment("the end.", True), ImageSegment("2.jpg")],
            "<start_of_image><start_of_image>the end.<start_of_image>",
        ),
    }  # fmt: skip
    for form, (segments, text) in samples.items():
        tokens = tokenize_sample(Sample(form, "interleaved", segments), spec, 4)
        images = [image] * len(tokens.images)
        stock = processor(text=text, images=images)["input_ids"][0]
        assert tokens.input_ids == [*stock, tokenizer.eos_token_id], form
        ids, labels = torch.tensor(tokens.input_ids), torch.tensor(tokens.labels)
        assert (labels[(ids == soft) | (ids == start) | (ids == end)] == IGNORE_INDEX).all()
        learned = tokenizer.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=True)
        assert learned.strip("\n").replace("\n\n", "") == "".join(s.text for s in segments if hasattr(s, "text"))
        assert all(tokenizer.decode([i]).strip("\n") for i in ids[labels != IGNORE_INDEX].tolist()[:-1])
    # The blank lines merged with the text: tokenized apart, they would give other ids.
    assert len(tokenizer("\n\na red circle.", add_special_tokens=False)["input_ids"]) < len(
        tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        + tokenizer("a red circle.", add_special_tokens=False)["input_ids"]
    )
    # A pair side (the contrastive objective's query) the same way.
    pair = PairSpec(tokenizer, soft, 4, 200, 32, "", spec.image_start_ids, spec.image_end_ids, "\n\n", "\n\n")
    stock = processor(text="Look at this:<start_of_image>a red circle.", images=[image])["input_ids"][0]
    assert side_ids(pair, "Look at this:<image>a red circle.") == [*stock, tokenizer.eos_token_id]
