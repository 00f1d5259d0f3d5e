"""Checkpoint save and load throughput against this machine's fsync write bandwidth, in one run.

    python benchmarks/checkpoint_io.py [--hidden 512 --layers 4 --dir /tmp/mtrain-ckpt-bench]

Measured side by side, in one process (1 rank, ZeRO-3, full fine-tuning of a widened tiny-llava):
  1. raw write + fsync of a file as large as the checkpoint: the machine's durable write bandwidth;
  2. DeepSpeed's own `save_checkpoint` alone (no fsync, no manifest);
  3. mtrain's crash-safe save (DeepSpeed + per-rank state + fsync + SHA-256 manifest + renames);
  4. mtrain's resume load (`engine.load_checkpoint` into a fresh engine).
Ratios, not absolute times, are the point: a save near 1.0x of the fsync bandwidth is as fast
as the disk allows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fsync_write_bandwidth(path: Path, size: int) -> float:
    """Bytes per second for writing `size` bytes and fsyncing them."""
    block = os.urandom(8 << 20)
    started = time.perf_counter()
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            handle.write(block)
            written += len(block)
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return written / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768, help="language model width")
    parser.add_argument("--layers", type=int, default=4, help="language model depth")
    parser.add_argument("--dir", default="/tmp/mtrain-ckpt-bench", help="scratch folder (removed at the end)")
    args = parser.parse_args()

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
        return initialize_engine(cfg, build_model(cfg.model, build_dtype, ds_config, cfg.run.seed), ds_config)

    import torch

    build_dtype = torch.float32
    trained = engine()
    root = scratch / "checkpoints"

    started = time.perf_counter()
    trained.save_checkpoint(str(scratch / "deepspeed-only"), tag="plain", save_latest=False)
    deepspeed_s = time.perf_counter() - started
    deepspeed_bytes = folder_bytes(scratch / "deepspeed-only" / "plain")

    meta = {"trainer": {"step": 1, "tokens_seen": 0, "samples_seen": 0}}
    rank_state = RankState(data={"batches_taken": 1}, samplers={})
    started = time.perf_counter()
    folder = save_checkpoint(trained, root, 1, meta, rank_state, dump_yaml(cfg), Retention(0, 0))
    mtrain_s = time.perf_counter() - started
    checkpoint_bytes = folder_bytes(folder)

    fsync_bps = fsync_write_bandwidth(scratch / "fsync-probe.bin", checkpoint_bytes)

    fresh = engine()
    started = time.perf_counter()
    fresh.load_checkpoint(str(root), tag=folder.name)
    load_s = time.perf_counter() - started

    mb = 1 << 20
    save_bps, load_bps, ds_bps = checkpoint_bytes / mtrain_s, checkpoint_bytes / load_s, deepspeed_bytes / deepspeed_s
    print(f"checkpoint: {checkpoint_bytes / mb:.1f} MiB in {len(list(folder.iterdir()))} files")
    print(f"fsync write bandwidth          {fsync_bps / mb:8.1f} MiB/s   1.00x")
    print(f"DeepSpeed save (no fsync)      {ds_bps / mb:8.1f} MiB/s   {ds_bps / fsync_bps:.2f}x")
    print(f"mtrain crash-safe save         {save_bps / mb:8.1f} MiB/s   {save_bps / fsync_bps:.2f}x")
    print(f"mtrain load (resume)           {load_bps / mb:8.1f} MiB/s   {load_bps / fsync_bps:.2f}x")
    print(f"crash-safety overhead: {mtrain_s / deepspeed_s:.2f}x DeepSpeed's own save time")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
