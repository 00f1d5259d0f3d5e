"""Packing: the non-pad token fraction of packed batches against padded ones, on a realistic length mix.

    python benchmarks/packing.py [--samples 192] [--max-len 512] [--batch 8] [--repeats 3]

Writes three kinds of shards with the sample writers (`data_pipeline.sample_data.write_shape_shards`),
each with text lengths drawn from a lognormal, as in real mixtures: short captions (median ~10
words), LLaVA-style conversations (lognormal number of turns) and interleaved documents (median
~120 words around one image). The same mixture is then read by mtrain's loader twice, with
`packing=False` (one sample per row, padded) and `packing=True` (`data_pipeline/packing.py`:
first-fit decreasing into rows of `max_len`), and the fraction of non-pad positions is compared.
Repetitions use different seeds (different lognormal draws), giving the min and max of the ratio.

Native resolution (Qwen2-VL's sizes: 14 px patches, 2x2 merger, max_pixels of a 512-token reference grid):
captions whose JPEGs have random sides and aspect ratios are packed twice, at each image's own count (its size
read from the header when planning, what the loader does) and at the reference grid's upper bound (the plan
before); each is measured as the fill of max_len by real tokens (images at their own count). The header read is
timed against a full decode, in alternating rounds on the same images.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import IMAGE_SIZE, VISUAL_TOKENS, lognormal_words, ratio_line, spread, write_mix  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipeline.collate import IMAGE_GRID_THW, ROW_TOKENS  # noqa: E402
from data_pipeline.formats import decode_image, open_image  # noqa: E402
from data_pipeline.loader import HEADER_BYTES, LoaderSettings, build_loader  # noqa: E402
from data_pipeline.packing import non_pad_fraction  # noqa: E402
from data_pipeline.tokenize import TokenSpec  # noqa: E402
from mtrain.model.build import tiny_image_processor  # noqa: E402
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer  # noqa: E402


def mean_fraction(sources, packing: bool, batch: int, max_len: int, batches: int, seed: int) -> tuple[float, int]:
    tokenizer = build_tiny_tokenizer()
    spec = TokenSpec(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), max_len)
    settings = LoaderSettings(sources=tuple(sources), batch_size=batch, seed=seed, packing=packing)
    loader = build_loader(settings, 0, 1, spec, tiny_image_processor(IMAGE_SIZE), VISUAL_TOKENS)
    fractions, real_tokens = [], 0
    for _ in range(batches):
        out = next(loader)
        fractions.append(non_pad_fraction(out))
        real_tokens += int(out["attention_mask"].sum()) if "attention_mask" in out else 0
    return statistics.mean(fractions), real_tokens


# Qwen2-VL's own sizes: 14 px patches merged 2x2 (28 px a token), at most a 512-token image (its usual max_pixels
# is 12845056; 401408 keeps the benchmark's images and rows small).
NATIVE_PIXELS = (3136, 512 * 28 * 28)


def write_native_captions(out: Path, samples: int, seed: int) -> tuple[str, list[bytes]]:
    """One shard of captions whose JPEGs have sides of 64-900 px and aspect ratios 1:2-2:1; the JPEGs."""
    import webdataset as wds  # noqa: PLC0415

    rng, jpegs = random.Random(seed), []
    path = out / "native-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for index in range(samples):
            area, aspect = rng.uniform(64, 900) ** 2, math.exp(rng.uniform(-math.log(2), math.log(2)))
            size = (max(28, round(math.sqrt(area * aspect))), max(28, round(math.sqrt(area / aspect))))
            buffer = io.BytesIO()
            Image.new("RGB", size, (rng.randrange(256), 90, 160)).save(buffer, format="JPEG", quality=90)
            jpegs.append(buffer.getvalue())
            sink.write(
                {"__key__": f"n{index:05d}", "jpg": jpegs[-1], "txt": lognormal_words(rng, 10, 0.6, 40).encode()}
            )
    return str(path), jpegs


def native_fill(shard: str, by_header: bool, batch: int, max_len: int, batches: int, seed: int) -> float:
    """Real tokens (each image at its own count) over rows x max_len, rows planned at each image's own count
    (`by_header`) or at the reference grid's upper bound."""
    from transformers import Qwen2VLImageProcessorPil  # noqa: PLC0415

    from mtrain.model.families.qwen2_vl import (  # noqa: PLC0415
        IMAGE_PAD,
        VISION_END,
        VISION_START,
        NativeSizeImageProcessor,
        build_tiny_qwen_tokenizer,
    )

    tokenizer = build_tiny_qwen_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    spec = TokenSpec.with_markers(tokenizer, image_id, max_len, (VISION_START, VISION_END))
    stock = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = NativeSizeImageProcessor(stock, *NATIVE_PIXELS)
    reference = NATIVE_PIXELS[1] // 28**2
    settings = LoaderSettings(
        sources=((shard, 1.0),), batch_size=batch, seed=seed, packing=True, epoch_mode="resampled"
    )
    counter = processor.size_tokens if by_header else None
    loader = build_loader(settings, 0, 1, spec, processor, reference, image_tokens=counter)
    real, slots = 0, 0
    for _ in range(batches):
        out = next(loader)
        own = sum(t * h * w // 4 for t, h, w in out[IMAGE_GRID_THW])
        planned = int((out["input_ids"] == image_id).sum())  # the upper bound's runs are cut to `own` in training
        real += sum(out[ROW_TOKENS]) - planned + own
        slots += len(out[ROW_TOKENS]) * max_len
    return real / slots


def header_and_decode_seconds(jpegs: list[bytes], rounds: int) -> tuple[float, float]:
    """Median seconds per image of the planner's header read and of a full decode, alternating rounds."""
    headers, decodes = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for raw in jpegs:
            open_image(raw[:HEADER_BYTES], "k", "jpg", 1 << 40).size  # noqa: B018
        headers.append((time.perf_counter() - start) / len(jpegs))
        start = time.perf_counter()
        for raw in jpegs:
            decode_image(raw, "k", "jpg", 1 << 40)
        decodes.append((time.perf_counter() - start) / len(jpegs))
    return statistics.median(headers), statistics.median(decodes)


def native_lines(samples: int, max_len: int, batch: int, batches: int, repeats: int) -> list[str]:
    by_header, upper, ratios, costs = [], [], [], []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory(prefix="mtrain-pack-native-") as scratch:
            shard, jpegs = write_native_captions(Path(scratch), samples, repeat)
            upper.append(native_fill(shard, False, batch, max_len, batches, repeat))
            by_header.append(native_fill(shard, True, batch, max_len, batches, repeat))
            costs.append(header_and_decode_seconds(jpegs, 3))
        ratios.append(by_header[-1] / upper[-1])
    header_us = [header * 1e6 for header, _ in costs]
    decode_us = [decode * 1e6 for _, decode in costs]
    return [
        f"\nNative resolution (Qwen2-VL sizes, reference grid {NATIVE_PIXELS[1] // 28**2} tokens), max_len {max_len}, "
        f"micro-batch {batch}, captions with images of 64-900 px sides, {repeats} seeds x {batches} batches",
        f"  fill at the reference grid's upper bound  {spread(upper, 3)}",
        f"  fill at each image's own count (header)   {spread(by_header, 3)}",
        ratio_line("RATIO native fill, header counts/upper bound", ratios),
        f"  header read {spread(header_us, 1)} us/image vs full decode {spread(decode_us, 1)} us/image",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=192, help="samples per kind")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12, help="batches measured per mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--native-samples", type=int, default=96, help="native-resolution captions per seed")
    parser.add_argument("--native-max-len", type=int, default=2048)
    args = parser.parse_args()

    padded, packed, ratios = [], [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="mtrain-pack-") as scratch:
            sources = write_mix(Path(scratch), args.samples, seed=repeat, max_len=args.max_len)
            pad_fraction, _ = mean_fraction(sources, False, args.batch, args.max_len, args.batches, repeat)
            pack_fraction, _ = mean_fraction(sources, True, args.batch, args.max_len, args.batches, repeat)
        padded.append(pad_fraction)
        packed.append(pack_fraction)
        ratios.append(pack_fraction / pad_fraction)
    print(f"\nPacking, max_len {args.max_len}, micro-batch {args.batch}, caption/conversation/interleaved 0.5/0.3/0.2, "
          f"lognormal text lengths, {args.repeats} seeds x {args.batches} batches")  # fmt: skip
    print(f"  padded non-pad fraction  {spread(padded, 3)}")
    print(f"  packed non-pad fraction  {spread(packed, 3)}")
    print(ratio_line("RATIO packing/padded", ratios))
    for line in native_lines(args.native_samples, args.native_max_len, 2, args.batches, args.repeats):
        print(line)


if __name__ == "__main__":
    main()
