"""`mtrain data build`: convert local data sets to shards of a target size (see FORMAT.md).

Inputs:
- OBELICS-style JSONL: one document per line, `texts` and `images` aligned lists (exactly one
  non-null per position), image entries are local paths (relative to the JSONL file), plus
  optional `metadata`;
- LLaVA JSON: a list of `{id, image, conversations}` with the images in a folder;
- captions: a folder of `name.<img>` + `name.txt` pairs, or a CSV with `image,caption` columns.

Images are copied byte for byte when they already are JPEG, PNG or WebP within the size limit;
anything else (another format, or a side over `max_image_side`) is re-encoded. Next to the
shards, `index.json` records the form and the samples of every shard.
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

from data_pipeline.formats import IMAGE_EXTENSIONS
from data_pipeline.shards import INDEX_FILE

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class BuildReport:
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    images_copied: int = 0
    images_reencoded: int = 0
    skipped: list[str] = field(default_factory=list)  # "<input item>: <reason>"


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


# ── readers: each yields (source label, tar sample dict without __key__) or raises ValueError ─
def obelics_samples(jsonl: Path, encoder: ImageEncoder) -> Iterator[tuple[str, dict[str, Any]]]:
    for line_number, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        label = f"{jsonl.name}:{line_number}"
        try:
            doc = json.loads(line)
            texts, images = doc["texts"], doc["images"]
            if len(texts) != len(images):
                raise ValueError("texts and images differ in length")
            sample: dict[str, Any] = {}
            members: list[str | None] = []
            for position, (text, image) in enumerate(zip(texts, images, strict=True)):
                if (text is None) == (image is None):
                    raise ValueError(f"position {position}: exactly one of texts/images must be null")
                if image is None:
                    members.append(None)
                    continue
                data, extension = encoder.encode(jsonl.parent / image)
                member = f"{len([m for m in members if m])}.{extension}"
                sample[member] = data
                members.append(member)
            sample["json"] = json.dumps({"texts": texts, "images": members, "metadata": doc.get("metadata", {})})
            yield label, sample
        except (KeyError, ValueError, OSError) as exc:
            yield label, {"__error__": f"{type(exc).__name__}: {exc}"}


def llava_samples(llava_json: Path, image_dir: Path, encoder: ImageEncoder) -> Iterator[tuple[str, dict[str, Any]]]:
    for item in json.loads(llava_json.read_text()):
        label = f"{llava_json.name}:{item.get('id', '?')}"
        try:
            images = item.get("image") or []
            images = [images] if isinstance(images, str) else list(images)
            sample: dict[str, Any] = {}
            for i, image in enumerate(images):
                data, extension = encoder.encode(image_dir / image)
                sample[extension if len(images) == 1 else f"{i}.{extension}"] = data
            meta = {"conversations": item["conversations"], "metadata": {"id": item.get("id")}}
            sample["json"] = json.dumps(meta)
            yield label, sample
        except (KeyError, ValueError, OSError) as exc:
            yield label, {"__error__": f"{type(exc).__name__}: {exc}"}


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
            yield label, {extension: data, "txt": caption.strip()}
        except (ValueError, OSError) as exc:
            yield label, {"__error__": f"{type(exc).__name__}: {exc}"}


def pair_samples(jsonl: Path, encoder: ImageEncoder) -> Iterator[tuple[str, dict[str, Any]]]:
    """(query, positive) pairs from JSONL lines with query_image / query_text / positive_image /
    positive_text (each optional, but every side needs one) and an optional instruction."""
    for line_number, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        label = f"{jsonl.name}:{line_number}"
        try:
            pair = json.loads(line)
            sample: dict[str, Any] = {}
            for side in ("query", "positive"):
                image, text = pair.get(f"{side}_image"), pair.get(f"{side}_text")
                if not image and not text:
                    raise ValueError(f"the {side} has neither {side}_image nor {side}_text")
                if image:
                    data, extension = encoder.encode(jsonl.parent / image)
                    sample[f"{side}.{extension}"] = data
                if text:
                    sample[f"{side}.txt"] = text
            if pair.get("instruction"):
                sample["instruction.txt"] = pair["instruction"]
            yield label, sample
        except (ValueError, OSError, AttributeError) as exc:
            yield label, {"__error__": f"{type(exc).__name__}: {exc}"}


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


def build_shards(
    form: str,
    source: str | Path,
    out_dir: str | Path,
    shard_bytes: int = 256 * 2**20,
    image_dir: str | Path | None = None,
    max_image_side: int = 0,
) -> BuildReport:
    """Convert one input (see the module docstring) to shards; returns what was written and skipped."""
    source, out = Path(source), Path(out_dir)
    if not source.exists():
        raise FileNotFoundError(f"data build: input {str(source)!r} does not exist")
    report = BuildReport()
    encoder = ImageEncoder(max_image_side, report)
    if form == "interleaved":
        samples = obelics_samples(source, encoder)
    elif form == "conversation":
        if image_dir is None:
            raise ValueError("data build --form conversation needs --images FOLDER (the LLaVA image folder)")
        samples = llava_samples(source, Path(image_dir), encoder)
    elif form == "pair":
        samples = pair_samples(Path(source), encoder)
    elif form == "caption":
        samples = caption_samples(source, encoder)
    else:
        raise ValueError(f"data build: unknown form {form!r}; use interleaved, caption, conversation or pair")
    return write_shards(samples, out, form, shard_bytes, report=report)


def parse_size(text: str) -> int:
    """'256MB', '1GiB', '500k' or a plain byte count."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    if cleaned and cleaned[-1] in units:
        return int(float(cleaned[:-1]) * units[cleaned[-1]])
    return int(cleaned)
