"""Learnable sample shards: coloured shapes whose text names the colour and the shape.

One shared writer (`write_shape_shards`) draws the shapes; each kind only says which members a
sample holds, in one of the forms of FORMAT.md:

- `captions`: caption pairs in the img2dataset convention (`key.jpg` + `key.txt`);
- `interleaved`: OBELICS-style documents (`key.json` with aligned `texts`/`images`, `key.0.jpg`);
- `conversation`: LLaVA instructions (`key.json` with `conversations`, `key.jpg`);
- `pairs` (data_pipeline/pairs.py): (query, positive) pairs for contrastive training.

Plain `webdataset` reads them all. The text is predictable from the image alone, which is what
lets a few dozen steps of training show a falling loss.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "cyan": (30, 200, 210),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "cross")
INDEX_FILE = "index.json"


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """A `size`-pixel image of one coloured shape on a light, slightly tinted background."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size * 5 // 10, size * 8 // 10)
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    x1, y1 = x0 + extent, y0 + extent
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        bar = extent // 4
        mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((mid_x - bar, y0, mid_x + bar, y1), fill=fill)
        draw.rectangle((x0, mid_y - bar, x1, mid_y + bar), fill=fill)
    return image


def write_shape_shards(
    out_dir: str | Path,
    num_shards: int,
    samples_per_shard: int,
    seed: int,
    file_prefix: str,
    members: Callable[[str, str, bytes], dict[str, Any]],
    kind: str,
) -> list[Path]:
    """Tars of coloured-shape samples whose members `members(colour, shape, jpeg)` builds, plus the index."""
    import webdataset as wds  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths, index = [], {}
    for shard in range(num_shards):
        path = out / f"{file_prefix}-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for item in range(samples_per_shard):
                colour = rng.choice(list(COLOURS))
                shape = rng.choice(SHAPES)
                buffer = io.BytesIO()
                draw_shape(colour, shape, rng).save(buffer, format="JPEG", quality=90)
                key = f"{file_prefix[0]}{shard:04d}_{item:05d}"
                writer.write({"__key__": key, **members(colour, shape, buffer.getvalue())})
        paths.append(path)
        index[path.name] = samples_per_shard
    sizes = {path.name: path.stat().st_size for path in paths}
    (out / INDEX_FILE).write_text(json.dumps({"format": kind, "samples": index, "bytes": sizes}, indent=1))
    return paths


def write_sample_shards(
    out_dir: str | Path, num_shards: int = 4, samples_per_shard: int = 96, seed: int = 0
) -> list[Path]:
    """Write `num_shards` caption-pair tars plus an index of samples per shard; return the paths."""

    def caption_pair(colour: str, shape: str, jpeg: bytes) -> dict[str, Any]:
        return {"jpg": jpeg, "txt": f"a {colour} {shape}."}

    return write_shape_shards(out_dir, num_shards, samples_per_shard, seed, "shard", caption_pair, "caption")


def write_interleaved_shards(
    out_dir: str | Path, num_shards: int = 4, samples_per_shard: int = 96, seed: int = 0
) -> list[Path]:
    """Interleaved documents (text, image, text) whose last text names the shape drawn."""

    def document(colour: str, shape: str, jpeg: bytes) -> dict[str, Any]:
        texts = ["Here is a shape.", None, f"It is a {colour} {shape}."]
        return {"json": json.dumps({"texts": texts, "images": [None, "0.jpg", None]}).encode(), "0.jpg": jpeg}

    return write_shape_shards(out_dir, num_shards, samples_per_shard, seed, "docs", document, "interleaved")


def write_conversation_shards(
    out_dir: str | Path, num_shards: int = 4, samples_per_shard: int = 96, seed: int = 0
) -> list[Path]:
    """LLaVA-style single-turn conversations: the user asks what is drawn, the assistant names it."""

    def conversation(colour: str, shape: str, jpeg: bytes) -> dict[str, Any]:
        turns = [
            {"from": "human", "value": "<image>\nWhat is drawn?"},
            {"from": "gpt", "value": f"A {colour} {shape}."},
        ]
        return {"json": json.dumps({"conversations": turns}).encode(), "jpg": jpeg}

    return write_shape_shards(out_dir, num_shards, samples_per_shard, seed, "chat", conversation, "conversation")
