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
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import IMAGE_SIZE, VISUAL_TOKENS, ratio_line, spread, write_mix  # noqa: E402

from data_pipeline.loader import LoaderSettings, build_loader  # noqa: E402
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
