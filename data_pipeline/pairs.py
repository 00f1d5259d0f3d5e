"""(query, positive[, negative]) pair shards for contrastive embedding training.

Pair shard form (WebDataset tar; members grouped by key, every member optional but the query and
the positive each need an image or a text):

    KEY.query.jpg       query image (also .png / .webp / .jpeg)
    KEY.query.txt       query text; may hold `<image>` where the image goes (interleaved)
    KEY.positive.jpg    positive image
    KEY.positive.txt    positive text, `<image>` allowed as above
    KEY.negative.jpg    hard negative image (optional, VLM2Vec / MMEB style)
    KEY.negative.txt    hard negative text, `<image>` allowed as above
    KEY.instruction.txt instruction placed after the query's image (VLM2Vec style); when absent
                        the reader's default instruction is used for queries with an image
    KEY.label.cls       optional integer class of the query (WebDataset's .cls), for an MRL-E
                        classifier; a batch with any label gets `labels`, IGNORE_INDEX where one is missing

A side with an image and no `<image>` in its text has the image first. Each side is tokenised as
`<s> ... </s>`, so last-token pooling reads the hidden state at `</s>`.

Pairs take the staged loader's road (data_pipeline/loader.py): shard lists and mixture, shuffle,
rank split, bad-data skipping, exact resume at any world size. Only two stages are theirs:
`PairForm.tokenize` builds and tokenises the sides of one tar group (stage 6-8), and
`PairForm.collate` makes the batch (stage 11), with flat keys `query_*`, `positive_*` and
`negative_*`. A sample without a negative adds no negative row; `negative_rows` says which do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data_pipeline.collate import IMAGE_GRID_THW, IMAGE_SIZES, ROW_IMAGES, ROW_TOKENS, real_token_mask, right_pad
from data_pipeline.formats import IMAGE_EXTENSIONS, IMAGE_PLACEHOLDER, ImageSegment, SampleFault, decode_text
from data_pipeline.images import ImagePreprocessor
from data_pipeline.sample_data import write_shape_shards
from data_pipeline.tokenize import IGNORE_INDEX

SIDES = ("query", "positive")
NEGATIVE = "negative"
NEGATIVE_ROWS = "negative_rows"  # per sample: whether it has a negative row in the `negative_*` tensors
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
    # The model family's ids right around every image's tokens (TokenSpec's; Qwen's vision markers).
    image_start_ids: tuple[int, ...] = ()
    image_end_ids: tuple[int, ...] = ()
    # Their plain text outside those ids (TokenSpec's; Gemma 3's "\n\n"), tokenized with the text beside it.
    image_start_text: str = ""
    image_end_text: str = ""
    # An image's own visual-token count from its (height, width), read from its header when planning (Qwen's
    # native resolution); None: every image has `visual_tokens`.
    image_tokens: Callable[[tuple[int, int]], int] | None = None


# ── writer ────────────────────────────────────────────────────────────────────────────────────
def write_pair_shards(
    out_dir: str | Path, num_shards: int = 4, samples_per_shard: int = 96, seed: int = 0
) -> list[Path]:
    """Coloured-shape pairs: query = image (+ instruction), positive = its caption text."""

    def image_caption_pair(colour: str, shape: str, jpeg: bytes) -> dict[str, Any]:
        return {"query.jpg": jpeg, "instruction.txt": DEFAULT_QUERY_INSTRUCTION, "positive.txt": f"a {colour} {shape}."}

    return write_shape_shards(out_dir, num_shards, samples_per_shard, seed, "pairs", image_caption_pair, "pairs")


# ── build pair ────────────────────────────────────────────────────────────────────────────────
def side_text(image: object | None, text: str, instruction: str) -> str:
    """The side's text with `<image>` where its image goes, and the instruction after the image."""
    if image is not None and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER + ("\n" + text if text else "")
    if instruction:
        text = text + "\n" + instruction if image is not None else instruction + ": " + text
    return text


def side_members(key: str, members: dict[str, bytes], side: str) -> tuple[str | None, str]:
    """(image member or None, stripped text) of one side of a tar group."""
    image = next((f"{side}.{ext}" for ext in IMAGE_EXTENSIONS if f"{side}.{ext}" in members), None)
    text = decode_text(members[f"{side}.txt"], key, f"{side}.txt").strip() if f"{side}.txt" in members else ""
    return image, text


# ── tokenize ──────────────────────────────────────────────────────────────────────────────────
def side_ids(spec: PairSpec, text: str, counts: list[int] | None = None) -> list[int]:
    """`<s> text </s>` with each `<image>` expanded to the visual tokens between the family's image markers:
    `counts[i]` for the i-th (images of their own counts), else `spec.visual_tokens` (no length check)."""
    tokenizer = spec.tokenizer
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        # The markers' plain text joins the text between the images, as the family's processor tokenizes it.
        before = spec.image_end_text if i > 0 else ""
        after = spec.image_start_text if i < len(pieces) - 1 else ""
        if before or piece or after:
            ids += tokenizer(before + piece + after, add_special_tokens=False)["input_ids"]
        if i < len(pieces) - 1:
            count = counts[i] if counts is not None else spec.visual_tokens
            ids += [*spec.image_start_ids, *[spec.image_token_id] * count, *spec.image_end_ids]
    ids.append(tokenizer.eos_token_id)
    return ids


def tokenize_side(spec: PairSpec, text: str, counts: list[int] | None = None) -> list[int]:
    """`<s> text </s>` with each `<image>` expanded (to `counts` as `side_ids`); fails if it exceeds max_len."""
    ids = side_ids(spec, text, counts)
    if len(ids) > spec.max_len:
        raise ValueError(
            f"a pair side takes {len(ids)} tokens (visual tokens included), over data.max_len={spec.max_len}"
        )
    return ids


def encode_side(spec: PairSpec, image: Image.Image | None, text: str, instruction: str = "") -> dict[str, Any]:
    """Token ids and pixels of one side (also the input form of the `embed` API)."""
    full_text = side_text(image, text, instruction)
    counts = None
    if image is not None and spec.image_tokens is not None:  # native resolution: the image's own count
        counts = [spec.image_tokens((image.height, image.width))]
    return {
        "input_ids": tokenize_side(spec, full_text, counts),
        "images": [image] if image is not None else [],
        "text": full_text,
    }


@dataclass
class PlannedSide:
    input_ids: list[int]
    text: str
    images: list[ImageSegment]  # members only; the loader decodes them in the worker that owns the batch


@dataclass
class PairDoc:
    """One planned pair: what the loader's planner and materializer need of a document."""

    key: str
    sides: dict[str, PlannedSide]  # query, positive, and negative when the sample has one
    ref: tuple[int, int, int] | None = None
    label: int | None = None  # the query's class (KEY.label.cls), for an MRL-E classifier
    pixel_values: list[Any] = field(default_factory=list)  # prepared pixels of `images`, in order
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of `images`, in order
    location: Any = None
    # (t, h, w) in patches of `images`, in order, where images have their own grids (Qwen's native resolution)
    image_grid_thw: list[list[int]] = field(default_factory=list)

    @property
    def images(self) -> list[ImageSegment]:
        return [image for side in self.sides.values() for image in side.images]

    def __len__(self) -> int:
        return max(len(side.input_ids) for side in self.sides.values())


# ── collate ───────────────────────────────────────────────────────────────────────────────────
def collate_prepared(
    rows: list[list[int]], pixels: list[list[Any]], pad_token_id: int, image_size: int, stack: Callable[[list], Any]
) -> dict[str, Any]:
    """Right-padded ids and mask; every image of the side in row order, (0, 3, S, S) when none."""
    lengths = [len(ids) for ids in rows]
    flat = [p for row in pixels for p in row]
    width = max(lengths, default=1)
    return {
        "input_ids": right_pad(rows, pad_token_id, width) if rows else torch.zeros(0, width, dtype=torch.long),
        "attention_mask": real_token_mask(lengths, width) if rows else torch.zeros(0, width, dtype=torch.long),
        "pixel_values": stack(flat) if flat else torch.zeros(0, 3, image_size, image_size),
        ROW_TOKENS: lengths,
        ROW_IMAGES: [len(row) for row in pixels],
    }


def collate_side(
    sides: list[dict[str, Any]], pad_token_id: int, image_size: int, image_processor: Any
) -> dict[str, Any]:
    """`encode_side` outputs (PIL images) collated: the `embed` API's batch, with each image's (height, width)."""
    preprocess = ImagePreprocessor(image_processor)
    prepared = [[preprocess.prepare_with_grid(image) for image in s["images"]] for s in sides]
    pixels = [[pixel for pixel, _ in row] for row in prepared]
    batch = collate_prepared([s["input_ids"] for s in sides], pixels, pad_token_id, image_size, preprocess.stack)
    batch[IMAGE_SIZES] = [(image.height, image.width) for s in sides for image in s["images"]]
    if preprocess.variable_patches:  # each image's own grid (Qwen's native resolution)
        batch[IMAGE_GRID_THW] = [grid for row in prepared for _, grid in row]
    return batch


def collate_pairs(samples: list[dict[str, Any]], spec: PairSpec, image_processor: Any) -> dict[str, Any]:
    """`encode_side` pairs collated: flat keys `query_*` / `positive_*`, as the loader makes them."""
    batch: dict[str, Any] = {"keys": [s["key"] for s in samples]}
    for side in SIDES:
        collated = collate_side(
            [s[side] for s in samples], spec.tokenizer.pad_token_id, spec.image_size, image_processor
        )
        batch.update({f"{side}_{name}": value for name, value in collated.items()})
        batch[f"{side}_texts"] = [s[side]["text"] for s in samples]
    if any("label" in s for s in samples):
        batch["labels"] = torch.tensor([s.get("label", IGNORE_INDEX) for s in samples], dtype=torch.long)
    return batch


class PairForm:
    """The pair-specific stages of the staged loader: build and tokenise a pair, collate pairs."""

    packable = False

    def __init__(self, spec: PairSpec) -> None:
        self.spec = spec

    def tokenize(
        self, key: str, members: dict[str, bytes], image_size: Callable[[str], tuple[int, int]] | None = None
    ) -> PairDoc:
        """The sides of one tar group (text members read, images present as b""); raises SampleFault. Each image
        has its own count from its header's size (`image_size`) where the spec counts by size, else
        `spec.visual_tokens`."""
        instruction = (
            decode_text(members["instruction.txt"], key, "instruction.txt").strip()
            if "instruction.txt" in members
            else ""
        )
        sides: dict[str, PlannedSide] = {}
        for side in (*SIDES, NEGATIVE):
            image, text = side_members(key, members, side)
            if image is None and not text:
                if side == NEGATIVE:
                    continue  # negatives are optional
                raise SampleFault(  # the reason `mtrain data validate` gives it too
                    "missing_image",
                    f"pair sample {key!r} has no {side} (needs {side}.jpg and/or {side}.txt); "
                    "see data_pipeline/pairs.py for the pair shard form",
                )
            side_instruction = ""
            if side == "query":  # the sample's own instruction, else the default one for image queries
                side_instruction = instruction or (self.spec.query_instruction if image is not None else "")
            full_text = side_text(image, text, side_instruction)
            counts = None
            if image is not None and self.spec.image_tokens is not None and image_size is not None:
                counts = [self.spec.image_tokens(image_size(image))]
            ids = side_ids(self.spec, full_text, counts)
            if len(ids) > self.spec.max_len:  # its </s>, where pooling reads, would be cut off
                raise SampleFault(
                    "nothing_learned",
                    f"{key}: its {side} takes {len(ids)} tokens (visual tokens included), "
                    f"over data.max_len={self.spec.max_len}",
                    needed=len(ids),
                )
            sides[side] = PlannedSide(ids, full_text, [ImageSegment(image)] if image else [])
        return PairDoc(key, sides, label=pair_label(key, members))

    def collate(self, rows: list[list[PairDoc]], stack: Callable[[list], Any]) -> dict[str, Any]:
        """Flat keys `query_*` / `positive_*` / `negative_*` (zero negative rows when none has one)."""
        docs = [doc for row in rows for doc in row]
        batch: dict[str, Any] = {"keys": [doc.key for doc in docs]}
        for side in (*SIDES, NEGATIVE):
            with_side = [doc for doc in docs if side in doc.sides]
            pixels = [side_pixels(doc, side) for doc in with_side]
            collated = collate_prepared(
                [doc.sides[side].input_ids for doc in with_side],
                pixels,
                self.spec.tokenizer.pad_token_id,
                self.spec.image_size,
                stack,
            )
            batch.update({f"{side}_{name}": value for name, value in collated.items()})
            batch[f"{side}_texts"] = [doc.sides[side].text for doc in with_side]
            # Each image's (height, width), which anyres models crop by (LLaVA-NeXT/OneVision).
            batch[f"{side}_{IMAGE_SIZES}"] = [size for doc in with_side for size in side_image_sizes(doc, side)]
            if any(doc.image_grid_thw for doc in docs):  # images of their own grids (Qwen's native resolution)
                grids = [side_slice(doc, side, doc.image_grid_thw) for doc in with_side]
                batch[f"{side}_{IMAGE_GRID_THW}"] = [grid for doc_grids in grids for grid in doc_grids]
        batch[NEGATIVE_ROWS] = [NEGATIVE in doc.sides for doc in docs]
        if any(doc.label is not None for doc in docs):
            labels = [IGNORE_INDEX if doc.label is None else doc.label for doc in docs]
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


def pair_label(key: str, members: dict[str, bytes]) -> int | None:
    """The query's class from `KEY.label.cls` (MRL-E classifier), None when the sample has none."""
    if "label.cls" not in members:
        return None
    raw = decode_text(members["label.cls"], key, "label.cls").strip()
    try:
        return int(raw)
    except ValueError:
        raise SampleFault("malformed_json", f"{key}.label.cls holds {raw!r}, not an integer class") from None


def side_image_sizes(doc: PairDoc, side: str) -> list[tuple[int, int]]:
    """The (height, width) of each image of one side of a materialized pair, as `side_pixels` orders them."""
    return side_slice(doc, side, doc.image_sizes)


def side_pixels(doc: PairDoc, side: str) -> list[Any]:
    """The prepared pixels of one side of a materialized pair (doc.pixel_values follow doc.images)."""
    return side_slice(doc, side, doc.pixel_values)


def side_slice(doc: PairDoc, side: str, per_image: list[Any]) -> list[Any]:
    """The entries of `per_image` (one per image of the pair, sides in order) that belong to `side`."""
    start = 0
    for name, planned in doc.sides.items():
        if name == side:
            return per_image[start : start + len(planned.images)]
        start += len(planned.images)
    return []
