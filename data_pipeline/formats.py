"""The three shard forms, safe member decoding, and sample building (see FORMAT.md).

A sample is a list of segments in reading order: text segments (learned or not) and image
segments. Every form becomes that one shape, so tokenization, masking and packing never
branch on the form.

Faults are raised as `SampleFault(reason, detail)`; the loader counts them by reason and moves
on. Decoding is by extension and never unpickles: `.pyd`, `.pickle`, `.pth` and every unknown
extension stay raw bytes that nothing reads.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from data_pipeline.chat_template import ConversationTemplate, message_content

IMAGE_PLACEHOLDER = "<image>"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "text")
FORMS = ("interleaved", "caption", "conversation")
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLES = ("system",)

# Every reason a sample or member is skipped; metrics report counts under these names.
FAULT_REASONS = (
    "truncated_tar",
    "corrupt_image",
    "malformed_json",
    "empty_shard",
    "missing_image",
    "duplicate_key",
    "unsafe_path",
    "oversize_image",
    "no_text",
    "no_image",
    "unknown_form",
    "unreadable_shard",
    "nothing_learned",
)


class SampleFault(Exception):
    """A sample that cannot be used, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str, needed: int | None = None) -> None:
        assert reason in FAULT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.needed = needed  # nothing_learned: the tokens the whole sample needs


@dataclass
class TextSegment:
    text: str
    learned: bool


@dataclass
class ImageSegment:
    member: str  # the tar member extension, e.g. "jpg" or "0.jpg"
    image: Image.Image | None = None  # decoded lazily: the planner never needs pixels


@dataclass
class Sample:
    key: str
    form: str
    segments: list[TextSegment | ImageSegment] = field(default_factory=list)
    # Segment counts at which a learned (assistant) turn ends: where a conversation may be cut.
    turn_ends: list[int] = field(default_factory=list)
    source: str = ""  # the input record it was built from ("file line 12 (id abc)"), when the shard says
    # Rendered by the model's chat template, which wrote its own BOS and end-of-turn tokens: tokenization adds none.
    rendered: bool = False

    @property
    def images(self) -> list[ImageSegment]:
        return [s for s in self.segments if isinstance(s, ImageSegment)]


@dataclass(frozen=True)
class SampleRules:
    """What a sample must hold to be used."""

    caption_prompt: str = "<image>\n"
    require_image: bool = False  # text-only conversations and documents are first-class; captions need one
    require_text: bool = True
    max_image_pixels: int = 4096 * 4096
    # The model's chat template for conversations; None: the fixed `ChatTemplate` prefixes, for the data
    # tools that check and plan shards without a model (training always passes the model's).
    chat: ConversationTemplate | None = None


def is_image_member(extension: str) -> bool:
    return extension.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


# ── safe decode ───────────────────────────────────────────────────────────────────────────────
def decode_json(raw: bytes, key: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleFault("malformed_json", f"{key}.json: {exc}") from None
    if not isinstance(value, dict):
        raise SampleFault("malformed_json", f"{key}.json holds a {type(value).__name__}, not an object")
    return value


def decode_text(raw: bytes, key: str, extension: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleFault("no_text", f"{key}.{extension} is not UTF-8: {exc}") from None


def open_image(raw: bytes, key: str, member: str, max_pixels: int) -> Image.Image:
    """PIL's lazy open: the header only (size, format), no pixel decoded; checked against `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
    except Exception as exc:  # PIL raises many types for bad headers
        raise SampleFault("corrupt_image", f"{key}.{member}: {exc}") from None
    if width * height > max_pixels:
        raise SampleFault("oversize_image", f"{key}.{member} is {width}x{height}, over {max_pixels} pixels")
    return image


def decode_image(raw: bytes, key: str, member: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """PIL decode with a size check before the pixels are read; JPEGs may downscale on decode."""
    image = open_image(raw, key, member, max_pixels)
    try:
        if draft_size and image.format == "JPEG":
            # DCT scaling: decode straight to the smallest scale still >= draft_size on each side.
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:
        raise SampleFault("corrupt_image", f"{key}.{member}: {exc}") from None


# ── sample building, one function per form ────────────────────────────────────────────────────
def detect_form(members: dict[str, bytes], meta: dict[str, Any] | None) -> str:
    if meta is not None and "conversations" in meta:
        return "conversation"
    if meta is not None and "texts" in meta and "images" in meta:
        return "interleaved"
    if any(ext in members for ext in TEXT_EXTENSIONS):
        return "caption"
    return "unknown"


def image_member_names(members: dict[str, bytes]) -> list[str]:
    return sorted((ext for ext in members if is_image_member(ext)), key=_image_order)


def _image_order(extension: str) -> tuple[int, str]:
    head = extension.split(".", 1)[0]
    return (int(head), extension) if head.isdigit() else (-1, extension)


def build_caption(key: str, members: dict[str, bytes], rules: SampleRules) -> Sample:
    text_ext = next(ext for ext in TEXT_EXTENSIONS if ext in members)
    caption = decode_text(members[text_ext], key, text_ext).strip()
    images = image_member_names(members)
    if not caption:
        raise SampleFault("no_text", f"{key}.{text_ext} is empty")
    if not images:
        raise SampleFault("no_image", f"caption pair {key} has .{text_ext} but no image member")
    segments: list[TextSegment | ImageSegment] = []
    pieces = rules.caption_prompt.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if piece:
            segments.append(TextSegment(piece, learned=False))
        if i < len(pieces) - 1:
            segments.append(ImageSegment(images[0]))
    segments.append(TextSegment(caption, learned=True))
    return Sample(key, "caption", segments)


def build_interleaved(key: str, members: dict[str, bytes], meta: dict[str, Any], rules: SampleRules) -> Sample:
    texts, images = meta["texts"], meta["images"]
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise SampleFault("malformed_json", f"{key}.json: 'texts' and 'images' must be lists of equal length")
    segments: list[TextSegment | ImageSegment] = []
    for position, (text, image) in enumerate(zip(texts, images, strict=True)):
        if (text is None) == (image is None):
            raise SampleFault(
                "malformed_json", f"{key}.json position {position}: exactly one of texts/images must be null"
            )
        if text is not None:
            segments.append(TextSegment(str(text), learned=True))
            continue
        image = str(image).removeprefix(f"{key}.")  # the full member name ("key.0.jpg") or its extension
        if image not in members:
            raise SampleFault("missing_image", f"{key}.json position {position} names member {key}.{image}, absent")
        segments.append(ImageSegment(image))
    return _checked(Sample(key, "interleaved", segments), rules)


@dataclass(frozen=True)
class ChatTemplate:
    """How turns become text: the one place the prompt format lives. The model-family work hands
    each model's own template here; the default is the Vicuna/LLaVA-1.5 style."""

    prefixes: tuple[tuple[str, str], ...] = (("system", ""), ("user", "USER: "), ("assistant", "ASSISTANT: "))
    turn_end: str = "\n"

    def prefix(self, role: str) -> str:
        return dict(self.prefixes)[role]


DEFAULT_TEMPLATE = ChatTemplate()


def canonical_role(role: Any) -> str | None:
    """ "user", "assistant" or "system" for any spelling the field uses; None if unknown."""
    name = str(role).lower()
    for canonical, names in (("user", USER_ROLES), ("assistant", ASSISTANT_ROLES), ("system", SYSTEM_ROLES)):
        if name in names:
            return canonical
    return None


def render_conversation(
    turns: list[dict[str, Any]], template: ChatTemplate = DEFAULT_TEMPLATE
) -> list[tuple[str, str, bool]]:
    """Every turn of a conversation as (role, text, learned) pieces in reading order: the role's
    prefix (never learned), the turn's text (learned for the assistant) and the turn end. The text
    keeps its `<image>` placeholders; raises ValueError on a turn that is not {from, value}."""
    pieces = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {number} is not an object with a string 'value'")
        role = canonical_role(turn.get("from"))
        if role is None:
            raise ValueError(f"turn {number} has unknown role {turn.get('from')!r}")
        learned = role == "assistant"
        prefix = template.prefix(role)
        if prefix:
            pieces.append((role, prefix, False))
        pieces.append((role, turn["value"], learned))
        pieces.append((role, template.turn_end, learned))
    return pieces


def conversation_messages(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """{from, value} turns as chat-template messages: {role, content parts} (`chat_template.message_content`)."""
    render_conversation(turns)  # the same checks, the same ValueError on a malformed turn
    return [{"role": canonical_role(turn["from"]), "content": message_content(turn["value"])} for turn in turns]


def build_conversation(key: str, members: dict[str, bytes], meta: dict[str, Any], rules: SampleRules) -> Sample:
    turns = meta["conversations"]
    if not isinstance(turns, list):
        raise SampleFault("malformed_json", f"{key}.json: 'conversations' must be a list of {{from, value}}")
    try:
        messages = conversation_messages(turns) if rules.chat is not None else None
        pieces = render_conversation(turns) if rules.chat is None else None
    except ValueError as exc:
        raise SampleFault("malformed_json", f"{key}.json: {exc}") from None
    if rules.chat is not None:
        pieces = rules.chat.pieces(messages)  # a ChatTemplateError stops the job: every conversation would fail
    available = image_member_names(members)
    segments: list[TextSegment | ImageSegment] = []
    turn_ends: list[int] = []
    used = 0
    image_text = rules.chat.image_text if rules.chat is not None else IMAGE_PLACEHOLDER
    for index, (role, text, learned) in enumerate(pieces):
        parts = text.split(image_text)
        for i, part in enumerate(parts):
            if part:
                segments.append(TextSegment(part, learned=learned))
            if i < len(parts) - 1:
                if used >= len(available):
                    raise SampleFault("missing_image", f"{key}: <image> number {used + 1} has no image member")
                segments.append(ImageSegment(available[used]))
                used += 1
        last_of_turn = index + 1 == len(pieces) or pieces[index + 1][0] != role or pieces[index + 1][2] != learned
        if learned and last_of_turn:
            turn_ends.append(len(segments))
    sample = Sample(key, "conversation", segments, turn_ends, rendered=rules.chat is not None)
    return _checked(sample, rules)


def _checked(sample: Sample, rules: SampleRules) -> Sample:
    if rules.require_text and not any(
        isinstance(s, TextSegment) and s.learned and s.text.strip() for s in sample.segments
    ):
        raise SampleFault("no_text", f"{sample.key} ({sample.form}) has no text to learn")
    if rules.require_image and not sample.images:
        raise SampleFault("no_image", f"{sample.key} ({sample.form}) has no image")
    return sample


def source_text(source: Any) -> str:
    """`file line 12 (id abc)` from the `source` that `mtrain data build` writes into each sample."""
    if not isinstance(source, dict):
        return ""
    where = ", ".join(f"{k} {source[k]}" for k in ("line", "row", "index") if k in source)
    record_id = f" (id {source['id']})" if "id" in source else ""
    return f"{source.get('file', '?')} {where}".strip() + record_id


def build_sample(key: str, members: dict[str, bytes], rules: SampleRules) -> Sample:
    """Members (extension -> raw bytes) of one tar group to a Sample; images stay undecoded.
    A fault names the input record the sample was built from, when the shard records it."""
    meta = decode_json(members["json"], key) if "json" in members else None
    form = detect_form(members, meta)
    source = source_text((meta or {}).get("source"))
    try:
        if form == "caption":
            sample = build_caption(key, members, rules)
        elif form == "interleaved":
            sample = build_interleaved(key, members, meta or {}, rules)
        elif form == "conversation":
            sample = build_conversation(key, members, meta or {}, rules)
        else:
            raise SampleFault("unknown_form", f"{key} has members {sorted(members)}: none of {', '.join(FORMS)}")
    except SampleFault as fault:
        raise with_source(fault, source) from None
    sample.source = source
    return sample


def with_source(fault: SampleFault, source: str) -> SampleFault:
    """The same fault, its detail naming the input record (`[from docs.jsonl line 3]`)."""
    if not source:
        return fault
    return SampleFault(fault.reason, f"{fault.detail} [from {source}]", fault.needed)


def load_images(sample: Sample, members: dict[str, bytes], rules: SampleRules, draft_size: int | None = None) -> None:
    """Decode every image of the sample in place (the expensive part, done once per sample)."""
    for segment in sample.images:
        segment.image = decode_image(
            members[segment.member], sample.key, segment.member, rules.max_image_pixels, draft_size
        )
