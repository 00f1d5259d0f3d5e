"""Tokenization with visual-token expansion, and label masking.

`tokenize_sample(sample, spec, visual_tokens_per_image)` is the hook the Matryoshka work calls:
it takes the number of visual tokens for each image of the sample (one int for all, or one per
image), so a per-sample or per-image scale changes only that argument.

Image markers: a model family may write text right around every image's tokens (Qwen2-VL's
`<|vision_start|>` ... `<|vision_end|>`, `TokenSpec.image_start_ids` / `image_end_ids`; Gemma 3's
`\n\n<start_of_image>` ... `<end_of_image>\n\n`). Captions and interleaved documents get them here, as
the family's processor writes them; a conversation rendered by the model's chat template has them
already, from the template. A processor tokenizes its whole prompt at once, so a marker's plain text
(Gemma 3's `\n\n`, `TokenSpec.image_start_text` / `image_end_text`) is tokenized together with the text
next to it, which can merge with it into other tokens than either alone; its special tokens split the
text, so they are ids of their own. A token is learned when it holds any character of learned text.

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

import re
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
    # Plain text before `image_start_ids` and after `image_end_ids` (Gemma 3's "\n\n"), tokenized together
    # with the neighbouring text, as the family's processor tokenizes its prompt.
    image_start_text: str = ""
    image_end_text: str = ""

    @classmethod
    def with_markers(cls, tokenizer: Any, image_token_id: int, max_len: int, markers: tuple[str, str]) -> TokenSpec:
        """A spec whose images get `markers` (start text, end text; "" for none) around their tokens: each
        marker's special tokens as ids, its plain text outside them (`split_marker`) left to join the text."""
        start_text, start = split_marker(tokenizer, markers[0], before=True)
        end_text, end = split_marker(tokenizer, markers[1], before=False)
        return cls(tokenizer, image_token_id, max_len, start, end, start_text, end_text)

    @property
    def loose_markers(self) -> bool:
        """Whether a marker has plain text that joins the neighbouring text."""
        return bool(self.image_start_text or self.image_end_text)


def split_marker(tokenizer: Any, marker: str, before: bool) -> tuple[str, tuple[int, ...]]:
    """(plain text, ids) of an image marker: the ids of its span of the tokenizer's added (special) tokens, and
    the plain text outside that span, before it (`before`: a start marker) or after it (an end marker); all of
    a marker without added tokens is plain text."""
    added = getattr(tokenizer, "get_added_vocab", dict)()
    found = [(match.start(), match.end()) for token in added for match in re.finditer(re.escape(token), marker)]
    if not marker or not found:
        return marker, ()
    start, end = min(found)[0], max(end for _, end in found)
    ids = tuple(encode_text(tokenizer, marker[start:end]))
    return (marker[:start], ids) if before else (marker[end:], ids)


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


def encode_joined(tokenizer: Any, before: str, text: str, after: str) -> tuple[list[int], list[bool]]:
    """Ids of `before + text + after` tokenized as one string, and whether each token holds any character of
    `text` (the others hold only marker text)."""
    whole = before + text + after
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encoding = backend.encode(whole, add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
    else:
        encoding = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    first, last = len(before), len(before) + len(text)
    return list(ids), [start < last and end > first for start, end in offsets]


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
    # A chat template wrote the markers itself; anything else gets them here. Unlearned, as the image.
    marked = not sample.rendered
    loose = marked and spec.loose_markers
    segments = sample.segments
    owed = ""  # the last image's end-marker text, not yet tokenized with the text after it
    for index, segment in enumerate(segments):
        image_next = index + 1 < len(segments) and isinstance(segments[index + 1], ImageSegment)
        if isinstance(segment, TextSegment):
            after = spec.image_start_text if loose and image_next else ""
            if owed or after:
                ids, holds_text = encode_joined(tokenizer, owed, segment.text, after)
                learned = [segment.learned and holds for holds in holds_text]
                labels += [i if keep else IGNORE_INDEX for i, keep in zip(ids, learned, strict=True)]
                learned_any |= any(learned)
                owed = ""
            else:
                ids = encode_text(tokenizer, segment.text)
                labels += ids if segment.learned else [IGNORE_INDEX] * len(ids)
                learned_any |= segment.learned and bool(ids)
            input_ids += ids
        else:
            if loose and (index == 0 or isinstance(segments[index - 1], ImageSegment)):
                ids = encode_text(tokenizer, owed + spec.image_start_text)  # no text before: the markers' own
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids)
            owed = spec.image_end_text if loose else ""
            start_ids, end_ids = (spec.image_start_ids, spec.image_end_ids) if marked else ((), ())
            input_ids += start_ids
            start = len(input_ids)
            input_ids += [spec.image_token_id] * counts[image_index]
            spans.append((start, len(input_ids)))
            input_ids += end_ids
            labels += [IGNORE_INDEX] * (len(start_ids) + counts[image_index] + len(end_ids))
            image_index += 1
        if index + 1 in sample.turn_ends:
            turn_ends.append(len(input_ids))
    if owed:  # the document ends with an image
        ids = encode_text(tokenizer, owed)
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids)
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
