"""A simple replay-resumable stream of tar samples, used by the (query, positive) pair data.

The staged loader (loader.py) serves captions, documents and conversations; pair batches still
flow through this older, smaller stream until they are folded into it.

Its stages:

    shard list ──► shuffle by (seed, epoch) ──► split by rank ──► split by worker
        ──► read tar, group members by key ──► safe decode (PIL / json / txt, never pickle)
        ──► build sample ──► preprocess image ──► tokenize (<image> -> N visual tokens)
        ──► mask labels ──► batch + collate

Each stage is a small function over an iterator, composed in `ReplayStream.__iter__`. The
stream repeats epochs forever; the trainer decides how many batches to take, so every rank
takes the same number and none waits at an epoch end.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.collate import real_token_mask, right_pad
from data_pipeline.formats import IMAGE_PLACEHOLDER
from data_pipeline.tokenize import IGNORE_INDEX

SAFE_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class TextSpec:
    """How text becomes token ids: the tokenizer and the visual-token expansion of `<image>`."""

    tokenizer: Any
    image_token_id: int
    visual_tokens: int
    max_len: int
    prompt: str


# ── stage 1: shard list ───────────────────────────────────────────────────────────────────────
def expand_shards(pattern: str) -> list[str]:
    """Brace patterns and `::`-separated lists to a flat list of shard URLs."""
    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"data.shards={pattern!r} names no shards")
    return urls


# ── stage 2: deterministic shuffle ────────────────────────────────────────────────────────────
def shuffle_shards(urls: list[str], seed: int, epoch: int) -> list[str]:
    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


# ── stage 3: split by rank, then by worker ────────────────────────────────────────────────────
def split_shards(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    consumers = world_size * num_workers
    if len(urls) < consumers:
        raise ValueError(
            f"{len(urls)} shards cannot feed {world_size} ranks x {num_workers} workers; "
            "write more, smaller shards or lower data.num_workers"
        )
    return urls[rank::world_size][worker::num_workers]


# ── stage 4: tar read and key grouping (webdataset) ───────────────────────────────────────────
def read_tar_groups(urls: list[str]) -> Iterator[dict[str, Any]]:
    import webdataset as wds  # noqa: PLC0415

    yield from wds.tarfile_to_samples()(iter([{"url": url} for url in urls]))


# ── stage 5: safe decode ──────────────────────────────────────────────────────────────────────
def safe_decode(group: dict[str, Any]) -> dict[str, Any]:
    """Decode images, json and text; every other member stays raw bytes, so nothing unpickles."""
    import json  # noqa: PLC0415

    decoded: dict[str, Any] = {}
    for name, value in group.items():
        extension = name.rsplit(".", 1)[-1].lower()
        if name.startswith("__"):
            decoded[name] = value
        elif extension in SAFE_IMAGE_EXTENSIONS:
            image = Image.open(io.BytesIO(value))
            decoded[name] = image.convert("RGB")
        elif extension == "json":
            decoded[name] = json.loads(value)
        elif extension in ("txt", "text"):
            decoded[name] = value.decode("utf-8")
        else:
            decoded[name] = value
    return decoded


# ── stage 6: build sample ─────────────────────────────────────────────────────────────────────
def build_caption_sample(decoded: dict[str, Any]) -> dict[str, Any]:
    image = next((decoded[ext] for ext in SAFE_IMAGE_EXTENSIONS if ext in decoded), None)
    if image is None or "txt" not in decoded:
        raise ValueError(f"sample {decoded.get('__key__')!r} is not a caption pair (needs an image and .txt)")
    return {"key": decoded["__key__"], "image": image, "caption": decoded["txt"].strip()}


# ── stage 7: image preprocessing ──────────────────────────────────────────────────────────────
def preprocess_image(image_processor: Any, image: Image.Image) -> torch.Tensor:
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


# ── stages 8 and 9: tokenize with <image> expanded, mask labels ───────────────────────────────
def tokenize_caption(spec: TextSpec, caption: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt with visual tokens, then caption + EOS; only the caption is learned."""
    tokenizer = spec.tokenizer
    prompt_ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pieces = spec.prompt.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if piece:
            prompt_ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if i < len(pieces) - 1:
            prompt_ids += [spec.image_token_id] * spec.visual_tokens
    caption_ids = tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= spec.max_len:
        raise ValueError(
            f"the prompt alone takes {len(prompt_ids)} tokens (visual tokens included), over data.max_len={spec.max_len}"
        )
    input_ids = (prompt_ids + caption_ids)[: spec.max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + caption_ids)[: spec.max_len]
    return input_ids, labels


# ── stage 10: batch and collate ───────────────────────────────────────────────────────────────
def collate(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad to the longest sequence; padding is masked out of attention and labels."""
    lengths = [len(s["input_ids"]) for s in samples]
    return {
        "input_ids": right_pad([s["input_ids"] for s in samples], pad_token_id),
        "attention_mask": real_token_mask(lengths, max(lengths)),
        "labels": right_pad([s["labels"] for s in samples], IGNORE_INDEX),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "keys": [s["key"] for s in samples],
    }


def shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle with a bounded buffer."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


class ReplayStream(IterableDataset):
    """Endless stream of collated batches for one rank: caption pairs here, (query, positive) pairs in PairStream.

    The stream is a pure function of (seed, rank, worker, epoch): shuffling uses generators
    seeded by those alone. So a resume only needs the number of batches already taken:
    `resume_batches` makes each worker skip its share of them, reading tar members but
    decoding nothing it skips.
    """

    def __init__(
        self,
        shards: str,
        rank: int,
        world_size: int,
        batch_size: int,
        text: TextSpec,
        image_processor: Any,
        seed: int,
        shuffle_buffer: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.urls = expand_shards(shards)
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.text = text
        self.image_processor = image_processor
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resume_batches = 0
        # Validate the split now, in the parent, so a bad setting fails before workers start.
        split_shards(self.urls, rank, world_size, 0, max(1, num_workers))

    def raw_groups(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Undecoded tar groups of this rank and worker, epoch after epoch, shuffled."""
        for epoch in itertools.count():
            urls = shuffle_shards(self.urls, self.seed, epoch)
            urls = split_shards(urls, self.rank, self.world_size, worker, num_workers)
            rng = random.Random(f"{self.seed}/{self.rank}/{worker}/{epoch}")
            yield from shuffled(read_tar_groups(urls), self.shuffle_buffer, rng)

    def make_sample(self, group: dict[str, Any]) -> dict[str, Any]:
        sample = build_caption_sample(safe_decode(group))
        input_ids, labels = tokenize_caption(self.text, sample["caption"])
        return {
            "key": sample["key"],
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": preprocess_image(self.image_processor, sample["image"]),
        }

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.text.tokenizer.pad_token_id)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers in turn, always starting with worker 0.
        # Batch b belongs to logical worker b % W; after `resume_batches`, the next batch is
        # logical worker resume % W's, so worker process p plays logical worker (p + resume) % W.
        worker = (worker + self.resume_batches) % num_workers
        skip = len(range(worker, self.resume_batches, num_workers)) * self.batch_size
        batch: list[dict[str, Any]] = []
        for group in itertools.islice(self.raw_groups(worker, num_workers), skip, None):
            batch.append(self.make_sample(group))
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []


class ResumableLoader:
    """Iterator of batches over a stream, counting what the trainer took, with state_dict()."""

    def __init__(self, stream: ReplayStream, num_workers: int) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.batches_taken = 0
        self._batches: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._batches is None:
            self.stream.resume_batches = self.batches_taken
            # An own generator: without it, creating the iterator draws from the global torch RNG,
            # so a resumed run (which creates it later) would drift from an uninterrupted one.
            loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                generator=torch.Generator().manual_seed(self.stream.seed),
            )
            self._batches = iter(loader)
        batch = next(self._batches)
        self.batches_taken += 1
        return batch

    def metrics(self) -> dict[str, float]:
        """No counters of its own: a sample it cannot read fails the run."""
        return {}

    def state_dict(self) -> dict[str, int]:
        return {
            "batches_taken": self.batches_taken,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, all_ranks: list[dict[str, int]]) -> None:
        """Resume from every saved rank's state (index = saved rank); this rank takes its own entry."""
        if self._batches is not None:
            raise RuntimeError("load the loader state before taking the first batch")
        if len(all_ranks) != self.stream.world_size:
            raise ValueError(
                f"the saved data position was taken by {len(all_ranks)} ranks and this run has "
                f"{self.stream.world_size}; this loader cannot re-partition it"
            )
        state = all_ranks[self.stream.rank]
        if state["num_workers"] != self.num_workers:
            raise ValueError(
                f"the saved data position was taken with num_workers={state['num_workers']}; "
                f"this run has {self.num_workers}"
            )
        self.batches_taken = state["batches_taken"]
