"""Packing: the non-pad token fraction of packed batches against padded ones, on a realistic length mix.

    python benchmarks/packing.py [--samples 192] [--max-len 512] [--batch 8] [--repeats 3]

Writes three kinds of shards with the sample writers (`data_pipeline.sample_data.write_shape_shards`),
each with text lengths drawn from a lognormal, as in real mixtures: short captions (median ~10
words), LLaVA-style conversations (lognormal number of turns) and interleaved documents (median
~120 words around one image). The same mixture is then read by mtrain's loader twice, with
`packing=False` (one sample per row, padded) and `packing=True` (`data_pipeline/packing.py`:
first-fit decreasing into rows of `max_len`), and the fraction of non-pad positions is compared.
Repetitions use different seeds (different lognormal draws), giving the min and max of the ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ratio_line, spread  # noqa: E402

from data_pipeline.loader import LoaderSettings, build_loader  # noqa: E402
from data_pipeline.packing import non_pad_fraction  # noqa: E402
from data_pipeline.sample_data import write_shape_shards  # noqa: E402
from data_pipeline.tokenize import TokenSpec  # noqa: E402
from mtrain.model.build import tiny_image_processor  # noqa: E402
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer  # noqa: E402

WORDS = "a the red green blue circle square triangle shape small large is on of with and near left right".split()
VISUAL_TOKENS = 64  # the tiny model's grid: 32 px images, 4 px patches
IMAGE_SIZE = 32


def lognormal_words(rng: random.Random, median: float, sigma: float, cap: int) -> str:
    count = max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma))))
    return " ".join(rng.choice(WORDS) for _ in range(count))


def write_mix(out: Path, samples: int, seed: int, max_len: int) -> list[tuple[str, float]]:
    """Caption, conversation and document shards; returns loader sources with mixture weights."""
    rng = random.Random(seed)
    cap = max_len - VISUAL_TOKENS - 16  # words are single tokens of the tiny tokenizer (plus spaces)
    per_shard = samples // 2

    def caption(colour: str, shape: str, jpeg: bytes) -> dict:
        return {"jpg": jpeg, "txt": lognormal_words(rng, 10, 0.6, cap // 2) + f" {colour} {shape}."}

    def conversation(colour: str, shape: str, jpeg: bytes) -> dict:
        turns = [{"from": "human", "value": "<image>\n" + lognormal_words(rng, 8, 0.5, 24)}]
        budget = cap // 2 - 40
        for _ in range(max(1, min(6, round(rng.lognormvariate(math.log(2), 0.6))))):
            answer = lognormal_words(rng, 25, 0.7, max(4, budget // 6)) + f" {colour} {shape}."
            turns += [{"from": "gpt", "value": answer}, {"from": "human", "value": lognormal_words(rng, 8, 0.5, 16)}]
        return {"json": json.dumps({"conversations": turns[:-1]}).encode(), "jpg": jpeg}

    def document(colour: str, shape: str, jpeg: bytes) -> dict:
        texts = [lognormal_words(rng, 60, 0.8, cap // 4), None, lognormal_words(rng, 60, 0.8, cap // 4)]
        return {"json": json.dumps({"texts": texts, "images": [None, "0.jpg", None]}).encode(), "0.jpg": jpeg}

    kinds = [("caption", caption, 0.5), ("conversation", conversation, 0.3), ("interleaved", document, 0.2)]
    sources = []
    for kind, members, weight in kinds:
        folder = out / kind
        write_shape_shards(folder, 2, per_shard, seed, kind, members, kind)
        sources.append((str(folder / f"{kind}-{{000000..000001}}.tar"), weight))
    return sources


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=192, help="samples per kind")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12, help="batches measured per mode")
    parser.add_argument("--repeats", type=int, default=3)
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


if __name__ == "__main__":
    main()
