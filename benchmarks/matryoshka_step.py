"""All-scale M3 step: mtrain's one-pass executor against a naive loop over scales, and the FLOP-ideal.

Run:  python benchmarks/matryoshka_step.py [--rounds 5] [--steps 4]
It starts itself under torchrun with 2 ranks (real ZeRO-3, every parameter sharded), builds the
same tiny model three times, and times, side by side in alternating rounds on one fixed batch:

  one_pass   mtrain's executor: vision tower once, all scale variants packed into one LM pass;
  naive      a Python loop of full forward/backward passes, one per scale (gradients accumulated);
  plain      an ordinary full-grid step (no Matryoshka), used to price one token.

FLOP-ideal time = plain step time x (LM tokens all scales need) / (LM tokens of the plain step):
the cost of exactly the tokens needed, at the plain step's efficiency.
Printed: median step times, and the ratios naive/one_pass (target >= 1.5) and one_pass/ideal
(target <= 1.15), each judged by its median and shown with its min and max over rounds.

Then the scales sweep (--sweep-widths, default 64 and 512: the tiny width and 8x wider): the cost
of a one-pass step follows its tokens, not its number of scales. A 12x12 grid (48 px images, patch
4) allows five M3 scales; for 1 to 5 of them (full grid first, then ever smaller ones added:
[144], [36,144], ... [1,4,16,36,144]) one engine per count steps the same batch, beside a plain
full-grid engine that prices a token; the FLOP-ideal of k scales is plain x tokens(k)/tokens(plain).
Each line: one_pass/ideal at k scales and that width (target <= 1.15), over alternating rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import leave_together, ratio_line  # noqa: E402

SCALES = "[1,4,16,64]"
# The sweep: a 12x12 grid (48 px, patch 4) pools to 5 square scales; k scales take the k largest.
SWEEP_GRID_SCALES = [144, 36, 16, 4, 1]
SWEEP_IMAGE = ["model.tiny.image_size=48", "data.max_len=192"]


def relaunch_under_torchrun(argv: list[str]) -> int:
    from mtrain.launch.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, *argv]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.call(cmd, env=env)


def build_engine(overrides: list[str], world_rank: int):
    from mtrain.config import load_config
    from mtrain.config.deepspeed_json import deepspeed_config
    from mtrain.engine.setup import initialize_engine
    from mtrain.model.build import build_model

    cfg = load_config(REPO / "configs/tiny.yaml", ["zero.param_persistence_threshold=0", *overrides])
    ds = deepspeed_config(cfg, world_size=2, precision="fp32")
    built = build_model(cfg.model, __import__("torch").float32, ds, cfg.run.seed, cfg.matryoshka.tokens)
    return cfg, built, initialize_engine(cfg, built, ds, world_rank)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shards", help="folder of sample shards (written once before the ranks start)")
    parser.add_argument("--sweep-widths", type=int, nargs="*", default=[64, 512], help="widths of the scales sweep")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        from data_pipeline.sample_data import write_sample_shards

        shards = args.shards or tempfile.mkdtemp(prefix="mtrain-bench-")
        write_sample_shards(shards, num_shards=2, samples_per_shard=32)
        raise SystemExit(relaunch_under_torchrun([*sys.argv[1:], "--shards", shards]))

    import torch.distributed as dist

    from mtrain.engine.data import build_data_loader
    from mtrain.launch.distributed import init_distributed

    world = init_distributed("gloo", 300, 29500)
    matryoshka = [
        "matryoshka.tokens.mode=m3",
        f"matryoshka.tokens.scales={SCALES}",
        f"data.micro_batch_size={args.batch}",
    ]
    engines = {
        "one_pass": build_engine([*matryoshka, "matryoshka.tokens.layout=packed"], world.rank),
        # The naive loop accumulates one backward per scale before the optimizer steps.
        "naive": build_engine([*matryoshka, "optim.grad_accum_steps=4"], world.rank),
        "plain": build_engine([f"data.micro_batch_size={args.batch}"], world.rank),
    }
    cfg, built, _ = engines["plain"]
    shards = Path(args.shards)
    data = dataclasses.replace(cfg.data, shards=str(Path(args.shards) / "shard-{000000..000001}.tar"), sources=[])
    batch = next(build_data_loader(dataclasses.replace(cfg, data=data), built, world))
    scales = [int(s) for s in SCALES.strip("[]").split(",")]

    def step(name: str) -> int:
        """One optimizer step; returns the language-model tokens it processed."""
        engine = engines[name][2]
        if name == "naive":
            tokens = 0
            for scale in scales:
                loss, metrics = engine(batch, scales=[scale])
                engine.backward(loss / len(scales))
                engine.step()
                tokens += int(metrics["tokens"])
            return tokens
        loss, metrics = engine(batch)
        engine.backward(loss)
        engine.step()
        return int(metrics["tokens"])

    timings: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, int] = {}
    for name in engines:
        tokens[name] = step(name)  # warm-up: traces ZeRO-3 prefetch, allocates optimizer state
    for round_index in range(args.rounds):
        order = list(engines)[round_index % 3 :] + list(engines)[: round_index % 3]
        for name in order:
            dist.barrier()
            started = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            timings[name].append((time.perf_counter() - started) / args.steps)
    swept = {width: sweep(width, args, world, shards) for width in args.sweep_widths}
    leave_together(
        *(engine for _, _, engine in engines.values()), *(e for w in swept.values() for e in w.pop("engines"))
    )
    if world.rank != 0:
        return
    median = {name: statistics.median(values) for name, values in timings.items()}
    naive_ratio = [n / o for n, o in zip(timings["naive"], timings["one_pass"], strict=True)]
    # Tokens all scales need: the one-pass step's real (unpadded) LM tokens.
    ideal = [p * tokens["one_pass"] / tokens["plain"] for p in timings["plain"]]
    ideal_ratio = [o / i for o, i in zip(timings["one_pass"], ideal, strict=True)]
    print(f"\nM3 step, scales {SCALES}, micro-batch {args.batch}, 2 ranks ZeRO-3 (all parameters sharded), "
          f"{args.rounds} rounds x {args.steps} steps")  # fmt: skip
    print(
        f"LM tokens per step: one_pass {tokens['one_pass']}, naive {tokens['naive']}, plain (full grid) {tokens['plain']}"
    )
    for name in engines:
        print(f"  {name:9s} median step {median[name] * 1000:8.1f} ms")
    print(
        f"  ideal     median step {statistics.median(ideal) * 1000:8.1f} ms  (plain x {tokens['one_pass']}/{tokens['plain']} tokens)"
    )
    print(ratio_line("naive / one_pass", naive_ratio, ">= 1.5"))
    print(ratio_line("one_pass / ideal", ideal_ratio, "<= 1.15"))
    if swept:
        print(f"\nM3 scales sweep: one-pass step against the FLOP-ideal as scales are added; 12x12 grid, micro-batch "
              f"{args.batch}, 2 ranks ZeRO-3, {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    for width, result in swept.items():
        plain = result["plain"]
        print(
            f"  width {width}: plain (full grid) {statistics.median(plain) * 1000:.1f} ms for {result['tokens']['plain']} LM tokens"
        )
        for count in range(1, len(SWEEP_GRID_SCALES) + 1):
            name = f"k{count}"
            ideal = [p * result["tokens"][name] / result["tokens"]["plain"] for p in plain]
            ratios = [o / i for o, i in zip(result[name], ideal, strict=True)]
            scales = sorted(SWEEP_GRID_SCALES[:count])
            label = f"one_pass / ideal, width {width}, {count} scale{'s' if count > 1 else ''} {scales}"
            note = f"({statistics.median(result[name]) * 1000:.1f} ms, {result['tokens'][name]} LM tokens)"
            print(ratio_line(label, ratios, "<= 1.15", note))


def sweep(width: int, args: argparse.Namespace, world, shards: Path) -> dict:
    """One-pass steps at 1..5 M3 scales and a plain step at `width`, in alternating rounds on one batch."""
    import torch.distributed as dist

    from mtrain.engine.data import build_data_loader

    base = [*SWEEP_IMAGE, f"model.tiny.hidden_size={width}", f"data.micro_batch_size={args.batch}"]
    engines = {"plain": build_engine(base, world.rank)}
    for count in range(1, len(SWEEP_GRID_SCALES) + 1):
        scales = ",".join(str(s) for s in sorted(SWEEP_GRID_SCALES[:count]))
        overrides = [*base, "matryoshka.tokens.mode=m3", f"matryoshka.tokens.scales=[{scales}]",
                     "matryoshka.tokens.layout=packed"]  # fmt: skip
        engines[f"k{count}"] = build_engine(overrides, world.rank)
    cfg, built, _ = engines["plain"]
    data = dataclasses.replace(cfg.data, shards=str(shards / "shard-{000000..000001}.tar"), sources=[])
    batch = next(build_data_loader(dataclasses.replace(cfg, data=data), built, world))

    def step(name: str) -> int:
        engine = engines[name][2]
        loss, metrics = engine(batch)
        engine.backward(loss)
        engine.step()
        return int(metrics["tokens"])

    result: dict = {"tokens": {name: step(name) for name in engines}}  # warm-up
    result.update({name: [] for name in engines})
    names = list(engines)
    for round_index in range(args.rounds):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            dist.barrier()
            started = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            result[name].append((time.perf_counter() - started) / args.steps)
    result["engines"] = [engine for _, _, engine in engines.values()]
    return result


if __name__ == "__main__":
    main()
