"""Tokenization with visual-token expansion, and label masking.

`tokenize_sample(sample, spec, visual_tokens_per_image)` is the hook the Matryoshka work calls:
it takes the number of visual tokens for each image of the sample (one int for all, or one per
image), so a per-sample or per-image scale changes only that argument.

Image markers: a model family may write text right around every image's tokens (Qwen2-VL's
`<|vision_start|>` ... `<|vision_end|>`, `TokenSpec.image_start_ids` / `image_end_ids`). Captions and
interleaved documents get them here, as the family's processor writes them; a conversation rendered by
the model's chat template has them already, from the template.

Masking: image tokens and their markers, BOS, non-learned text (prompts, user turns) and padding get
IGNORE_INDEX; learned text (captions, document text, assistant turns) and the final EOS are
learned. A conversation rendered by the model's chat template (`Sample.rendered`) brings its own
BOS and end-of-turn tokens, learned with its assistant turns; nothing is added to it. A sample longer
than `max_len` is cut, but never inside an image's tokens or between them and their markers: the cut
moves to before that image (and its start marker), and the image is dropped with them. A conversation is cut after its last
assistant turn that fits whole (then closed with EOS); only when not even the first one fits is
it cut inside that turn. A sample left with no learned token raises `SampleFault("nothing_learned")`:
it would only add a NaN or zero to the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.formats import ImageSegment, Sample, SampleFault, TextSegment

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenSpec:
    tokenizer: Any
    image_token_id: int
    max_len: int
    # Ids written right before and after every image's visual tokens where no chat template wrote them
    # (captions, interleaved documents): the model family's image markers; none for LLaVA.
    image_start_ids: tuple[int, ...] = ()
    image_end_ids: tuple[int, ...] = ()

    @classmethod
    def with_markers(cls, tokenizer: Any, image_token_id: int, max_len: int, markers: tuple[str, str]) -> TokenSpec:
        """A spec whose images get `markers` (start text, end text; "" for none) around their tokens."""
        start, end = (tuple(encode_text(tokenizer, text)) if text else () for text in markers)
        return cls(tokenizer, image_token_id, max_len, start, end)


@dataclass
class TokenizedSample:
    key: str
    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]  # [start, end) of each kept image's tokens
    images: list[ImageSegment]  # the kept images, in order
    ref: tuple[int, int, int] | None = None  # (source, epoch, position) for the loader's state
    pixel_values: list[Any] = field(default_factory=list)
    # (height, width) of each kept image: from its header when planned (images of their own counts), then as decoded
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    location: Any = None  # (shard url, tar group): where the loader reads the image bytes from
    # (t, h, w) in patches of each decoded image whose processor gives images their own grids (Qwen's native
    # resolution); empty otherwise.
    image_grid_thw: list[list[int]] = field(default_factory=list)

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
    # A sample rendered by a chat template carries the template's own BOS and end-of-turn tokens.
    bos = None if sample.rendered else tokenizer.bos_token_id
    eos = None if sample.rendered else tokenizer.eos_token_id
    input_ids: list[int] = [bos] if bos is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    spans: list[tuple[int, int]] = []
    image_index = 0
    learned_any = False
    turn_ends: list[int] = []  # token counts at which an assistant turn ends
    for index, segment in enumerate(sample.segments):
        if isinstance(segment, TextSegment):
            ids = encode_text(tokenizer, segment.text)
            input_ids += ids
            labels += ids if segment.learned else [IGNORE_INDEX] * len(ids)
            learned_any |= segment.learned and bool(ids)
        else:
            # A chat template wrote the markers itself; anything else gets them here. Unlearned, as the image.
            start_ids, end_ids = ((), ()) if sample.rendered else (spec.image_start_ids, spec.image_end_ids)
            input_ids += start_ids
            start = len(input_ids)
            input_ids += [spec.image_token_id] * counts[image_index]
            spans.append((start, len(input_ids)))
            input_ids += end_ids
            labels += [IGNORE_INDEX] * (len(start_ids) + counts[image_index] + len(end_ids))
            image_index += 1
        if index + 1 in sample.turn_ends:
            turn_ends.append(len(input_ids))
    if eos is not None:
        input_ids.append(eos)
        labels.append(eos if learned_any else IGNORE_INDEX)
    tokens = TokenizedSample(sample.key, input_ids, labels, spans, list(images))
    needed = len(tokens)
    tokens = truncate(tokens, spec.max_len, turn_ends, eos, (spec.image_start_ids, spec.image_end_ids))
    if all(label == IGNORE_INDEX for label in tokens.labels):
        raise SampleFault(
            "nothing_learned",
            f"{sample.key} ({sample.form}) keeps no learned token within data.max_len={spec.max_len}; "
            f"it needs {needed} tokens" + (f" [from {sample.source}]" if sample.source else ""),
            needed=needed,
        )
    return tokens


def check_image_runs(tokens: TokenizedSample, planned_sizes: Sequence[tuple[int, int]], counts: Sequence[int]) -> None:
    """Check, once the images are decoded, what tokenization planned from their headers (images of their own
    counts: Qwen's native resolution, anyres sizes): each image has its header's (height, width), and each run of
    image tokens the decoded image's count. Both hold unless a processor resizes otherwise than the count rule."""
    runs = [end - start for start, end in tokens.image_spans]
    if list(planned_sizes) != tokens.image_sizes or runs != list(counts):
        raise ValueError(
            f"{tokens.key}: its images were planned at sizes {list(planned_sizes)} with {runs} visual tokens, and "
            f"decode to sizes {tokens.image_sizes} with {list(counts)}; the image processor and the data's count rule "
            "(mtrain.engine.data.image_token_counter) must resize alike"
        )


def truncate(
    tokens: TokenizedSample,
    max_len: int,
    turn_ends: Sequence[int] = (),
    eos: int | None = None,
    markers: tuple[Sequence[int], Sequence[int]] = ((), ()),
) -> TokenizedSample:
    """Cut to max_len: after the last whole assistant turn that fits (then EOS), else at max_len
    moved before any image (with its `markers`: start ids, end ids) the cut would split."""
    if len(tokens) <= max_len:
        return tokens
    room = max_len - (eos is not None)
    whole_turns = [end for end in turn_ends if end <= room]
    blocks = marked_spans(tokens, *markers)
    if whole_turns:
        cut = whole_turns[-1]
        tail = [eos] if eos is not None else []
        tokens.input_ids = tokens.input_ids[:cut] + tail
        tokens.labels = tokens.labels[:cut] + tail
    else:
        cut = max_len
        for start, end in blocks:
            if start < cut < end:
                cut = start
        tokens.input_ids = tokens.input_ids[:cut]
        tokens.labels = tokens.labels[:cut]
    kept = [i for i, (_, end) in enumerate(blocks) if end <= cut]
    tokens.image_spans = [tokens.image_spans[i] for i in kept]
    tokens.images = [tokens.images[i] for i in kept]
    return tokens


def marked_spans(tokens: TokenizedSample, start_ids: Sequence[int], end_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Each image's [start, end), widened over the markers right around it (written by tokenization or by a
    chat template), so that a cut keeps or drops an image together with its markers."""
    ids, before, after = tokens.input_ids, list(start_ids), list(end_ids)
    blocks = []
    for start, end in tokens.image_spans:
        if before and start >= len(before) and ids[start - len(before) : start] == before:
            start -= len(before)
        if after and ids[end : end + len(after)] == after:
            end += len(after)
        blocks.append((start, end))
    return blocks
