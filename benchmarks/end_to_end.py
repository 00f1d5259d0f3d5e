"""End to end: learned tokens per second, mtrain packed against HF Trainer padded and padding-free.

    python benchmarks/end_to_end.py [--rounds 1] [--blocks 4] [--block 8] [--samples-per-rank 16]
    python benchmarks/end_to_end.py --self-check   # LLaVA's sampler on a toy length list, no launch

What users compare: useful tokens per second on their own length mix, against the best setup the
Hugging Face stack offers them. Four sides, each a full training loop with its own data path, its
own copy of the same tiny LLaVA + LoRA (configs/tiny.yaml, seeded: the same initial weights), the
same DeepSpeed JSON (ZeRO-3, fp32) and the same optimizer, on 2 ranks (gloo, one thread per rank):

  mtrain    mtrain's Trainer over mtrain's loader with data.packing=true (rows of max_len, whole
            documents, position ids restarting per document, block-diagonal attention);
  hf_llava  transformers.Trainer as LLaVA trains: a map-style dataset that builds, tokenizes and
            preprocesses one sample per __getitem__ (PIL decode + the image processor, as LLaVA's
            LazySupervisedDataset), LLaVA's collator (right-pad to the batch's longest), and LLaVA's
            own sampler, which its scripts select with --group_by_modality_length True (see
            modality_length_grouped: megabatches of one global batch, so a rank's batch mixes lengths);
  hf_pad    the same Trainer, dataset and collator with transformers' train_sampling_strategy=
            "group_by_length" (transformers 5's name for group_by_length): megabatches of 50 batches
            sorted by length, so a batch is nearly uniform in length. A stronger padded baseline than
            LLaVA's own: packing over it gains at most the ratio of the non-pad shares (printed);
  hf_flat   the same Trainer and dataset with transformers' DataCollatorWithFlattening: the micro-batch
            concatenated into one row with position ids restarting per sample (padding-free).

Lengths for both samplers are token counts (LLaVA's `modality_lengths` counts words), negative for
a text-only sample (LLaVA's sign convention). This mix has an image in every sample (captions,
conversations and documents all carry one), so LLaVA's sampler sees one modality here.

Each round is three torchrun launches, mtrain against each HF side (two HF Trainers cannot share a
process: accelerate refuses a second Accelerator with a DeepSpeed plugin), so every ratio compares
two sides measured in the same processes at the same moment.

The data: caption, conversation and interleaved-document shards with lognormal text lengths
(common.write_mix, as benchmarks/packing.py), 0.5/0.3/0.2 by sample count. mtrain reads the shards
as a weighted mixture, the HF dataset holds every sample of them (the same composition). The global
batch is the same in samples: mtrain's micro-batch is --samples-per-rank divided by the documents a
packed row holds on this mix (measured before the launch, rounded to whole rows), and HF's micro-batch
is the samples those rows hold on average, so the sides train on about the same number of samples per
step (printed: the packer's rows vary around that mean).

Inside a launch the two sides take turns of --block optimizer steps: each side's loop runs in its own
thread and its step-end hook parks it after a block, so only one side runs at a time (in ABBA order),
and every rank issues the same collectives in the same order. The first block of each side is
warm-up. A side's block is timed from its resume to its last step's hook: data, forward, backward,
step and logging, all of its loop; each block pair gives one ratio (median, min, max over them).
Counted per side: learned tokens (labels that are trained: the token after each position is not
IGNORE) and non-pad tokens, summed over ranks; data wait (time in next(loader) for mtrain, in the
dataset's __getitem__ and the collator for HF, which run in the training thread with 0 workers),
as a share of the timed span.

Padding-free support: transformers 5 builds a block-diagonal causal mask from restarting position
ids when no attention mask is given (masking_utils.find_packed_sequence_indices, sdpa/eager/flex),
and flash-attention reads them as varlen boundaries, so LLaVA (a Llama language model) trains
padding-free with DataCollatorWithFlattening. Models that compute their own multi-axis position ids
(Qwen2-VL's mrope) were not tried here. On the CPU sdpa has no varlen kernel: the block-diagonal
mask still costs the full square of the row, and hf_flat's row is a whole micro-batch long (see
ATTENTION_NOTE, printed with the figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import in_turn, launch_for_result, leave_together, ratio_line, spread, write_mix  # noqa: E402

HF_SIDES = ("hf_llava", "hf_pad", "hf_flat")
# name: (the ratio line's label, the short one of the per-side figures, the target of mtrain's ratio over it)
LABELS = {
    "hf_llava": ("HF padded as LLaVA trains (LLaVA's modality-length sampler)", "HF padded, LLaVA's sampler", ">= 1.5"),
    "hf_pad": ("HF padded with transformers' group_by_length", "HF padded, group_by_length", ">= 1.0"),
    "hf_flat": ("HF padding-free (flattening)", "HF padding-free (flattening)", ">= 1.1"),
}
# What a side counts, summed over its blocks: tokens with a trained label, non-pad tokens, positions
# computed (padding included), samples, and seconds spent fetching data (kept last).
COUNTED = ("learned", "non_pad", "positions", "samples", "data_s")
MAX_LEN = 512
OVERRIDES = ["optim.warmup_steps=0", "logging.progress=false", f"data.max_len={MAX_LEN}"]

BASELINE_NOTE = """\
Which padded baseline: LLaVA's own sampler sorts by length only within one global batch, so a rank's
batch still mixes lengths (non-pad share {llava:.3f}); transformers' group_by_length sorts megabatches
of 50 batches, so its batches are nearly uniform ({pad:.3f}), a stronger baseline than LLaVA trains
with. At equal tokens/s per computed position, packing (share {packed:.3f}) gains at most the ratio of
the shares: {bound_llava:.2f} over LLaVA's sampler, {bound_pad:.2f} over group_by_length. The 1.5 target
is judged against the baseline LLaVA trains with; group_by_length's line against 1.0 (no slower than
the strongest padded baseline), its ceiling being that ratio of shares."""
ATTENTION_NOTE = """\
Reading the figures: tokens/s per computed position is what packing cannot change; packing raises
the non-pad share of the positions (printed per side). On the CPU, sdpa has no varlen kernel: a
block-diagonal mask still computes every score of its row. mtrain's packed rows are max_len long, so
each position pays attention over max_len, where a padded row pays over its batch's longest sample;
hf_flat's one row holds the whole micro-batch, so its attention grows with the square of the
micro-batch's tokens. On a GPU flash-attention's varlen path (model.attn_implementation=auto picks it
when it imports) computes only each document's own block, which removes both costs."""


# ── counting what each side trains on ─────────────────────────────────────────────────────────
def learned_tokens(batch: dict[str, Any]) -> int:
    """Positions whose next token is trained (labels after the causal shift, IGNORE excluded)."""
    return int((batch["labels"][..., 1:] != -100).sum())


def non_pad_tokens(batch: dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class Side:
    """One training loop run in a thread, parked after every `block` steps until resumed.

    Only the thread that holds the turn runs, so every rank issues the same collectives in the same
    order: the schedule of turns is the same on every rank.
    """

    def __init__(self, name: str, block: int) -> None:
        self.name, self.block = name, block
        self.steps = 0
        self.totals = dict.fromkeys(COUNTED, 0.0)
        self.blocks: list[dict[str, float]] = []  # per finished block: wall seconds and what COUNTED grew by
        self._resume, self._parked = threading.Event(), threading.Event()
        self._started = 0.0
        self._at_start = dict(self.totals)
        self.error: BaseException | None = None

    def count(self, batch: dict[str, Any], samples: int) -> None:
        self.totals["learned"] += learned_tokens(batch)
        self.totals["non_pad"] += non_pad_tokens(batch)
        self.totals["positions"] += batch["input_ids"].numel()
        self.totals["samples"] += samples

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with its time added to this side's data wait."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals["data_s"] += time.perf_counter() - started

        return wrapped

    def hook(self) -> None:
        """Called at every step end, in the side's thread: after a block, record it and park."""
        self.steps += 1
        if self.steps % self.block:
            return
        grown = {key: self.totals[key] - self._at_start[key] for key in COUNTED}
        self.blocks.append({"wall_s": time.perf_counter() - self._started, **grown})
        self._park()

    def _park(self) -> None:
        self._parked.set()
        self._resume.wait()
        self._resume.clear()
        self._at_start = dict(self.totals)
        self._started = time.perf_counter()

    def start(self, loop: Callable[[Callable[[], None]], None]) -> None:
        def main() -> None:
            try:
                self._resume.wait()
                self._resume.clear()
                self._started = time.perf_counter()
                loop(self.hook)
            except BaseException as error:  # noqa: BLE001 -- handed to the main thread, which raises it
                self.error = error
            finally:
                self._parked.set()

        self.thread = threading.Thread(target=main, name=self.name, daemon=True)
        self.thread.start()

    def run_turn(self) -> None:
        """Let the side run until it parks (one block) or its loop ends."""
        self._parked.clear()
        self._resume.set()
        self._parked.wait()
        if self.error is not None:
            raise RuntimeError(f"side {self.name} failed") from self.error


# ── LLaVA's sampler (--group_by_modality_length True) ────────────────────────────────────────
# mtrain's own reading of LengthGroupedSampler and get_modality_length_grouped_indices in
# haotian-liu/LLaVA, llava/train/llava_trainer.py. One difference: LLaVA shuffles within a modality
# with torch's global RNG and only the megabatch order with its generator; here one seeded generator
# draws all three, so every rank computes the same order whatever else used the global RNG (the
# mtrain side runs in the same process). The draws have the same distribution.
def even_split(indices: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """Split longest-first `indices` into `parts` of equal count and near-equal tokens (LLaVA's
    split_to_even_chunks): each goes to the part with the fewest tokens so far, a part is closed once
    it holds its share; a count that does not divide is dealt out in turn instead."""
    if len(indices) % parts:
        return [indices[part::parts] for part in range(parts)]
    share = len(indices) // parts
    chunks: list[list[int]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for index in indices:
        part = load.index(min(load))
        chunks[part].append(index)
        load[part] = math.inf if len(chunks[part]) == share else load[part] + lengths[index]
    return chunks


def length_grouped_megabatches(lengths: list[int], size: int, parts: int, generator: Any) -> list[list[int]]:
    """One modality shuffled and cut into megabatches of `size`; each sorted longest first and split
    evenly over the `parts` ranks, rank by rank (the order the data loader deals batches to ranks)."""
    import torch

    order = torch.randperm(len(lengths), generator=generator).tolist()
    megabatches = []
    for start in range(0, len(order), size):
        longest_first = sorted(order[start : start + size], key=lambda i: lengths[i], reverse=True)
        megabatches.append([i for chunk in even_split(longest_first, lengths, parts) for i in chunk])
    return megabatches


def modality_length_grouped(lengths: list[int], per_device: int, world_size: int, generator: Any) -> list[int]:
    """LLaVA's training order: image samples (length > 0) and text-only ones (length < 0) each grouped
    into megabatches of one global batch, the whole megabatches of both shuffled together, and the two
    last (partial) ones merged: a full global batch of it first, the rest at the end."""
    import torch

    if any(length == 0 for length in lengths):
        raise ValueError("a sample of length 0 has no modality: lengths are token counts, negative for text-only")
    size = per_device * world_size
    whole: list[list[int]] = []
    last: list[int] = []
    for members in ([i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n < 0]):
        if not members:  # LLaVA asserts both modalities; a mix of one (as this one) is grouped alone
            continue
        own = [abs(lengths[i]) for i in members]
        groups = [[members[i] for i in group] for group in length_grouped_megabatches(own, size, world_size, generator)]
        whole += groups[:-1]
        last += groups[-1]
    whole = [whole[i] for i in torch.randperm(len(whole), generator=generator).tolist()]
    if len(last) >= size:
        whole.insert(0, last[:size])
        last = last[size:]
    return [i for group in [*whole, last] for i in group]


def llava_sampler(lengths: list[int], per_device: int, world_size: int, seed: int):
    """A Sampler over the whole dataset in LLaVA's order, a fresh draw per epoch, the same on every rank;
    the Trainer's data loader deals its consecutive `per_device` indices to ranks in turn."""
    import torch

    class ModalityLengthSampler(torch.utils.data.Sampler):
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(seed)

        def __len__(self) -> int:
            return len(lengths)

        def __iter__(self):
            return iter(modality_length_grouped(lengths, per_device, world_size, self.generator))

    return ModalityLengthSampler()


def self_check() -> None:
    """LLaVA's order on a toy length list: a permutation, one modality per whole megabatch, ranks evened."""
    import random

    import torch

    rng = random.Random(0)
    lengths = [rng.randint(1, 400) * (1 if rng.random() < 0.8 else -1) for _ in range(203)]
    per_device, world = 4, 2
    order = modality_length_grouped(lengths, per_device, world, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths))), "not a permutation of the dataset"
    size = per_device * world
    groups = [order[start : start + size] for start in range(0, len(order), size)]
    mixed = [g for g in groups if len({lengths[i] > 0 for i in g}) > 1]
    assert len(mixed) <= 2, f"{len(mixed)} megabatches mix modalities (only the merged last ones may)"

    def imbalance(group: list[int]) -> int:
        """Tokens of rank 0's batch minus rank 1's, in absolute value."""
        return abs(sum(abs(lengths[i]) for i in group[:per_device]) - sum(abs(lengths[i]) for i in group[per_device:]))

    llava = statistics.mean(imbalance(g) for g in groups if g not in mixed and len(g) == size)
    unsorted = statistics.mean(imbalance(list(range(s, s + size))) for s in range(0, len(lengths) - size, size))
    assert llava < unsorted / 3, f"ranks' tokens not evened: {llava:.0f} apart, {unsorted:.0f} in dataset order"
    single = modality_length_grouped([abs(n) for n in lengths], per_device, world, torch.Generator().manual_seed(0))
    assert sorted(single) == list(range(len(lengths))), "one modality: not a permutation"
    print(
        f"self-check ok: {len(groups)} megabatches, {len(mixed)} mixed; ranks' tokens {llava:.0f} apart on "
        f"average ({unsorted:.0f} in dataset order)"
    )


# ── the HF side's data: LLaVA's lazy dataset and collators ────────────────────────────────────
def raw_samples(sources: list[tuple[str, float]]) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of the shards as (key, members), read with plain webdataset on every rank (LLaVA keeps
    its JSON in memory on every rank; its sampler splits the items)."""
    import webdataset as wds

    from data_pipeline.shards import expand_shards

    samples = []
    for pattern, _ in sources:
        for url in expand_shards(pattern):
            for item in wds.WebDataset(url, shardshuffle=False, nodesplitter=lambda urls: urls, empty_check=False):
                members = {k: v for k, v in item.items() if not k.startswith("__")}
                samples.append((item["__key__"], members))
    return samples


def llava_dataset(samples: list[tuple[str, dict[str, bytes]]], built: Any, rules: Any, side: Side):
    """LLaVA's LazySupervisedDataset on these samples: build, tokenize and preprocess per item."""
    import torch
    from PIL import Image

    from data_pipeline.formats import SampleFault, build_sample
    from data_pipeline.tokenize import TokenSpec, tokenize_sample

    spec = TokenSpec(built.tokenizer, built.image_token_id, MAX_LEN)

    def tokens(key: str, members: dict[str, bytes]):
        return tokenize_sample(build_sample(key, members, rules), spec, built.visual_tokens)

    class LazySupervised(torch.utils.data.Dataset):
        def __init__(self) -> None:
            # Lengths for the samplers, as LLaVA's `lengths` and `modality_lengths` (tokens only, no
            # pixels; the latter negative for a text-only sample).
            self.samples, self.lengths, self.modality_lengths = [], [], []
            for key, members in samples:
                try:
                    tokenized = tokens(key, members)
                    self.lengths.append(len(tokenized))
                    self.modality_lengths.append(len(tokenized) if tokenized.images else -len(tokenized))
                    self.samples.append((key, members))
                except SampleFault:  # mtrain's loader skips such a sample too
                    continue

        def __len__(self) -> int:
            return len(self.samples)

        @side.timed
        def __getitem__(self, index: int) -> dict[str, Any]:
            key, members = self.samples[index]
            tokenized = tokens(key, members)
            images = [Image.open(io.BytesIO(members[image.member])).convert("RGB") for image in tokenized.images]
            pixels = built.image_processor(images, return_tensors="pt")["pixel_values"]
            return {"input_ids": tokenized.input_ids, "labels": tokenized.labels, "pixel_values": pixels}

    return LazySupervised()


def padded_collator(pad_token_id: int, side: Side) -> Callable[[list[dict]], dict]:
    """LLaVA's DataCollatorForSupervisedDataset: right-pad ids and labels, mask the padding, stack images."""
    import torch

    from data_pipeline.collate import real_token_mask, right_pad

    @side.timed
    def collate(items: list[dict]) -> dict:
        lengths = [len(item["input_ids"]) for item in items]
        return {
            "input_ids": right_pad([item["input_ids"] for item in items], pad_token_id),
            "labels": right_pad([item["labels"] for item in items], -100),
            "attention_mask": real_token_mask(lengths, max(lengths)),
            "pixel_values": torch.cat([item["pixel_values"] for item in items]),
            "use_cache": False,
        }

    return collate


def flattening_collator(side: Side) -> Callable[[list[dict]], dict]:
    """transformers' DataCollatorWithFlattening for the text (one row, position ids per sample), images stacked."""
    import torch
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_position_ids=True)

    @side.timed
    def collate(items: list[dict]) -> dict:
        batch = flatten([{"input_ids": item["input_ids"], "labels": item["labels"]} for item in items])
        return {**batch, "pixel_values": torch.cat([item["pixel_values"] for item in items]), "use_cache": False}

    return collate


def hf_trainer_for(training_args, model, dataset, collator, side: Side):
    """transformers.Trainer over the dataset; counts each micro-batch it trains on, hooks the step end."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class CountingTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            if side.name == "hf_llava":  # as LLaVATrainer: its world counts accumulation steps too
                world = self.args.world_size * self.args.gradient_accumulation_steps
                return llava_sampler(dataset.modality_lengths, self.args.train_batch_size, world, self.args.seed)
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            # Lengths known up front instead of reading every item (as LLaVA passes its own).
            size = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(size, lengths=dataset.lengths)

        def training_step(self, model, inputs, num_items_in_batch=None):
            side.count(inputs, int((inputs["position_ids"] == 0).sum()) if "position_ids" in inputs else
                       inputs["input_ids"].shape[0])  # fmt: skip
            return super().training_step(model, inputs, num_items_in_batch)

    class Hook(TrainerCallback):
        def on_step_end(self, *_, **__) -> None:
            side.hook()

    return CountingTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                           callbacks=[Hook()])  # fmt: skip


# ── the mtrain side ───────────────────────────────────────────────────────────────────────────
class CountedBatches:
    """mtrain's loader with its fetch time and each batch's tokens counted for the side."""

    def __init__(self, loader: Any, side: Side) -> None:
        self.loader, self.side = loader, side
        self.fetch = side.timed(lambda: next(loader))

    def __iter__(self) -> CountedBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self.fetch()
        self.side.count(batch, len(batch["keys"]))
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def configs(args: argparse.Namespace, world_size: int):
    """The mtrain config (packed rows), the HF config (samples per micro-batch) and their DeepSpeed JSONs."""
    from mtrain.config import load_config
    from mtrain.config.deepspeed_json import deepspeed_config
    from mtrain.config.schema import DataSourceConfig

    total = args.block * (args.blocks + 1)
    common = [*OVERRIDES, f"run.max_steps={total}", f"logging.log_every={args.block}"]
    sources = [DataSourceConfig(shards=pattern, weight=weight) for pattern, weight in json.loads(args.sources)]
    cfgs = {}
    for name, overrides in (("mtrain", ["data.packing=true", f"data.micro_batch_size={args.rows}"]),
                            ("hf", [f"data.micro_batch_size={args.samples_per_rank}"])):  # fmt: skip
        cfg = load_config(REPO / "configs/tiny.yaml", [*common, *overrides])
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources))
        cfgs[name] = (cfg, deepspeed_config(cfg, world_size=world_size, precision="fp32"))
    return cfgs


def worker(args: argparse.Namespace) -> None:
    """One launch: mtrain and one HF side (`--hf-side`) in alternating blocks; rank 0 writes their counts.

    Two HF Trainers cannot share a process (accelerate refuses a second Accelerator with a DeepSpeed
    plugin), so each HF side has its own launch, each against mtrain in the same launch."""
    import torch
    from hf_trainer_step import hf_arguments

    from mtrain.engine.data import build_data_loader, sample_rules
    from mtrain.engine.setup import initialize_engine
    from mtrain.engine.trainer import Trainer
    from mtrain.launch.distributed import init_distributed
    from mtrain.metrics.sinks import NullSink
    from mtrain.model.build import build_model

    world = init_distributed("gloo", 300, 29500)
    cfgs = configs(args, world.world_size)
    (cfg_m, ds_m), (cfg_h, ds_h) = cfgs["mtrain"], cfgs["hf"]
    hf = args.hf_side
    sides = {name: Side(name, args.block) for name in ("mtrain", hf)}
    # TrainingArguments before the model: its DeepSpeed config makes the build partition (zero.Init).
    strategy = "group_by_length" if hf == "hf_pad" else "random"  # hf_llava: its own sampler (hf_trainer_for)
    hf_args = dataclasses.replace(hf_arguments(cfg_h, ds_h, cfg_m.run.max_steps), logging_steps=args.block,
                                  per_device_train_batch_size=args.samples_per_rank, train_sampling_strategy=strategy)  # fmt: skip
    built = {name: build_model(cfg_m.model, torch.float32, ds_m, cfg_m.run.seed) for name in sides}

    engine = initialize_engine(cfg_m, built["mtrain"], ds_m, world.rank)
    loader = CountedBatches(build_data_loader(cfg_m, built["mtrain"], world), sides["mtrain"])
    trainer_m = Trainer(cfg_m, world, engine, loader, NullSink(), "cpu")
    sides["mtrain"].start(lambda hook: trainer_m.train(on_step_end=lambda _: hook()))

    model = built[hf]
    dataset = llava_dataset(raw_samples(json.loads(args.sources)), model, sample_rules(cfg_h.data, model.tokenizer),
                            sides[hf])  # fmt: skip
    collate = (
        flattening_collator(sides[hf]) if hf == "hf_flat" else padded_collator(model.tokenizer.pad_token_id, sides[hf])
    )
    trainer_h = hf_trainer_for(hf_args, model.model, dataset, collate, sides[hf])
    sides[hf].start(lambda hook: trainer_h.train())

    order = list(sides)
    for turn in range(args.blocks + 2):  # warm-up, the timed blocks, then each loop's end
        for name in order if turn % 2 == args.first else order[::-1]:  # ABBA: neither side always first
            sides[name].run_turn()
    for side in sides.values():
        side.thread.join()
    result = {name: side_result(side, world.world_size) for name, side in sides.items()}
    leave_together(engine, trainer_h.deepspeed)
    if world.rank == 0:
        Path(args.out).write_text(json.dumps(result))


def side_result(side: Side, world_size: int) -> dict[str, Any]:
    """The side's timed blocks (the first is warm-up): tokens and samples summed over ranks, the slowest rank's time."""
    import torch
    import torch.distributed as dist

    timed = side.blocks[1:]
    counts = torch.tensor([[b[key] for key in COUNTED] for b in timed], dtype=torch.float64)
    wall = torch.tensor([b["wall_s"] for b in timed], dtype=torch.float64)
    dist.all_reduce(counts)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    result = {key: counts[:, index].tolist() for index, key in enumerate(COUNTED[:-1])}
    return {**result, "wall_s": wall.tolist(), "data_frac": (counts[:, -1].sum() / world_size / wall.sum()).item()}


def docs_per_row(sources: list[tuple[str, float]], rows: int, batches: int = 64) -> float:
    """Documents a packed row holds on this mix, as rank 0 of 2 packs them (mtrain's loader, one process).

    The packer fills rows first-fit decreasing from a window of documents, so rows hold few long
    documents when a window is fresh and many short ones as it drains: averaged over several windows."""
    from common import IMAGE_SIZE, VISUAL_TOKENS

    from data_pipeline.loader import LoaderSettings, build_loader
    from data_pipeline.tokenize import TokenSpec
    from mtrain.model.build import tiny_image_processor
    from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    spec = TokenSpec(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), MAX_LEN)
    from mtrain.config import load_config

    seed = load_config(REPO / "configs/tiny.yaml").run.seed  # the worker's loader seed: the same draws
    settings = LoaderSettings(sources=tuple(sources), batch_size=rows, seed=seed, packing=True)
    loader = build_loader(settings, 0, 2, spec, tiny_image_processor(IMAGE_SIZE), VISUAL_TOKENS)
    taken = [next(loader) for _ in range(batches)]
    return sum(len(b["keys"]) for b in taken) / sum(b["input_ids"].shape[0] for b in taken)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=int, default=1, help="launch pairs (mtrain with each HF side, alternating blocks)"
    )
    parser.add_argument("--blocks", type=int, default=4, help="timed blocks per side and launch, after one warm-up")
    parser.add_argument("--block", type=int, default=8, help="optimizer steps per block (a packing window: ~8)")
    parser.add_argument(
        "--samples-per-rank", type=int, default=16, help="about this many samples per rank and step (see the docstring)"
    )
    parser.add_argument("--samples", type=int, default=600, help="samples written, split 0.5/0.3/0.2 by kind")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--sources")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--hf-side", choices=HF_SIDES)
    parser.add_argument("--first", type=int, default=0, help="1: the HF side takes the first turn")
    parser.add_argument("--out")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--self-check", action="store_true", help="check LLaVA's sampler on a toy list and exit")
    args = parser.parse_args()
    if args.self_check:
        self_check()
        return
    if args.worker:
        worker(args)
        return

    from mtrain.launch.distributed import free_port

    scratch = Path(tempfile.mkdtemp(prefix="mtrain-e2e-"))
    sources = write_mix(scratch / "mix", args.samples, seed=0, max_len=MAX_LEN, proportional=True)
    per_row = docs_per_row(sources, rows=max(1, args.samples_per_rank // 3))
    rows = max(1, round(args.samples_per_rank / per_row))
    # Rows are whole: HF then takes the samples those rows hold on average, so the global batches match.
    args.samples_per_rank = max(1, round(rows * per_row))
    results: dict[str, list[dict]] = {hf: [] for hf in HF_SIDES}  # per launch: mtrain and that HF side
    for round_index in range(args.rounds):
        for hf in in_turn(HF_SIDES, round_index):
            out = scratch / f"{hf}-{round_index}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), __file__, "--worker", "--hf-side", hf, "--sources", json.dumps(sources),
                   "--rows", str(rows), "--samples-per-rank", str(args.samples_per_rank), "--blocks",
                   str(args.blocks), "--block", str(args.block), "--first", str(round_index % 2), "--out", str(out)]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'benchmarks'}", "OMP_NUM_THREADS": "1"}
            results[hf].append(launch_for_result(cmd, env, out, args.verbose))
    report(results, args, rows, per_row)


def report(results: dict[str, list[dict]], args: argparse.Namespace, rows: int, per_row: float) -> None:
    """Per side: learned and non-pad tokens/s and data wait; per HF side: mtrain's ratio over its blocks."""

    def blocks(hf: str, side: str, key: str) -> list[float]:
        return [value for launched in results[hf] for value in launched[side][key]]

    def rates(hf: str, side: str, key: str = "learned") -> list[float]:
        return [t / w for t, w in zip(blocks(hf, side, key), blocks(hf, side, "wall_s"), strict=True)]

    def share(hf: str, side: str) -> float:
        """The non-pad share of the positions the side computed."""
        return sum(blocks(hf, side, "non_pad")) / sum(blocks(hf, side, "positions"))

    print(f"\nEnd to end, tiny LLaVA + LoRA, fp32, 2 ranks ZeRO-3, max_len {MAX_LEN}, caption/conversation/interleaved "
          f"0.5/0.3/0.2 with lognormal lengths; {args.rounds} launch(es) per HF side, each mtrain and that side in "
          f"{args.blocks} alternating blocks of {args.block} steps")  # fmt: skip
    print(f"global batch: HF {args.samples_per_rank} samples per rank; mtrain {rows} packed rows per rank "
          f"({per_row:.2f} documents per row on this mix)")  # fmt: skip
    for hf in HF_SIDES:
        for side, label in (("mtrain", f"mtrain packed (vs {hf})"), (hf, LABELS[hf][1])):
            samples = sum(blocks(hf, side, "samples")) / (args.block * len(blocks(hf, side, "wall_s")))
            data = statistics.median(launched[side]["data_frac"] for launched in results[hf])
            fill = share(hf, side)
            print(f"  {label:30s} learned tok/s {spread(rates(hf, side), 0)}   non-pad tok/s "
                  f"{spread(rates(hf, side, 'non_pad'), 0)}")  # fmt: skip
            print(f"  {'':30s} samples/step {samples:.1f}   non-pad share of positions {fill:.3f}   "
                  f"data-wait fraction {data:.3f}")  # fmt: skip
    for hf in HF_SIDES:
        label, _, target = LABELS[hf]
        ratios = [m / h for m, h in zip(rates(hf, "mtrain"), rates(hf, hf), strict=True)]
        print(ratio_line(f"RATIO mtrain packed / {label} (learned tokens/s)", ratios, target))
    bound = {hf: share(hf, "mtrain") / share(hf, hf) for hf in ("hf_llava", "hf_pad")}
    shares = {
        "llava": share("hf_llava", "hf_llava"),
        "pad": share("hf_pad", "hf_pad"),
        "packed": share("hf_pad", "mtrain"),
    }
    print(BASELINE_NOTE.format(**shares, bound_llava=bound["hf_llava"], bound_pad=bound["hf_pad"]))
    print(ATTENTION_NOTE)


if __name__ == "__main__":
    main()
