"""Real scanned digits as mtrain shards: the data step of the budget-curve experiments.

scikit-learn ships 1,797 real 8x8 grey scans of handwritten digits (UCI optdigits). This script
takes a fixed stratified held-out split, upscales every scan to the tiny model's input size,
writes the documented inputs of `mtrain data build` (a LLaVA conversation JSON with an image
folder, and a pair JSONL) and builds the shards with `mtrain data build`:

    data/digits/conversation/{train,heldout}/   "Which digit is this?" -> "seven"
    data/digits/pairs/{train,heldout}/          image -> "a handwritten seven"

    python benchmarks/budget_curves/prepare_digits.py [--out data/digits]

Nothing is synthetic: every image is a real scan, and every text only names its label.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "<image>\nWhich digit is this?"
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
IMAGE_SIDE = 32  # the tiny-llava preset's input size (CLIP 32 px, patch 4: an 8x8 token grid)
SHARD_SIZE = "256KB"  # several shards per split, so both ranks read from more than one


def caption(label: int) -> str:
    return f"a handwritten {DIGIT_NAMES[label]}"


def scan_to_image(scan: np.ndarray, side: int) -> Image.Image:
    """Dark ink on white, upscaled bicubically from 8x8 (values 0..16) to `side` pixels, as RGB."""
    grey = (255 - scan.astype(np.float32) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((side, side), Image.BICUBIC).convert("RGB")


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """A fixed stratified split: the same held-out scans on every machine and every run."""
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    train, heldout = train_test_split(
        np.arange(len(labels)), test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return {"train": np.sort(train), "heldout": np.sort(heldout)}


def write_inputs(out: Path, side: int) -> dict[str, int]:
    """PNG scans plus, per split, a LLaVA conversation JSON and a pair JSONL; returns split sizes."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()
    raw = out / "raw"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, indices in split_indices(digits.target).items():
        conversations, pairs = [], []
        for index in indices:
            label = int(digits.target[index])
            name = f"digit-{index:04d}.png"
            scan_to_image(digits.images[index], side).save(raw / "images" / name)
            conversations.append(
                {
                    "id": f"{index:04d}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": QUESTION},
                        {"from": "gpt", "value": DIGIT_NAMES[label]},
                    ],
                }
            )
            pairs.append({"query_image": f"images/{name}", "positive_text": caption(label)})
        (raw / f"conversation_{split}.json").write_text(json.dumps(conversations, indent=0))
        (raw / f"pairs_{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        sizes[split] = len(indices)
    return sizes


def build(out: Path) -> None:
    """Run `mtrain data build` on each documented input."""
    raw = out / "raw"
    for split in SPLITS:
        commands = [
            ["conversation", str(raw / f"conversation_{split}.json"), "--images", str(raw / "images"),
             "--out", str(out / "conversation" / split)],
            ["pair", str(raw / f"pairs_{split}.jsonl"), "--out", str(out / "pairs" / split)],
        ]  # fmt: skip
        for command in commands:
            subprocess.run(
                [sys.executable, "-m", "mtrain", "data", "build", *command, "--shard-size", SHARD_SIZE], check=True
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/digits", help="output folder (default data/digits)")
    parser.add_argument("--image-side", type=int, default=IMAGE_SIDE, help="upscaled side in pixels")
    args = parser.parse_args(argv)
    out = Path(args.out)
    sizes = write_inputs(out, args.image_side)
    print(f"digits: {sizes['train']} train and {sizes['heldout']} held-out scans at {args.image_side} px in {out}/raw")
    build(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
