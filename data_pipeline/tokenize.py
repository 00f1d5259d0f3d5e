"""Tokenization with visual-token expansion, and label masking.

`tokenize_sample(sample, spec, visual_tokens_per_image)` is the hook the Matryoshka work calls:
it takes the number of visual tokens for each image of the sample (one int for all, or one per
image), so a per-sample or per-image scale changes only that argument.

Masking: image tokens, BOS, non-learned text (prompts, user turns) and padding get
IGNORE_INDEX; learned text (captions, document text, assistant turns) and the final EOS are
learned. A sample longer than `max_len` is cut, but never inside an image's tokens: the cut moves
to before that image, and the image is dropped with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.formats import ImageSegment, Sample, TextSegment

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenSpec:
    tokenizer: Any
    image_token_id: int
    max_len: int


@dataclass
class TokenizedSample:
    key: str
    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]  # [start, end) of each kept image's tokens
    images: list[ImageSegment]  # the kept images, in order
    ref: tuple[int, int, int] | None = None  # (source, epoch, position) for the loader's state
    pixel_values: list[Any] = field(default_factory=list)
    location: Any = None  # (shard url, tar group): where the loader reads the image bytes from

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids without special tokens; the Rust tokenizer directly when there is one (10x less overhead)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_sample(sample: Sample, spec: TokenSpec, visual_tokens_per_image: int | Sequence[int]) -> TokenizedSample:
    """input_ids and labels of one sample, each image expanded to its number of visual tokens."""
    images = sample.images
    counts = (
        [visual_tokens_per_image] * len(images)
        if isinstance(visual_tokens_per_image, int)
        else list(visual_tokens_per_image)
    )
    if len(counts) != len(images):
        raise ValueError(f"{sample.key}: {len(counts)} visual-token counts for {len(images)} images")
    tokenizer = spec.tokenizer
    input_ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    spans: list[tuple[int, int]] = []
    image_index = 0
    learned_any = False
    for segment in sample.segments:
        if isinstance(segment, TextSegment):
            ids = encode_text(tokenizer, segment.text)
            input_ids += ids
            labels += ids if segment.learned else [IGNORE_INDEX] * len(ids)
            learned_any |= segment.learned and bool(ids)
        else:
            start = len(input_ids)
            input_ids += [spec.image_token_id] * counts[image_index]
            labels += [IGNORE_INDEX] * counts[image_index]
            spans.append((start, len(input_ids)))
            image_index += 1
    if tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if learned_any else IGNORE_INDEX)
    return truncate(TokenizedSample(sample.key, input_ids, labels, spans, list(images)), spec.max_len)


def truncate(tokens: TokenizedSample, max_len: int) -> TokenizedSample:
    """Cut to max_len, moving the cut before any image it would split."""
    if len(tokens) <= max_len:
        return tokens
    cut = max_len
    for start, end in tokens.image_spans:
        if start < cut < end:
            cut = start
    kept = [i for i, (_, end) in enumerate(tokens.image_spans) if end <= cut]
    tokens.input_ids = tokens.input_ids[:cut]
    tokens.labels = tokens.labels[:cut]
    tokens.image_spans = [tokens.image_spans[i] for i in kept]
    tokens.images = [tokens.images[i] for i in kept]
    return tokens
