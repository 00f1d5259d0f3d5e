"""Checkpoint save and load throughput against this machine's fsync write bandwidth, in one run.

    python benchmarks/checkpoint_io.py [--rounds 5] [--hidden 768 --layers 4 --dir /tmp/mtrain-ckpt-bench]

One process (1 rank, ZeRO-3, full fine-tuning of a widened tiny-llava) measures, per round and in an
order that rotates from round to round, on the same disk (all under --dir) and for the same bytes:
  1. the anchor: a write + fsync of one file as large as mtrain's checkpoint (random bytes, 8 MiB
     blocks): the disk's durable write bandwidth;
  2. DeepSpeed's own `save_checkpoint` alone (no fsync, no manifest: not crash-safe);
  3. mtrain's crash-safe save (DeepSpeed + per-rank state + checksummed manifest + fsyncs + renames);
  4. mtrain's resume load (`engine.load_checkpoint` of that save).
Before each timed side the page cache is flushed (`os.sync`, untimed), so no side pays for the dirty
pages of the one before; a first save of each kind is an untimed warm-up. Each side's bandwidth is
the bytes it wrote over its time; its ratio is against the anchor of the same round, and every
ratio is printed as the median over rounds with min and max. A save near 1.0x of the anchor is as
fast as the disk allows (target >= 0.8x for mtrain's crash-safe save).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import ratio_line  # noqa: E402

MIB = 1 << 20


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


BLOCK = os.urandom(8 * MIB)  # made before any clock starts: the anchor times the disk, not the random numbers


def write_and_fsync(path: Path, size: int) -> None:
    """The anchor: `size` bytes of random data written to one file and fsynced."""
    block = BLOCK
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            written += handle.write(block[: min(len(block), size - written)])
        handle.flush()
        os.fsync(handle.fileno())


CPU_SECONDS: dict[str, list[float]] = {}  # per side: this process's CPU time (every thread) per call


def timed(action: Callable[[Any], object], argument: Any, side: str = "") -> float:
    """Wall seconds of `action(argument)`; its CPU seconds go to CPU_SECONDS[side]."""
    os.sync()  # the previous side's dirty pages go to disk before the clock starts, not during
    started, cpu = time.perf_counter(), time.process_time()
    action(argument)
    CPU_SECONDS.setdefault(side, []).append(time.process_time() - cpu)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (each side once per round)")
    parser.add_argument("--hidden", type=int, default=768, help="language model width")
    parser.add_argument("--layers", type=int, default=4, help="language model depth")
    parser.add_argument("--dir", default="/tmp/mtrain-ckpt-bench", help="scratch folder (removed at the end)")
    args = parser.parse_args()

    import torch

    from mtrain.checkpoint.save import RankState, Retention, save_checkpoint
    from mtrain.config import dump_yaml, load_config
    from mtrain.config.deepspeed_json import deepspeed_config
    from mtrain.engine.setup import initialize_engine
    from mtrain.launch.distributed import init_distributed
    from mtrain.model.build import build_model

    scratch = Path(args.dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    cfg = load_config(
        None,
        [
            f"model.tiny.hidden_size={args.hidden}",
            f"model.tiny.num_layers={args.layers}",
            "model.tiny.num_heads=8",
            "model.freeze.vision_tower=false",
            "model.freeze.language_model=false",
            f"run.dir={scratch}",
        ],
    )
    world = init_distributed("gloo", 300, 29500)
    ds_config = deepspeed_config(cfg, world.world_size, "fp32")

    def engine():
        return initialize_engine(cfg, build_model(cfg.model, torch.float32, ds_config, cfg.run.seed), ds_config)

    trained, fresh = engine(), engine()
    root, plain, anchor = scratch / "checkpoints", scratch / "deepspeed-only", scratch / "anchor.bin"
    meta = {"trainer": {"step": 0, "tokens_seen": 0, "samples_seen": 0}}
    rank_state = RankState(data={"batches_taken": 1}, samplers={})
    config_yaml = dump_yaml(cfg)  # the trainer has it at hand; not part of the save

    def mtrain_save(step: int) -> Path:
        return save_checkpoint(trained, root, step, meta, rank_state, config_yaml, Retention(0, 0))

    def deepspeed_save(tag: str) -> None:
        trained.save_checkpoint(str(plain), tag=tag, save_latest=False)

    # Warm-up: one untimed save of each kind; its size is the anchor's.
    checkpoint_bytes = folder_bytes(mtrain_save(0))
    deepspeed_save("warmup")
    deepspeed_bytes = folder_bytes(plain / "warmup")
    files = len(list((root / "step_00000000").iterdir()))
    print(
        f"checkpoint: {checkpoint_bytes / MIB:.1f} MiB in {files} files (DeepSpeed alone: {deepspeed_bytes / MIB:.1f} MiB)"
    )

    actions: dict[str, Callable[[int], object]] = {
        "fsync write": lambda step: write_and_fsync(anchor, checkpoint_bytes),
        "DeepSpeed save": lambda step: deepspeed_save(f"round{step}"),
        "mtrain save": mtrain_save,
    }
    sides = list(actions)
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    load_seconds: list[float] = []
    for round_ in range(args.rounds):
        step = round_ + 1
        order = sides[round_ % 3 :] + sides[: round_ % 3]
        for side in order:
            seconds[side].append(timed(actions[side], step, side))
        load_seconds.append(timed(lambda tag: fresh.load_checkpoint(str(root), tag=tag), f"step_{step:08d}"))
        anchor.unlink()
        shutil.rmtree(plain / f"round{step}")
        shutil.rmtree(root / f"step_{step:08d}")
        bandwidth = {
            "fsync write": checkpoint_bytes / seconds["fsync write"][-1],
            "DeepSpeed save": deepspeed_bytes / seconds["DeepSpeed save"][-1],
            "mtrain save": checkpoint_bytes / seconds["mtrain save"][-1],
        }
        print(
            f"round {round_} ({' -> '.join(order)}): "
            + ", ".join(f"{side} {value / MIB:.0f} MiB/s" for side, value in bandwidth.items())
        )

    def ratios(side: str, size: int) -> list[float]:
        return [(size / s) / (checkpoint_bytes / a) for s, a in zip(seconds[side], seconds["fsync write"], strict=True)]

    median_ms = {side: 1000 * statistics.median(values) for side, values in seconds.items()}
    median_cpu = {side: 1000 * statistics.median(CPU_SECONDS[side]) for side in sides}
    print(f"\nmedian times over {args.rounds} rounds: " + ", ".join(f"{k} {v:.0f} ms" for k, v in median_ms.items()))
    print("median CPU time (all threads): " + ", ".join(f"{k} {v:.0f} ms" for k, v in median_cpu.items()))
    print(ratio_line("fsync write bandwidth", [1.0] * args.rounds))
    print(ratio_line("DeepSpeed save (no fsync)", ratios("DeepSpeed save", deepspeed_bytes)))
    print(ratio_line("mtrain crash-safe save", ratios("mtrain save", checkpoint_bytes), target=">= 0.8"))
    load = [
        (checkpoint_bytes / s) / (checkpoint_bytes / a)
        for s, a in zip(load_seconds, seconds["fsync write"], strict=True)
    ]
    print(ratio_line("mtrain load (resume)", load))
    overhead = [m / d for m, d in zip(seconds["mtrain save"], seconds["DeepSpeed save"], strict=True)]
    print(ratio_line("crash-safety overhead (time vs DeepSpeed's own save)", overhead))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
