"""ZeRO-3 size defaults: mtrain's model-sized settings against DeepSpeed's defaults and threshold 0.

    python benchmarks/zero_defaults.py [--rounds 2] [--blocks 4] [--steps 5] [--widths 64 512]

mtrain fills the ZeRO-3 sizes the config leaves null from the language model's hidden size h
(mtrain/config/deepspeed_json.py `zero_sizes`). Five engines on the same model, data and moment:

  sized       mtrain's default: every zero.* size null: persistence threshold 0 (every parameter
              sharded), reduce bucket max(h^2, 5e7), prefetch bucket max(0.9h^2, 5e7) elements;
  sized_copy  the same engine built again: sized_copy / sized shows how far noise alone moves a ratio;
  hf_auto     Hugging Face's "auto" (mtrain's default before): threshold 10h, buckets h^2 and 0.9h^2;
  deepspeed   DeepSpeed's own defaults: persistence threshold 1e5, reduce and prefetch buckets 5e7;
  threshold0  threshold 0 (every parameter sharded) with DeepSpeed's 5e7 buckets.

Per width (the tiny LLaVA + LoRA of configs/tiny.yaml at model.tiny.hidden_size=64, and 8x wider),
one torchrun launch per round on 2 ranks (gloo, fp32, one thread per rank) builds the five engines
(in reverse order on odd rounds) and times them in alternating blocks of --steps optimizer steps on
the same batches (ABBA order), as scaling.py does for the threshold alone. Printed: step times per
engine, per width the ratio of the better of deepspeed and threshold0 (by median) / sized step
time (>= 1.0: the sized default is at least as fast as the best other), and hf_auto / sized.

Both tiny widths (218k and 6.6M parameters) are smaller than the 5e7 bucket floor (DeepSpeed's own
default bucket), so there the sized default builds threshold0's exact JSON: their ratio is noise, as
sized_copy / sized shows. (With a 1e7 floor, on a quiet machine, width 512 stepped 0.87x as fast as
threshold0's 5e7 buckets, min 0.78, max 1.11, while its copy read 0.98x: the floor was raised.)

Then the memory side at 7B: `mtrain plan` for the LLaVA-1.5-7B config run_all.py uses, with the
sized default, HF's auto and DeepSpeed's defaults, per-GPU GiB of each (its `replicated` line counts
the parameters that the threshold keeps whole on every GPU, `buffers` the two buckets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import (  # noqa: E402
    in_turn,
    launch_for_result,
    leave_together,
    ratio_line,
    scratch_with_shards,
    timed_engine_steps,
)

DEEPSPEED_BUCKETS = ["zero.reduce_bucket_size=50000000", "zero.prefetch_bucket_size=50000000"]
DEEPSPEED = [*DEEPSPEED_BUCKETS, "zero.param_persistence_threshold=100000"]


def hf_auto(width: int) -> list[str]:
    """Hugging Face's "auto" sizes for a hidden size `width` (mtrain's default before the sized rule)."""
    return [f"zero.param_persistence_threshold={10 * width}", f"zero.reduce_bucket_size={width * width}",
            f"zero.prefetch_bucket_size={int(0.9 * width * width)}"]  # fmt: skip


def engine_overrides(width: int) -> dict[str, list[str]]:
    """Each engine's zero.* overrides at `width`."""
    return {
        "sized": [],
        "sized_copy": [],  # the same engine again: the ratio of two identical engines is the noise floor
        "hf_auto": hf_auto(width),
        "deepspeed": DEEPSPEED,
        "threshold0": [*DEEPSPEED_BUCKETS, "zero.param_persistence_threshold=0"],
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    from mtrain.config import load_config
    from mtrain.config.deepspeed_json import deepspeed_config
    from mtrain.engine.data import build_data_loader
    from mtrain.engine.setup import initialize_engine
    from mtrain.launch.distributed import init_distributed
    from mtrain.model.build import build_model

    world = init_distributed("gloo", 300, 29500)
    base = ["optim.warmup_steps=0", "run.max_steps=1000", f"data.micro_batch_size={args.micro_batch}",
            f"model.tiny.hidden_size={args.width}"]  # fmt: skip

    def build(extra: list[str]):
        cfg = load_config(REPO / "configs/tiny.yaml", [*base, *extra])
        data = dataclasses.replace(cfg.data, shards=str(Path(args.shards) / "shard-{000000..000003}.tar"), sources=[])
        cfg = dataclasses.replace(cfg, data=data)
        ds = deepspeed_config(cfg, world_size=world.world_size, precision="fp32")
        built = build_model(cfg.model, torch.float32, ds, cfg.run.seed)
        return cfg, built, initialize_engine(cfg, built, ds, world.rank), ds["zero_optimization"]

    engines, zero = {}, {}
    settings = list(engine_overrides(args.width).items())
    # Odd rounds build (and first time) the engines in reverse: where an engine sits in the process
    # (built first or last) must not decide its speed.
    for name, extra in settings[::-1] if args.round % 2 else settings:
        cfg, built, engines[name], zero[name] = build(extra)
    loader = build_data_loader(cfg, built, world)
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    timings = {name: [timed_engine_steps(engine, batches, args.warmup)] for name, engine in engines.items()}
    names = list(engines)
    for block in range(1, args.blocks):
        for name in names if block % 2 else names[::-1]:  # ABBA: no engine always first
            timings[name].append(timed_engine_steps(engines[name], batches[args.warmup :], 0))
    leave_together(*engines.values())
    if world.rank == 0:
        sizes = {name: {key: value for key, value in z.items() if "bucket" in key or "threshold" in key}
                 for name, z in zero.items()}  # fmt: skip
        Path(args.out).write_text(json.dumps({"step_s": timings, "sizes": sizes}))


def plan_gib(folder: Path, extra: list[str]) -> dict[str, float]:
    """Per-GPU GiB lines of `mtrain plan` for the LLaVA-1.5-7B config on 8 GPUs."""
    from run_all import PLAN_OVERRIDES

    cmd = [sys.executable, "-m", "mtrain", "plan", "configs/tiny.yaml", *PLAN_OVERRIDES, f"model.path={folder}", *extra,
           "--nodes", "1", "--gpus-per-node", "8", "--text-tokens", "300"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    found = re.findall(r"^\s+(parameters|replicated|buffers|total)\s+([\d.]+) GiB", out, re.MULTILINE)
    return {name: float(value) for name, value in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="launches per width")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks of steps per engine")
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--width", type=int)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--shards")
    parser.add_argument("--out")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from run_all import llava7b_config

    from mtrain.launch.distributed import free_port

    scratch = scratch_with_shards("mtrain-zero-")
    shards = scratch / "shards"
    results: dict[int, list[dict]] = {width: [] for width in args.widths}
    for round_index in range(args.rounds):
        for width in in_turn(args.widths, round_index):
            out = scratch / f"w{width}-{round_index}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), __file__, "--worker", "--width", str(width), "--shards", str(shards),
                   "--out", str(out), "--warmup", str(args.warmup), "--blocks", str(args.blocks),
                   "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--round", str(round_index)]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'benchmarks'}", "OMP_NUM_THREADS": "1"}
            result = launch_for_result(cmd, env, out, args.verbose)
            results[width].append(result)
            steps = ", ".join(f"{name} {statistics.median(t) * 1000:.1f}" for name, t in result["step_s"].items())
            print(f"  round {round_index} width {width:4d}  median step ms: {steps}", flush=True)

    print(f"\nZeRO-3 size defaults, tiny LLaVA + LoRA (configs/tiny.yaml), fp32, 2 ranks, micro-batch {args.micro_batch}, "
          f"{args.rounds} launches x {args.blocks} alternating blocks x {args.steps} steps per width")  # fmt: skip
    for width in args.widths:
        sizes = results[width][0]["sizes"]
        print(f"  width {width}: " + "; ".join(
            f"{name} " + ", ".join(f"{key.replace('stage3_', '')}={value:.0f}" for key, value in s.items())
            for name, s in sizes.items()))  # fmt: skip
        blocks = {name: [t for r in results[width] for t in r["step_s"][name]] for name in results[width][0]["step_s"]}
        for name, times in blocks.items():
            print(f"    {name:10s} step {statistics.median(times) * 1000:7.1f} ms (min {min(times) * 1000:.1f}, "
                  f"max {max(times) * 1000:.1f})")  # fmt: skip
        # The best other by its median, compared block by block (a per-block minimum of two noisy engines
        # would pick the lucky one of each block and bias the ratio against the default).
        best = min(("deepspeed", "threshold0"), key=lambda name: statistics.median(blocks[name]))
        ratios = [b / s for s, b in zip(blocks["sized"], blocks[best], strict=True)]
        print(ratio_line(f"RATIO best other ({best}) / sized default, step time, width {width}", ratios, ">= 1.0"))
        copy = [c / s for s, c in zip(blocks["sized"], blocks["sized_copy"], strict=True)]
        print(ratio_line(f"RATIO sized copy / sized default (identical engines: the noise), width {width}", copy))
        before = [h / s for s, h in zip(blocks["sized"], blocks["hf_auto"], strict=True)]
        print(ratio_line(f"RATIO HF auto (the default before) / sized default, step time, width {width}", before))

    folder = llava7b_config(scratch / "llava-1.5-7b")
    plans = {
        "sized": plan_gib(folder, []),
        "hf_auto": plan_gib(folder, hf_auto(4096)),
        "deepspeed": plan_gib(folder, DEEPSPEED),
    }
    print("LLaVA-1.5-7B, 8 x H100 (mtrain plan, run_all's config): per-GPU GiB, sized default / HF auto / DeepSpeed: "
          + ", ".join(f"{line} " + " / ".join(f"{plan.get(line, 0):.3f}" for plan in plans.values())
                      for line in plans["sized"]))  # fmt: skip
    leanest = min(("hf_auto", "deepspeed"), key=lambda name: plans[name]["total"])
    difference = f"({plans['sized']['total'] - plans[leanest]['total']:+.3f} GiB per GPU of 80)"
    print(ratio_line(f"RATIO 7B plan per-GPU total, sized default / leanest other ({leanest})",
                     [plans["sized"]["total"] / plans[leanest]["total"]], "<= 1.01", difference))  # fmt: skip


if __name__ == "__main__":
    main()
