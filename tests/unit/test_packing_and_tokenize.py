"""Tokenization hook, label masking for every form, packing fill, and packed == unpacked loss."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from data_pipeline.formats import ImageSegment, Sample, TextSegment
from data_pipeline.packing import collate_rows, non_pad_fraction
from data_pipeline.tokenize import IGNORE_INDEX, TokenSpec, tokenize_sample
from mtrain.config.schema import TinyLlavaConfig
from mtrain.model.build import tiny_llava_config
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer
from tests.data_factory import make_loader, write_mixed_shards

TOKENIZER = build_tiny_tokenizer()
IMAGE_ID = TOKENIZER.convert_tokens_to_ids(IMAGE_TOKEN)


def conversation() -> Sample:
    return Sample(
        "c0",
        "conversation",
        [
            TextSegment("USER: ", False),
            ImageSegment("0.jpg"),
            TextSegment("what is it?", False),
            TextSegment("ASSISTANT: ", False),
            TextSegment("a red circle.", True),
            ImageSegment("1.jpg"),
            TextSegment("and a square.", True),
        ],
    )


def test_visual_tokens_per_image_and_masking():
    spec = TokenSpec(TOKENIZER, IMAGE_ID, max_len=200)
    tokens = tokenize_sample(conversation(), spec, [9, 36])  # per-image scales, as the Matryoshka hook passes
    ids, labels = torch.tensor(tokens.input_ids), torch.tensor(tokens.labels)
    assert [end - start for start, end in tokens.image_spans] == [9, 36]
    assert int((ids == IMAGE_ID).sum()) == 45 and (labels[ids == IMAGE_ID] == IGNORE_INDEX).all()
    learned = TOKENIZER.decode(ids[labels != IGNORE_INDEX])
    assert "a red circle." in learned and "and a square." in learned
    assert "what is it" not in learned and "USER" not in learned  # user turns are not learned
    assert labels[-1] == TOKENIZER.eos_token_id


def test_truncation_never_splits_an_image():
    spec = TokenSpec(TOKENIZER, IMAGE_ID, max_len=50)  # the cut would fall inside the second image (35..71)
    tokens = tokenize_sample(conversation(), spec, [9, 36])
    assert len(tokens) == 35 and len(tokens.images) == 1 and tokens.image_spans == [tokens.image_spans[0]]
    assert int((torch.tensor(tokens.input_ids) == IMAGE_ID).sum()) == 9


def test_an_image_keeps_its_family_markers_unlearned_and_a_cut_never_separates_them():
    """Qwen's markers around each image of a document (the family's `image_markers`), written by tokenization:
    unlearned like the image; a cut that would fall between the image and its end marker drops both markers too."""
    from mtrain.model.families.qwen2_vl import IMAGE_PAD, VISION_END, VISION_START, build_tiny_qwen_tokenizer

    tokenizer = build_tiny_qwen_tokenizer()
    image_id, start_id, end_id = tokenizer.convert_tokens_to_ids([IMAGE_PAD, VISION_START, VISION_END])
    document = Sample(
        "d", "interleaved", [TextSegment("a page ", True), ImageSegment("jpg"), TextSegment(" more", True)]
    )
    spec = TokenSpec.with_markers(tokenizer, image_id, 200, (VISION_START, VISION_END))
    assert (spec.image_start_ids, spec.image_end_ids) == ((start_id,), (end_id,))
    whole = tokenize_sample(document, spec, 4)
    first = whole.input_ids.index(start_id)
    assert whole.input_ids[first : first + 6] == [start_id, *[image_id] * 4, end_id]
    assert whole.labels[first : first + 6] == [IGNORE_INDEX] * 6 and whole.image_spans == [(first + 1, first + 5)]
    for max_len, kept in [(first + 5, 0), (first + 6, 1)]:  # before or after the end marker
        cut = tokenize_sample(document, dataclasses.replace(spec, max_len=max_len), 4)
        assert len(cut.images) == kept and len(cut) == (first + 6 if kept else first)
    # A sample rendered by a chat template has its markers from the template: none are added.
    rendered = dataclasses.replace(document, rendered=True)
    assert tokenize_sample(rendered, spec, 4).input_ids.count(start_id) == 0


def two_exchanges() -> Sample:
    """USER, ASSISTANT, USER, ASSISTANT, as build_conversation marks it (turn_ends)."""
    segments = [
        TextSegment("USER: ", False),
        ImageSegment("jpg"),
        TextSegment("what is it?\n", False),
        TextSegment("ASSISTANT: ", False),
        TextSegment("a red circle.\n", True),
        TextSegment("USER: ", False),
        TextSegment("and the colour of the background, please?\n", False),
        TextSegment("ASSISTANT: ", False),
        TextSegment("the background is plain white.\n", True),
    ]
    return Sample("c1", "conversation", segments, turn_ends=[5, 9])


def test_conversations_are_cut_after_the_last_whole_assistant_turn():
    full = tokenize_sample(two_exchanges(), TokenSpec(TOKENIZER, IMAGE_ID, max_len=500), 9)
    first_end = (
        len(
            tokenize_sample(
                Sample("c", "conversation", two_exchanges().segments[:5]), TokenSpec(TOKENIZER, IMAGE_ID, 500), 9
            )
        )
        - 1
    )
    for max_len in (first_end + 1, len(full) - 1):
        tokens = tokenize_sample(two_exchanges(), TokenSpec(TOKENIZER, IMAGE_ID, max_len=max_len), 9)
        # Only the first exchange, whole, then EOS (learned): no half question, no half answer.
        assert tokens.input_ids == full.input_ids[:first_end] + [TOKENIZER.eos_token_id]
        assert tokens.labels[-1] == TOKENIZER.eos_token_id
        assert "a red circle." in TOKENIZER.decode([t for t in tokens.labels if t != IGNORE_INDEX])


def test_a_sample_cut_to_nothing_learned_is_a_fault_that_names_its_length():
    import pytest

    from data_pipeline.formats import SampleFault

    with pytest.raises(SampleFault, match="keeps no learned token within data.max_len=20") as caught:
        tokenize_sample(two_exchanges(), TokenSpec(TOKENIZER, IMAGE_ID, max_len=20), 9)
    assert caught.value.reason == "nothing_learned" and caught.value.needed > 20


def test_packing_fills_rows_and_positions_restart(tmp_path):
    pattern = write_mixed_shards(tmp_path / "mix", [120, 90, 150])
    loader = make_loader(pattern, batch_size=4, max_len=512, visual_tokens=16, image_size=16, packing=True)
    fractions, documents = [], 0
    for _ in range(12):
        batch = next(loader)
        fractions.append(non_pad_fraction(batch))
        documents += len(batch["keys"])
        starts = batch["position_ids"] == 0
        # one segment start per document plus at most one for the padding tail of each row
        assert int(starts.sum()) - len(batch["keys"]) <= batch["input_ids"].shape[0]
        assert batch["pixel_values"].shape[0] * 16 == int((batch["input_ids"] == IMAGE_ID).sum())
    mean = sum(fractions) / len(fractions)
    print(f"packing: {mean:.3f} non-pad tokens over {len(fractions)} batches, {documents} documents")
    assert mean >= 0.95, fractions
    assert documents > 4 * 12  # several documents per row


def test_packed_loss_equals_unpacked_per_document(tmp_path):
    """A packed row (sdpa, position_ids, no mask) gives every document the loss it has alone."""
    from transformers import LlavaForConditionalGeneration

    pattern = write_mixed_shards(tmp_path / "mix", [40])
    loader = make_loader(pattern, batch_size=2, max_len=256, visual_tokens=16, image_size=16, packing=True)
    batch = next(loader)
    assert len(batch["keys"]) >= 4

    tiny = TinyLlavaConfig(image_size=16, patch_size=4)
    config = tiny_llava_config(tiny, (len(TOKENIZER) + 63) // 64 * 64, IMAGE_ID, TOKENIZER.pad_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32).eval()

    def token_losses(input_ids, labels, pixel_values, position_ids=None, attention_mask=None):
        logits = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,  # with a cache, transformers 5 ignores packing and attends across documents
        ).logits
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        return F.pad(losses, (1, 0))  # loss of the token at t, aligned with labels

    with torch.no_grad():
        packed = token_losses(batch["input_ids"], batch["labels"], batch["pixel_values"], batch["position_ids"])
        image_cursor = 0
        for doc in range(len(batch["keys"])):
            where = document_ids(batch) == doc
            row = int(where.any(dim=1).nonzero()[0])
            ids = batch["input_ids"][row][where[row]].unsqueeze(0)
            labels = batch["labels"][row][where[row]].unsqueeze(0)
            n_images = int((ids == IMAGE_ID).sum()) // 16
            pixels = batch["pixel_values"][image_cursor : image_cursor + n_images]
            image_cursor += n_images
            alone = token_losses(ids, labels, pixels, attention_mask=torch.ones_like(ids))
            learned = labels[0] != IGNORE_INDEX
            packed_doc = packed[row][where[row]][learned]
            assert learned.any()
            torch.testing.assert_close(packed_doc.mean(), alone[0][learned].mean(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed_doc, alone[0][learned], rtol=1e-4, atol=1e-4)
        assert image_cursor == batch["pixel_values"].shape[0]


def document_ids(batch) -> torch.Tensor:
    """Each real token's document number over the batch (row-major), -1 on padding: documents start at position 0."""
    real = batch["attention_mask"].bool()
    starts = (batch["position_ids"] == 0) & real
    numbers = torch.cumsum(starts.flatten().long(), dim=0).reshape(starts.shape) - 1
    return torch.where(real, numbers, -1)


def test_collate_pads_and_ignores_first_label_of_each_document():
    spec = TokenSpec(TOKENIZER, IMAGE_ID, max_len=100)
    docs = [
        tokenize_sample(Sample(f"k{i}", "interleaved", [TextSegment("a red circle " * (i + 1), True)]), spec, 0)
        for i in range(3)
    ]
    batch = collate_rows([[docs[0], docs[1]], [docs[2]]], TOKENIZER.pad_token_id, packed=True)
    second_start = len(docs[0])
    assert batch["labels"][0, second_start] == IGNORE_INDEX and batch["position_ids"][0, second_start] == 0
    assert document_ids(batch)[1, len(docs[2]) :].eq(-1).all()


def test_loader_takes_a_visual_token_function_per_sample(shards_pattern):
    """The Matryoshka hook: a function of the sample gives each image its own token count."""

    def scales(sample):
        return [9 if sample.key.endswith(("0", "2", "4", "6", "8")) else 36 for _ in sample.images]

    batch = next(make_loader(shards_pattern, visual_tokens=scales))
    for row, key in enumerate(batch["keys"]):
        expected = 9 if key[-1] in "02468" else 36
        assert int((batch["input_ids"][row] == IMAGE_ID).sum()) == expected
