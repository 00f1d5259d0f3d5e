"""Shared pieces of the one-process family tests (llava, anyres, qwen2_vl, gemma3): a LoRA task whose adapters
differ, documents and their padded or packed batches, the per-document loss, the one-pass against separate
per-scale gradient check, and a one-image conversation through the tokenizer's template."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.chat_template import ConversationTemplate
from data_pipeline.formats import SampleRules, build_conversation
from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config import load_config
from mtrain.model.build import build_model
from mtrain.task.registry import build_task

TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat digit is this?"},
    {"from": "gpt", "value": "seven"},
    {"from": "human", "value": "And its colour?"},
    {"from": "gpt", "value": "It is red."},
]

Document = tuple[list[int], list[int], int]  # (input_ids, labels, images)


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
