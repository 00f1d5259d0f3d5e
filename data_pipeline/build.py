"""`mtrain data build`: convert local data sets to shards of a target size (see FORMAT.md).

Inputs (JSON list or JSONL, whichever the file holds; image paths are local, relative to
`--images` or else to the input file's folder):
- interleaved: OBELICS-style records, `texts` and `images` aligned lists (exactly one non-null per
  position) plus optional `metadata`, as JSONL, a JSON list or a parquet file (pyarrow);
- mmc4: MMC4 records, `text_list` and `image_info` (`image_name`, `matched_text_index`): each
  image goes before the sentence it is matched to;
- conversation: LLaVA / ShareGPT (`conversations` of `{from, value}`, `system` turns allowed, an
  `image` or `images` entry; text-only entries are kept) or OpenAI-style `messages` (`role`,
  `content` as a string or a list of `text` and `image_url` / `image` parts);
- caption: a folder of `name.<img>` + `name.txt` pairs, or a CSV with `image,caption` columns;
- pair: JSONL of (query, positive) pairs, each with an optional hard negative.

Every input record is checked before anything of it is written: a bad one is reported with its
line (or row, or list index) and id, and skipped. The build fails when more than
`max_skipped_fraction` of the records are skipped. Each sample's `json` carries `source`
(file, line, id), so `validate` and training errors name the input it came from.

Images are copied byte for byte when they already are JPEG, PNG or WebP within the size limit;
anything else (another format, or a side over `max_image_side`) is re-encoded. Next to the
shards, `index.json` records the form and the samples and bytes of every shard.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_pipeline.formats import IMAGE_EXTENSIONS, IMAGE_PLACEHOLDER, canonical_role, render_conversation
from data_pipeline.shards import INDEX_FILE

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class BuildReport:
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    images_copied: int = 0
    images_reencoded: int = 0
    skipped: list[str] = field(default_factory=list)  # "<input record>: <reason>"

    @property
    def records(self) -> int:
        return self.samples + len(self.skipped)

    def summary(self) -> str:
        return (
            f"{self.records} input record(s): {self.samples} written in {len(self.shards)} shard(s), "
            f"{len(self.skipped)} skipped; {self.images_copied} images copied, {self.images_reencoded} re-encoded"
        )


class BuildError(ValueError):
    """The input is too bad to build from: say how much was skipped and why."""


@dataclass
class ImageEncoder:
    """Bytes and extension for an image file, re-encoding only when needed."""

    max_image_side: int = 0  # 0: never downscale
    report: BuildReport = field(default_factory=BuildReport)

    def encode(self, path: Path) -> tuple[bytes, str]:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            image_format, size = image.format, image.size
            too_big = self.max_image_side and max(size) > self.max_image_side
            if image_format in KEEP_FORMATS and not too_big:
                self.report.images_copied += 1
                return raw, KEEP_FORMATS[image_format]
            image = image.convert("RGB")
            if too_big:
                image.thumbnail((self.max_image_side, self.max_image_side))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=92)
        self.report.images_reencoded += 1
        return out.getvalue(), "jpg"


# ── input records: JSON list, JSONL or parquet, each with a label that names it ──────────────
Record = tuple[str, dict[str, Any], dict[str, Any]]  # (label, record, source metadata)


class BadRecord(ValueError):
    """An input record that cannot become a sample; the message says why."""


def read_records(path: Path) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(label, record or BadRecord, source) of every record of a JSON list, JSONL or parquet file,
    streamed (JSONL and parquet never load the whole file)."""
    if path.suffix == ".parquet":
        yield from _parquet_records(path)
        return
    with path.open(encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if head.startswith("["):
            try:
                items = json.load(handle)
            except json.JSONDecodeError as exc:
                raise BuildError(f"{path}: starts like a JSON list but does not parse ({exc})") from None
            for index, item in enumerate(items):
                yield _labelled(path, {"index": index}, item)
            return
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                item = BadRecord(f"not JSON: {exc}")
            yield _labelled(path, {"line": line_number}, item)


def _parquet_records(path: Path) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError as exc:
        raise BuildError(f"{path}: reading parquet needs pyarrow: pip install 'mtrain[parquet]'") from exc
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for item in batch.to_pylist():
            yield _labelled(path, {"row": row}, item)
            row += 1


def _labelled(path: Path, where: dict[str, int], item: Any) -> tuple[str, Any, dict[str, Any]]:
    record_id = item.get("id") if isinstance(item, dict) else None
    position = ", ".join(f"{k} {v}" for k, v in where.items())
    label = f"{path.name} {position}" + (f" (id {record_id})" if record_id is not None else "")
    source = {"file": path.name, **where, **({"id": record_id} if record_id is not None else {})}
    if not isinstance(item, dict | BadRecord):
        item = BadRecord(f"a {type(item).__name__}, not an object")
    return label, item, source


def records_to_samples(records, convert) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each record through `convert(record, source) -> tar members`; failures become skips."""
    for label, record, source in records:
        try:
            if isinstance(record, BadRecord):
                raise record
            yield label, convert(record, source)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            yield label, {"__error__": f"{type(exc).__name__}: {reason}"}


# ── converters: one record -> tar members, or an exception that says what is wrong ────────────
def interleaved_members(
    texts: list[Any], images: list[Any], image_root: Path, encoder: ImageEncoder, extra: dict[str, Any]
) -> dict[str, Any]:
    """Aligned texts/images (exactly one non-null per position) to members `0.jpg`, ... and `json`."""
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise BadRecord("'texts' and 'images' must be lists of equal length")
    sample: dict[str, Any] = {}
    members: list[str | None] = []
    for position, (text, image) in enumerate(zip(texts, images, strict=True)):
        if (text is None) == (image is None):
            raise BadRecord(f"position {position}: exactly one of texts/images must be null")
        if image is None:
            if not isinstance(text, str):
                raise BadRecord(f"position {position}: text is a {type(text).__name__}, not a string")
            members.append(None)
            continue
        data, extension = encoder.encode(local_image(image, image_root))
        member = f"{sum(m is not None for m in members)}.{extension}"
        sample[member] = data
        members.append(member)
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise BadRecord("no text to learn")
    sample["json"] = json.dumps({"texts": texts, "images": members, **extra})
    return sample


def local_image(name: Any, image_root: Path) -> Path:
    if not isinstance(name, str) or not name:
        raise BadRecord(f"image entry {name!r} is not a path")
    if "://" in name:
        raise BadRecord(f"image {name!r} is a URL: download the images first and give local paths")
    path = image_root / name
    if not path.is_file():
        raise BadRecord(f"image {str(path)!r} not found")
    return path


def obelics_sample(record: dict[str, Any], source: dict[str, Any], image_root: Path, encoder: ImageEncoder) -> dict:
    metadata = record.get("metadata") or {}
    if isinstance(metadata, str):  # OBELICS parquet keeps metadata as a JSON string
        metadata = json.loads(metadata)
    return interleaved_members(
        record["texts"], record["images"], image_root, encoder, {"metadata": metadata, "source": source}
    )


def mmc4_sample(record: dict[str, Any], source: dict[str, Any], image_root: Path, encoder: ImageEncoder) -> dict:
    """MMC4: every image goes right before the sentence it is matched to (as OpenFlamingo reads it)."""
    sentences, infos = record["text_list"], record.get("image_info") or []
    if not isinstance(sentences, list) or not all(isinstance(t, str) for t in sentences):
        raise BadRecord("'text_list' must be a list of strings")
    before: dict[int, list[str]] = {}
    for info in infos:
        index = info["matched_text_index"]
        if not isinstance(index, int) or not 0 <= index < len(sentences):
            raise BadRecord(f"image {info.get('image_name')!r}: matched_text_index {index!r} is outside text_list")
        before.setdefault(index, []).append(info["image_name"])
    texts: list[str | None] = []
    images: list[str | None] = []
    for index, sentence in enumerate(sentences):
        for image in before.get(index, []):
            texts.append(None)
            images.append(image)
        texts.append(sentence)
        images.append(None)
    extra = {"metadata": {"url": record["url"]} if "url" in record else {}, "source": source}
    return interleaved_members(texts, images, image_root, encoder, extra)


def conversation_sample(
    record: dict[str, Any], source: dict[str, Any], image_root: Path, encoder: ImageEncoder
) -> dict[str, Any]:
    """LLaVA / ShareGPT `conversations` or OpenAI `messages` to the shard's conversation form."""
    if "messages" in record:
        turns, images = _from_messages(record["messages"])
    else:
        turns = record["conversations"]
        images = record.get("images", record.get("image")) or []
        images = [images] if isinstance(images, str) else images
    if not isinstance(turns, list) or not turns:
        raise BadRecord("no turns")
    if not isinstance(images, list):
        raise BadRecord(f"'image(s)' is a {type(images).__name__}, not a path or a list")
    pieces = render_conversation(turns)  # the renderer the loader uses: it refuses what it cannot read
    if not any(role == "assistant" and text.strip() and learned for role, text, learned in pieces):
        raise BadRecord("no assistant turn with text: nothing to learn")
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders == 0 and images:  # LLaVA-style data without the marker: the images go first
        first_user = next((i for i, t in enumerate(turns) if canonical_role(t.get("from")) == "user"), None)
        if first_user is None:
            raise BadRecord("images but no user turn to put them in")
        turns = [dict(t) for t in turns]
        turns[first_user]["value"] = IMAGE_PLACEHOLDER * len(images) + "\n" + turns[first_user]["value"]
    elif placeholders != len(images):
        raise BadRecord(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    sample: dict[str, Any] = {}
    for i, image in enumerate(images):
        data, extension = encoder.encode(local_image(image, image_root))
        sample[extension if len(images) == 1 else f"{i}.{extension}"] = data
    canonical = [{"from": ROLE_NAMES[canonical_role(t["from"])], "value": t["value"]} for t in turns]
    metadata = {"id": record["id"]} if "id" in record else {}
    sample["json"] = json.dumps({"conversations": canonical, "metadata": metadata, "source": source})
    return sample


ROLE_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}


def _from_messages(messages: Any) -> tuple[list[dict[str, str]], list[str]]:
    """OpenAI chat `messages` to `{from, value}` turns with `<image>` where each image part was."""
    if not isinstance(messages, list):
        raise BadRecord("'messages' must be a list")
    turns, images = [], []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise BadRecord(f"message {number} has no 'role'")
        content = message.get("content")
        if isinstance(content, str):
            turns.append({"from": message["role"], "value": content})
            continue
        if not isinstance(content, list):
            raise BadRecord(f"message {number}: 'content' must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind in ("image_url", "image"):
                value = part.get(kind)
                images.append(value.get("url") if isinstance(value, dict) else value)
                parts.append(IMAGE_PLACEHOLDER)
            else:
                raise BadRecord(f"message {number}: content part of type {kind!r} (use text, image_url or image)")
        turns.append({"from": message["role"], "value": "\n".join(parts)})
    return turns, images


def caption_samples(source: Path, encoder: ImageEncoder) -> Iterator[tuple[str, dict[str, Any]]]:
    if source.is_file() and source.suffix == ".csv":
        with source.open(newline="") as handle:
            pairs = [(source.parent / row["image"], row["caption"]) for row in csv.DictReader(handle)]
    else:
        pairs = []
        for image in sorted(p for p in source.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
            caption = image.with_suffix(".txt")
            pairs.append((image, caption.read_text() if caption.is_file() else None))
    for image, caption in pairs:
        label = str(image.name)
        try:
            if caption is None:
                raise ValueError("no caption .txt beside it")
            data, extension = encoder.encode(image)
            if not caption.strip():
                raise ValueError("the caption is empty")
            source = json.dumps({"source": {"file": label}})
            yield label, {extension: data, "txt": caption.strip(), "json": source}
        except (ValueError, OSError) as exc:
            yield label, {"__error__": f"{type(exc).__name__}: {exc}"}


def pair_sample(record: dict[str, Any], source: dict[str, Any], image_root: Path, encoder: ImageEncoder) -> dict:
    """A (query, positive) pair from query_image / query_text / positive_image / positive_text (each
    optional, but every side needs one), an optional hard negative (negative_image and/or
    negative_text, VLM2Vec / MMEB style) and an optional instruction."""
    sample: dict[str, Any] = {}
    for side in ("query", "positive", "negative"):
        image, text = record.get(f"{side}_image"), record.get(f"{side}_text")
        if not image and not text:
            if side == "negative":
                continue
            raise BadRecord(f"the {side} has neither {side}_image nor {side}_text")
        if image:
            data, extension = encoder.encode(local_image(image, image_root))
            sample[f"{side}.{extension}"] = data
        if text:
            sample[f"{side}.txt"] = text
    if record.get("instruction"):
        sample["instruction.txt"] = record["instruction"]
    return sample


# ── writer ───────────────────────────────────────────────────────────────────────────────────
def write_shards(
    samples: Iterator[tuple[str, dict[str, Any]]],
    out_dir: Path,
    form: str,
    shard_bytes: int,
    prefix: str = "shard",
    report: BuildReport | None = None,
) -> BuildReport:
    """Write samples to `prefix-NNNNNN.tar` files of about `shard_bytes` each, plus index.json."""
    import webdataset as wds  # noqa: PLC0415

    report = report or BuildReport()
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, int] = {}
    writer, written, count, shard = None, 0, 0, 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            index[f"{prefix}-{shard - 1:06d}.tar"] = count
        writer = None

    for label, sample in samples:
        if "__error__" in sample:
            report.skipped.append(f"{label}: {sample['__error__']}")
            continue
        size = sum(len(v) if isinstance(v, bytes) else len(str(v).encode()) for v in sample.values())
        if writer is None or (written and written + size > shard_bytes):
            close()
            path = out_dir / f"{prefix}-{shard:06d}.tar"
            writer, written, count, shard = wds.TarWriter(str(path)), 0, 0, shard + 1
            report.shards.append(str(path))
        writer.write({"__key__": f"{prefix}{shard - 1:06d}_{count:07d}", **sample})
        written += size + 1024  # tar headers and padding
        count += 1
        report.samples += 1
    close()
    sizes = {name: (out_dir / name).stat().st_size for name in index}  # lets readers see a stale index
    (out_dir / INDEX_FILE).write_text(json.dumps({"format": form, "samples": index, "bytes": sizes}, indent=1))
    return report


BUILD_FORMS = ("interleaved", "mmc4", "conversation", "caption", "pair")
SHARD_FORM = {"mmc4": "interleaved"}  # the form the shards hold, where it differs from the input's


def build_shards(
    form: str,
    source: str | Path,
    out_dir: str | Path,
    shard_bytes: int = 256 * 2**20,
    image_dir: str | Path | None = None,
    max_image_side: int = 0,
    max_skipped_fraction: float = 0.05,
    report: BuildReport | None = None,
) -> BuildReport:
    """Convert one input (see the module docstring) to shards; returns what was written and skipped.

    Raises BuildError, after writing what was good, when more than `max_skipped_fraction` of the
    input records were skipped (a wrong `--images` folder, the wrong form, ...).
    """
    source, out = Path(source), Path(out_dir)
    if not source.exists():
        raise FileNotFoundError(f"data build: input {str(source)!r} does not exist")
    if form not in BUILD_FORMS:
        raise ValueError(f"data build: unknown form {form!r}; use one of {', '.join(BUILD_FORMS)}")
    report = report if report is not None else BuildReport()
    encoder = ImageEncoder(max_image_side, report)
    image_root = Path(image_dir) if image_dir is not None else source.parent
    converters = {
        "interleaved": obelics_sample,
        "mmc4": mmc4_sample,
        "conversation": conversation_sample,
        "pair": pair_sample,
    }
    if form in converters:
        convert = converters[form]
        samples = records_to_samples(read_records(source), lambda r, src: convert(r, src, image_root, encoder))
    else:
        samples = caption_samples(source, encoder)
    write_shards(samples, out, SHARD_FORM.get(form, form), shard_bytes, report=report)
    if report.records == 0:
        raise BuildError(f"data build: {source} holds no input records")
    if len(report.skipped) > max_skipped_fraction * report.records:
        raise BuildError(
            f"data build failed: {len(report.skipped)} of {report.records} input records skipped "
            f"({len(report.skipped) / report.records:.0%}), over --max-skipped {max_skipped_fraction}; "
            f"first: {report.skipped[0]}. Check the input form and --images, or raise --max-skipped. "
            f"The {report.samples} good samples were written to {out}"
        )
    return report


def parse_size(text: str) -> int:
    """'256MB', '1GiB', '500k' or a plain byte count."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    if cleaned and cleaned[-1] in units:
        return int(float(cleaned[:-1]) * units[cleaned[-1]])
    return int(cleaned)
