"""(query, positive) pair shards for contrastive embedding training, and their staged reader.

Pair shard form (WebDataset tar; members grouped by key, every member optional but each side
needs an image or a text):

    KEY.query.jpg       query image (also .png / .webp / .jpeg)
    KEY.query.txt       query text; may hold `<image>` where the image goes (interleaved)
    KEY.positive.jpg    positive image
    KEY.positive.txt    positive text, `<image>` allowed as above
    KEY.instruction.txt instruction placed after the query's image (VLM2Vec style); when absent
                        the reader's default instruction is used for queries with an image
    KEY.label.cls       optional integer class of the query (WebDataset's .cls), for an MRL-E
                        classifier; a batch with any label gets `labels`, -100 where one is missing

A side with an image and no `<image>` in its text has the image first. Each side is tokenised as
`<s> ... </s>`, so last-token pooling reads the hidden state at `</s>`.

    shard list ──► shuffle by (seed, epoch) ──► split by rank ──► split by worker
        ──► read tar, group by key ──► safe decode ──► build pair ──► preprocess images
        ──► tokenize each side (<image> -> N visual tokens) ──► batch + collate (query_*, positive_*)

The reader is the caption loader's stream (data_pipeline/loader.py) up to the decoded sample,
and is resumable the same way: a pure function of (seed, rank, worker, epoch)
with `resume_batches` skipped without decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data_pipeline.collate import ROW_IMAGES, ROW_TOKENS, real_token_mask, right_pad
from data_pipeline.formats import IMAGE_PLACEHOLDER
from data_pipeline.replay_stream import (
    SAFE_IMAGE_EXTENSIONS,
    ReplayStream,
    preprocess_image,
    safe_decode,
)
from data_pipeline.sample_data import write_shape_shards

SIDES = ("query", "positive")
DEFAULT_QUERY_INSTRUCTION = "Represent the image"


@dataclass(frozen=True)
class PairSpec:
    """How a side becomes token ids and pixels."""

    tokenizer: Any
    image_token_id: int
    visual_tokens: int
    max_len: int
    image_size: int
    query_instruction: str = DEFAULT_QUERY_INSTRUCTION


# ── writer ────────────────────────────────────────────────────────────────────────────────────
def write_pair_shards(
    out_dir: str | Path, num_shards: int = 4, samples_per_shard: int = 96, seed: int = 0
) -> list[Path]:
    """Coloured-shape pairs: query = image (+ instruction), positive = its caption text."""

    def image_caption_pair(colour: str, shape: str, jpeg: bytes) -> dict[str, Any]:
        return {"query.jpg": jpeg, "instruction.txt": DEFAULT_QUERY_INSTRUCTION, "positive.txt": f"a {colour} {shape}."}

    return write_shape_shards(out_dir, num_shards, samples_per_shard, seed, "pairs", image_caption_pair, "pairs")


# ── build pair ────────────────────────────────────────────────────────────────────────────────
def side_of(decoded: dict[str, Any], side: str) -> tuple[Image.Image | None, str]:
    image = next((decoded[f"{side}.{ext}"] for ext in SAFE_IMAGE_EXTENSIONS if f"{side}.{ext}" in decoded), None)
    text = decoded.get(f"{side}.txt", "").strip()
    if image is None and not text:
        raise ValueError(
            f"pair sample {decoded.get('__key__')!r} has no {side} (needs {side}.jpg and/or {side}.txt); "
            "see data_pipeline/pairs.py for the pair shard form"
        )
    return image, text


def side_text(image: Image.Image | None, text: str, instruction: str) -> str:
    """The side's text with `<image>` where its image goes, and the instruction after the image."""
    if image is not None and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER + ("\n" + text if text else "")
    if instruction:
        text = text + "\n" + instruction if image is not None else instruction + ": " + text
    return text


# ── tokenize ──────────────────────────────────────────────────────────────────────────────────
def tokenize_side(spec: PairSpec, text: str) -> list[int]:
    """`<s> text </s>` with each `<image>` expanded to the visual tokens; fails if it exceeds max_len."""
    tokenizer = spec.tokenizer
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if i < len(pieces) - 1:
            ids += [spec.image_token_id] * spec.visual_tokens
    ids.append(tokenizer.eos_token_id)
    if len(ids) > spec.max_len:
        raise ValueError(
            f"a pair side takes {len(ids)} tokens (visual tokens included), over data.max_len={spec.max_len}"
        )
    return ids


def encode_side(spec: PairSpec, image: Image.Image | None, text: str, instruction: str = "") -> dict[str, Any]:
    """Token ids and pixels of one side (also the input form of the `embed` API)."""
    full_text = side_text(image, text, instruction)
    return {
        "input_ids": tokenize_side(spec, full_text),
        "images": [image] if image is not None else [],
        "text": full_text,
    }


# ── collate ───────────────────────────────────────────────────────────────────────────────────
def collate_side(
    sides: list[dict[str, Any]], pad_token_id: int, image_size: int, image_processor: Any
) -> dict[str, Any]:
    """Right-padded ids and mask; every image of the side in row order, (0, 3, S, S) when none."""
    lengths = [len(s["input_ids"]) for s in sides]
    images = [preprocess_image(image_processor, image) for s in sides for image in s["images"]]
    pixel_values = torch.stack(images) if images else torch.zeros(0, 3, image_size, image_size)
    return {
        "input_ids": right_pad([s["input_ids"] for s in sides], pad_token_id),
        "attention_mask": real_token_mask(lengths, max(lengths)),
        "pixel_values": pixel_values,
        ROW_TOKENS: lengths,
        ROW_IMAGES: [len(s["images"]) for s in sides],
    }


def collate_pairs(samples: list[dict[str, Any]], spec: PairSpec, image_processor: Any) -> dict[str, Any]:
    """Flat keys `query_*` / `positive_*`, so the trainer's device move sees plain tensors."""
    batch: dict[str, Any] = {"keys": [s["key"] for s in samples]}
    for side in SIDES:
        collated = collate_side(
            [s[side] for s in samples], spec.tokenizer.pad_token_id, spec.image_size, image_processor
        )
        batch.update({f"{side}_{name}": value for name, value in collated.items()})
        batch[f"{side}_texts"] = [s[side]["text"] for s in samples]
    if any("label" in s for s in samples):
        batch["labels"] = torch.tensor([s.get("label", -100) for s in samples], dtype=torch.long)
    return batch


class PairStream(ReplayStream):
    """Endless stream of collated pair batches for one rank (see the module docstring for stages).

    Shard listing, splitting, shuffling and resuming are the caption stream's; a pair sample
    is built, tokenised and collated here. The stream's `text` spec is a `PairSpec`.
    """

    def make_sample(self, group: dict[str, Any]) -> dict[str, Any]:
        decoded = safe_decode(group)
        instruction = decoded.get("instruction.txt", "").strip()
        sample: dict[str, Any] = {"key": decoded["__key__"]}
        for side in SIDES:
            image, text = side_of(decoded, side)
            side_instruction = ""
            if side == "query":  # the sample's own instruction, else the default one for image queries
                side_instruction = instruction or (self.text.query_instruction if image is not None else "")
            sample[side] = encode_side(self.text, image, text, side_instruction)
        if "label.cls" in decoded:
            sample["label"] = int(decoded["label.cls"].decode().strip())
        return sample

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pairs(samples, self.text, self.image_processor)
