"""Shared pieces of the one-process family tests (llava, anyres, qwen2_vl, gemma3): a LoRA task whose adapters
differ, documents and their padded or packed batches, the per-document loss, the one-pass against separate
per-scale gradient check, and a one-image conversation through the tokenizer's template."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.chat_template import ConversationTemplate
from data_pipeline.formats import SampleRules, build_conversation, conversation_messages
from data_pipeline.tokenize import IGNORE_INDEX, TokenSpec, tokenize_sample
from mtrain.config import load_config
from mtrain.model.build import build_model
from mtrain.model.families.qwen3_vl import Qwen3VLFamily
from mtrain.task.registry import build_task

TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat digit is this?"},
    {"from": "gpt", "value": "seven"},
    {"from": "human", "value": "And its colour?"},
    {"from": "gpt", "value": "It is red."},
]

Document = tuple[list[int], list[int], int]  # (input_ids, labels, images)


class WithoutDeepStack(Qwen3VLFamily):
    """Qwen3-VL with its DeepStack sets dropped: what a Qwen2-VL-style wiring would run (the mutation the
    qwen3_vl tests must catch)."""

    def splice_visual(self, model, embeddings, image_positions, visual) -> tuple[torch.Tensor, dict]:
        spliced, _ = super().splice_visual(model, embeddings, image_positions, visual)
        return spliced, {}


def m3_lora_config(preset: str, scales: list[int], *overrides: str):
    """A tiny preset with M3 token scales and dropout-free LoRA, lm_head trained."""
    return load_config(
        None,
        [
            f"model.preset={preset}",
            "matryoshka.tokens.mode=m3",
            f"matryoshka.tokens.scales=[{','.join(map(str, scales))}]",
            "model.lora.enabled=true",
            "model.lora.dropout=0.0",
            "model.freeze.always_train=[lm_head]",
            *overrides,
        ],
    )


def lora_task(cfg):
    """(task, built) of `cfg` with every LoRA B drawn non-zero: B starts at zero, and a distinct delta per
    adapter is what makes the routing show."""
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    task = build_task(cfg, built, rank=0)
    with torch.no_grad():
        for name, param in task.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return task, built


def assert_one_pass_equals_separate_grads(
    task, loss: torch.Tensor, separate: Callable[[], torch.Tensor], grad_rtol: float = 1e-4
) -> None:
    """The one-pass `loss` equals `separate()` (the mean of the separate per-scale losses, run after the one-pass
    backward), and so does every trainable gradient."""
    trainable = [p for p in task.parameters() if p.requires_grad]
    one_pass_grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    separate_loss = separate()
    separate_grads = torch.autograd.grad(separate_loss, trainable, allow_unused=True)
    torch.testing.assert_close(loss, separate_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(one_pass_grads, separate_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=grad_rtol, atol=1e-6)


@contextlib.contextmanager
def rows_at_scale(task, rows: int, scale: int) -> Iterator[None]:
    """Inside: all `rows` rows route to `scale`'s LoRA adapters, as the task routes a scale's rows (a stock
    forward of the wrapped model sets no routing itself); none without scale adapters."""
    if task.routing is not None:
        task.routing.set_rows(torch.full((rows,), scale))
    try:
        yield
    finally:
        if task.routing is not None:
            task.routing.clear()


def text_ids(built, text: str) -> list[int]:
    return built.tokenizer(text, add_special_tokens=False).input_ids


def documents(built, turn_start: str, turn_end: str, image_start: str, image_end: str) -> list[Document]:
    """Three documents in a family's own markers: one image, two images, one image and a longer answer."""
    image = text_ids(built, image_start) + [built.image_token_id] * built.visual_tokens + text_ids(built, image_end)
    docs = []
    for prompt, answer, images in [
        ("user\n", "a red circle.", 1),
        ("two\n", "a blue square.", 2),
        ("", "a green cross shape.", 1),
    ]:
        prefix = text_ids(built, turn_start + prompt) + image * images
        learned = text_ids(built, answer + turn_end)
        docs.append((prefix + learned, [IGNORE_INDEX] * len(prefix) + learned, images))
    return docs


def processed_images(process: Callable[[Image.Image], torch.Tensor], images: int) -> torch.Tensor:
    """`images` images of other colours and shapes (the processor resizes them), each through `process`."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    shapes = [(50, 40), (32, 32), (20, 64), (64, 48)]
    return torch.cat([process(Image.new("RGB", shapes[i % 4], colours[i % 4])) for i in range(images)])


def padded_batch(built, docs: list[Document], pixel_values: torch.Tensor) -> dict:
    """One document a row, padded to the longest."""
    width = max(len(ids) for ids, _, _ in docs)
    pad = built.tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in docs]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels, _ in docs]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in docs]),
        "pixel_values": pixel_values,
    }


def packed_batch(docs: list[Document], pixel_values: torch.Tensor) -> dict:
    """All documents in one row, each with positions from 0."""
    row = [token for ids, _, _ in docs for token in ids]
    return {
        "input_ids": torch.tensor([row]),
        # The first label of every document is ignored, as the packer does.
        "labels": torch.tensor([[label for _, labels, _ in docs for label in [IGNORE_INDEX, *labels[1:]]]]),
        "attention_mask": torch.ones(1, len(row), dtype=torch.long),
        "position_ids": torch.tensor([[p for ids, _, _ in docs for p in range(len(ids))]]),
        "pixel_values": pixel_values,
    }


def shrink_runs_per_image(batch: dict, image_token_id: int, full: list[int], kept: list[int], pad: int = 0):
    """(input_ids, labels, attention_mask) with each image's run of `full[i]` tokens cut to its first `kept[i]`
    (images in row-major order), re-padded right: the rows a separate per-scale forward runs when every image
    has its own count."""
    counts = iter(zip(full, kept, strict=True))
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        out, left, keep = [], 0, 0
        for token, label, real in zip(ids.tolist(), labels.tolist(), mask.tolist(), strict=True):
            if not real:
                continue
            if token == image_token_id:
                if left == 0:
                    left, keep = next(counts)
                left, keep = left - 1, keep - 1
                if keep < 0:
                    continue
            out.append((token, label))
        rows.append(out)
    width = max(map(len, rows))
    ids = torch.tensor([[t for t, _ in r] + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([[x for _, x in r] + [IGNORE_INDEX] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, labels, mask


def document_losses(task, batch, scale: int) -> list[torch.Tensor]:
    """Each document's summed next-token loss at `scale`, in input order, whatever its row."""
    rows = batch["input_ids"].shape[0]
    logits, layout = task.run(batch, [scale] * rows)
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), layout.labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    starts = layout.position_ids == 0
    out = []
    for row in range(layout.input_ids.shape[0]):
        columns = starts[row].nonzero().flatten().tolist() + [layout.input_ids.shape[1]]
        for start, end in zip(columns[:-1], columns[1:], strict=True):
            if layout.token_scales[row, start] > 0:
                out.append(losses[row, start : end - 1].sum())  # the targets of tokens start+1 .. end-1
    return out


def conversation(tokenizer, turns):
    """`turns` with one red 32x32 PNG, built through the tokenizer's own chat template."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    rules = SampleRules(chat=ConversationTemplate.from_tokenizer(tokenizer))
    return build_conversation("sample", {"png": buffer.getvalue()}, {"conversations": turns}, rules)


def assert_packed_equals_unpacked_per_document(task, packed: dict, unpacked: dict, scales: list[int]) -> None:
    """At every scale, each of the three documents packed in one row has the summed loss it has alone in its
    padded row."""
    padded_tokens = dataclasses.replace(task.tokens, layout="padded")
    for scale in scales:
        together = document_losses(task, packed, scale)
        task.tokens, layout_tokens = padded_tokens, task.tokens
        try:
            alone = document_losses(task, unpacked, scale)
        finally:
            task.tokens = layout_tokens
        assert len(together) == len(alone) == 3
        for got, want in zip(together, alone, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def assert_text_only_batch_reaches_vision_at_zero_weight(task, ids: list[int], vision_part: str) -> None:
    """ZeRO-3 lockstep: a micro-batch without images still runs the vision path (parameters named with
    `vision_part`), so each trainable one gets a gradient, and it is exactly zero."""
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))}
    loss, _ = task(batch)
    loss.backward()
    vision = [p for name, p in task.named_parameters() if vision_part in name and p.requires_grad]
    assert vision and all(p.grad is not None and not p.grad.any() for p in vision)  # reached, exactly zero
    assert torch.isfinite(loss)


def assert_template_equals_apply_chat_template(
    tokenizer, image_token: str, image_start: str, image_end: str, learned_text: str
) -> list[int]:
    """The conversation of TWO_TURNS through the tokenizer's template: with one visual token an image, the ids
    and assistant mask equal `apply_chat_template`'s and the learned tokens decode to `learned_text`; with
    sixteen, the image's run sits between `image_start` and `image_end`. Returns the one-token ids."""
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    messages = conversation_messages(TWO_TURNS)
    tokens = tokenize_sample(conversation(tokenizer, TWO_TURNS), TokenSpec(tokenizer, image_token_id, 512), 1)
    reference = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert tokens.input_ids == reference["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in tokens.labels] == reference["assistant_masks"]
    learned = [i for i, label in zip(tokens.input_ids, tokens.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == learned_text
    expanded = tokenize_sample(conversation(tokenizer, TWO_TURNS), TokenSpec(tokenizer, image_token_id, 512), 16)
    start = expanded.input_ids.index(tokenizer.convert_tokens_to_ids(image_start))
    assert expanded.input_ids[start + 1 : start + 17] == [image_token_id] * 16
    assert expanded.input_ids[start + 17] == tokenizer.convert_tokens_to_ids(image_end)
    return tokens.input_ids


def export_and_reload(task, built, folder: Path):
    """The task's model merged and saved as a Hugging Face folder, then reloaded by stock transformers:
    (merged model, stock model, stock tokenizer, stock image processor, a one-image prompt in the saved template)."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from mtrain.checkpoint.export import _save_hf_folder

    model = task.model.merge_and_unload().eval()
    _save_hf_folder(model, built, folder)
    stock = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return model, stock, tokenizer, processor, prompt
