"""Data loader throughput, side by side in one run on the same shards.

    python benchmarks/data_throughput.py [--samples 480] [--image-size 336] [--repeats 3]

Writes caption shards with realistic 640x480 JPEGs, then times three pipelines over the same
samples, in one process each (no worker processes, so the comparison is per core):

- mtrain:    the StreamingLoader (captions, tokenization with visual tokens, collate);
- baseline:  plain `wds.WebDataset(...).decode("pil")` + the HF image processor + the tokenizer;
- raw limit: read the tar, decode the JPEG (PIL, with draft), resize and centre-crop with PIL:
             the least any loader must do to hand the model an image of that size.

Targets (issue 3): mtrain >= 1.5x baseline, and >= 0.8x the raw limit, judged by the median ratio;
ratios are printed with their min and max over repetitions (each repetition runs the three pipelines back to back),
measured in samples per CPU second of this process (stable when other jobs share the machine)
and in samples per wall-clock second.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ratio_line, spread  # noqa: E402

from data_pipeline.loader import LoaderSettings, build_loader  # noqa: E402
from data_pipeline.tokenize import TokenSpec  # noqa: E402
from mtrain.model.build import tiny_image_processor  # noqa: E402
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer  # noqa: E402

PROMPT = "<image>\n"


def photo_like_jpeg(rng: random.Random, np_rng: np.random.Generator) -> bytes:
    """A 640x480 JPEG with gradients, shapes and sensor-like noise (about 60-100 kB at q=90)."""
    base = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None] * np.array(
        [rng.random(), rng.random(), rng.random()], dtype=np.float32
    )
    base = base + np.linspace(0, 80, 480, dtype=np.float32)[:, None, None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8).repeat(1, axis=0))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randint(0, 600), rng.randint(0, 440)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        draw.ellipse((x, y, x + rng.randint(20, 200), y + rng.randint(20, 200)), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(image, dtype=np.int16) + np_rng.integers(-12, 12, (480, 640, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shards(out: Path, samples: int, shards: int = 4) -> list[str]:
    import webdataset as wds

    rng, np_rng = random.Random(0), np.random.default_rng(0)
    words = "a red green blue circle square photo of the with and small large on image".split()
    paths = []
    per_shard = samples // shards
    for shard in range(shards):
        path = out / f"bench-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(per_shard):
                caption = " ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) + "."
                writer.write({"__key__": f"b{shard:02d}_{i:05d}", "jpg": photo_like_jpeg(rng, np_rng), "txt": caption})
        paths.append(str(path))
    return paths


def run_mtrain(urls: list[str], tokenizer, processor, visual_tokens: int, batch_size: int) -> int:
    settings = LoaderSettings(sources=(("::".join(urls), 1.0),), batch_size=batch_size, seed=0, shuffle=False)
    spec = TokenSpec(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), visual_tokens + 64)
    loader = build_loader(settings, 0, 1, spec, processor, visual_tokens)
    samples = 0
    while True:
        batch = next(loader)
        if loader.epoch > 0:
            return samples
        samples += batch["pixel_values"].shape[0]


def run_baseline(urls: list[str], tokenizer, processor, visual_tokens: int, batch_size: int) -> int:
    import torch
    import webdataset as wds

    samples, pixels, ids = 0, [], []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        pixels.append(processor(images=sample["jpg"], return_tensors="pt")["pixel_values"][0])
        text = PROMPT.replace("<image>", IMAGE_TOKEN * visual_tokens) + sample["txt"]
        ids.append(tokenizer(text)["input_ids"])
        if len(pixels) == batch_size:
            torch.stack(pixels)
            samples += len(pixels)
            pixels, ids = [], []
    return samples + len(pixels)


def run_raw_limit(urls: list[str], image_size: int) -> int:
    samples = 0
    for url in urls:
        with tarfile.open(url, mode="r|") as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                image.draft("RGB", (image_size, image_size))
                image = image.convert("RGB")
                width, height = image.size
                scale = image_size / min(width, height)
                image = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
                left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
                np.asarray(image.crop((left, top, left + image_size, top + image_size)))
                samples += 1
    return samples


def timed(fn, *args) -> tuple[float, float]:
    """(samples per CPU second of this process, samples per wall second)."""
    cpu, wall = time.process_time(), time.perf_counter()
    samples = fn(*args)
    return samples / (time.process_time() - cpu), samples / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--image-size", type=int, default=336, help="processor crop size (LLaVA-1.5: 336)")
    parser.add_argument("--visual-tokens", type=int, default=576)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tokenizer = build_tiny_tokenizer()
    processor = tiny_image_processor(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), args.samples)
        size_kb = sum(Path(u).stat().st_size for u in urls) / args.samples / 1024
        print(
            f"{args.samples} samples, 640x480 JPEG, {size_kb:.0f} kB per sample; image {args.image_size}px, "
            f"{args.visual_tokens} visual tokens; one process each"
        )
        # Warm the page cache and the libraries once before timing.
        run_raw_limit(urls, args.image_size)
        runs: dict[str, list[tuple[float, float]]] = {"mtrain": [], "baseline": [], "raw limit": []}
        for _ in range(args.repeats):
            runs["mtrain"].append(timed(run_mtrain, urls, tokenizer, processor, args.visual_tokens, args.batch_size))
            runs["baseline"].append(
                timed(run_baseline, urls, tokenizer, processor, args.visual_tokens, args.batch_size)
            )
            runs["raw limit"].append(timed(run_raw_limit, urls, args.image_size))
    # CPU seconds are the stable measure on a shared machine; wall-clock rates are printed beside them.
    for name, values in runs.items():
        cpu, wall = [v[0] for v in values], [v[1] for v in values]
        print(f"{name:10s} {spread(cpu, 1)} samples/CPU-s   wall {spread(wall, 1)} samples/s")
    for other, target in (("baseline", ">= 1.5"), ("raw limit", ">= 0.8")):
        for measure, index in (("CPU", 0), ("wall", 1)):
            ratios = [m[index] / o[index] for m, o in zip(runs["mtrain"], runs[other], strict=True)]
            print(ratio_line(f"mtrain / {other:9s} ({measure:4s})", ratios, target))


if __name__ == "__main__":
    main()
