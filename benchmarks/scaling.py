"""Scaling: step time and per-rank peak memory at world size 1 against 2 on the same global batch.

    python benchmarks/scaling.py [--rounds 2] [--warmup 2] [--blocks 4] [--steps 6] [--global-batch 8]

mtrain's tiny LLaVA (configs/tiny.yaml: LoRA, ZeRO-3, fp32) on the sample shards, each world size in
its own torchrun launch, alternating within every round:

  ws1   1 rank,  micro-batch = global batch, OMP_NUM_THREADS=1;
  ws2   2 ranks, micro-batch = global / 2,   OMP_NUM_THREADS=1 per rank (one core each); this launch
        builds a second engine with zero.param_persistence_threshold=0 (every parameter, however
        small, partitioned) and times the two engines in alternating blocks of steps on the same
        batches, so the threshold comparison shares processes, data and moment.

One thread per rank, so each rank computes on one core (two threads on a 2-core machine shared with
other jobs oversubscribe it and make ws1 erratic). With free communication ws2 would take half of
ws1's step time (ratio 0.50: half the samples per rank, one core each); what it exceeds that by is
ZeRO-3's all-gather / reduce-scatter over gloo and the partition bookkeeping.
Peak RSS is `ru_maxrss` of each rank after the timed steps. `--profile DIR` writes cProfile stats
of the first timed block per setting, engine and rank.

What the persistence threshold changes -- read in deepspeed/runtime/zero/ and seen with --profile:
every one of the tiny LLaVA's 77 parameters has <= 1e5 elements, so at the default threshold all
are "persistent" (ds_persist) and none is gathered in forward or backward. They are still
partitioned at every optimizer step (stage3.py `step` -> `_partition_all_parameters` ->
`release_and_reset_all`), then gathered back in `_post_step` through
`Init._all_gather(..., async_op=False)` -> `_allgather_params_coalesced`, which despite its name
issues one blocking `all_gather_into_tensor` per parameter: 77 small gloo collectives per step,
the 64 frozen parameters included (their values never change). At threshold 0 the parameter
coordinator fetches modules through the prefetch path instead; with the prefetch bucket (5e7
elements) larger than the whole model and stage3_max_reuse_distance (1e9) keeping gathered
parameters alive from forward to backward, that is one flat all-gather of the whole model per
step (6 all_gather calls in 6 steps against 462 at the default). The bytes are the same (the
whole model, 218k elements); what differs is 77 blocking round trips against one. Profiled (both
engines in one ws2 launch, cProfile-inflated times): at the default `_post_step` takes 73 ms of a
312 ms step and `release_and_reset_all` 19 ms; at threshold 0 `_post_step` takes 0 ms and
`release_and_reset_all` 4 ms, of a 246 ms step. Timed in alternating blocks inside one launch, the
ratio is steady (about 0.8x); timed as separate launches, as this script once did, launch-to-launch
noise on the shared machine swung it from 0.76x to 1.20x between two runs. On a real model the
persistent set is only norms and biases (a small share of the bytes) but not few of them: about
310 for LLaVA-1.5-7B at 1e5 or at HF's 10h, so 310 collectives after every step that nothing
overlaps. On NCCL each costs tens of microseconds (launch, DeepSpeed's per-parameter Python and
the latency of a small all-gather): an estimated 5-20 ms of a step near one second, where this
CPU/gloo setting magnifies it to tens of percent. mtrain's sized default is threshold 0
(mtrain/config/deepspeed_json.py `zero_sizes`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
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
    spread,
    timed_engine_steps,
)

PERSISTENCE_NOTE = """\
threshold=0 against the default (1e5) -- see this script's docstring: all 77 parameters of the
tiny model are below 1e5 elements, so at the default all are persistent: DeepSpeed re-partitions
them at every step and gathers them back in _post_step with one blocking all_gather per
parameter (77 gloo collectives per step, frozen ones included). At threshold 0 the prefetch path
gathers the whole model in one flat all_gather per step and keeps it through backward (prefetch
bucket and max reuse distance exceed the model). Same bytes, 77 collectives against 1."""

SETTINGS = {"ws1": 1, "ws2": 2}  # name: ranks (one thread each)
# DeepSpeed's own defaults, which the analysis above is about (mtrain's defaults are sized to the hidden size).
DEEPSPEED_SIZES = ["zero.reduce_bucket_size=50000000", "zero.prefetch_bucket_size=50000000"]
# The engines a launch times in alternating blocks: name -> config overrides. ws1 times the first.
ENGINES = {
    "default": [*DEEPSPEED_SIZES, "zero.param_persistence_threshold=100000"],
    "threshold0": [*DEEPSPEED_SIZES, "zero.param_persistence_threshold=0"],
}


def launch(name: str, args: argparse.Namespace, out: Path) -> dict:
    from mtrain.launch.distributed import free_port

    ranks = SETTINGS[name]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), __file__, "--worker", "--shards", args.shards, "--out", str(out),
           "--warmup", str(args.warmup), "--blocks", str(args.blocks), "--steps", str(args.steps),
           "--micro-batch", str(args.global_batch // ranks)]  # fmt: skip
    if args.profile:
        cmd += ["--profile", str(Path(args.profile) / name)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return launch_for_result(cmd, env, out, args.verbose)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from mtrain.config import load_config
    from mtrain.config.deepspeed_json import deepspeed_config
    from mtrain.engine.data import build_data_loader
    from mtrain.engine.setup import initialize_engine
    from mtrain.launch.distributed import init_distributed
    from mtrain.model.build import build_model

    world = init_distributed("gloo", 300, 29500)

    def build(extra: list[str]):
        overrides = ["optim.warmup_steps=0", "run.max_steps=1000", f"data.micro_batch_size={args.micro_batch}"]
        cfg = load_config(REPO / "configs/tiny.yaml", [*overrides, *extra])
        data = dataclasses.replace(cfg.data, shards=str(Path(args.shards) / "shard-{000000..000003}.tar"), sources=[])
        cfg = dataclasses.replace(cfg, data=data)
        ds = deepspeed_config(cfg, world_size=world.world_size, precision="fp32")
        built = build_model(cfg.model, torch.float32, ds, cfg.run.seed)
        return cfg, built, initialize_engine(cfg, built, ds, world.rank)

    def profile_to(name: str) -> Path | None:
        return Path(f"{args.profile}-{name}-rank{world.rank}.prof") if args.profile else None

    names = list(ENGINES) if world.world_size > 1 else ["default"]
    cfg, built, engine = build(ENGINES["default"])
    loader = build_data_loader(cfg, built, world)
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    steady = batches[args.warmup :]
    timings = {"default": [timed_engine_steps(engine, batches, args.warmup, profile_to("default"))]}
    # Peak RSS of one engine, before a second engine shares the process.
    rss_mb = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    engines = {"default": engine}
    for name in names[1:]:
        engines[name] = build(ENGINES[name])[2]
        timings[name] = [timed_engine_steps(engines[name], batches, args.warmup, profile_to(name))]
    for block in range(1, args.blocks):
        for name in names if block % 2 else names[::-1]:  # ABBA: neither engine always runs first
            timings[name].append(timed_engine_steps(engines[name], steady, 0))
    gathered = [torch.zeros(1) for _ in range(world.world_size)]
    dist.all_gather(gathered, rss_mb)
    if world.rank == 0:
        step_s = {name: sum(values) / len(values) for name, values in timings.items()}
        Path(args.out).write_text(json.dumps({"step_s": step_s, "rss_mb": [float(r) for r in gathered]}))
    leave_together(*engines.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks of steps per engine")
    parser.add_argument("--steps", type=int, default=6, help="steps per block")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--shards")
    parser.add_argument("--out")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--profile",
        help="folder for per-rank cProfile stats of each engine's first block (<setting>-<engine>-rank<r>.prof)",
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    scratch = scratch_with_shards("mtrain-scaling-")
    args.shards = str(scratch / "shards")
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        for name in in_turn(SETTINGS, round_index):
            result = launch(name, args, scratch / f"{name}-{round_index}.json")
            results[name].append(result)
            steps = ", ".join(f"{engine} {s * 1000:.1f}" for engine, s in result["step_s"].items())
            print(f"  round {round_index} {name}  step ms: {steps}; "
                  f"peak RSS per rank {', '.join(f'{r:.0f}' for r in result['rss_mb'])} MiB", flush=True)  # fmt: skip
    ws1 = [r["step_s"]["default"] for r in results["ws1"]]
    ws2 = [r["step_s"]["default"] for r in results["ws2"]]
    ws2_zero = [r["step_s"]["threshold0"] for r in results["ws2"]]
    rss = {name: [max(r["rss_mb"]) for r in rs] for name, rs in results.items()}
    print(f"\nScaling, tiny LLaVA + LoRA, ZeRO-3 fp32, global batch {args.global_batch}, 2 cores, {args.rounds} "
          f"rounds x {args.blocks} blocks x {args.steps} steady steps")  # fmt: skip
    print(
        f"  ws1              step {spread([t * 1000 for t in ws1], 1)} ms, peak RSS per rank {spread(rss['ws1'], 0)} MiB"
    )
    print(
        f"  ws2              step {spread([t * 1000 for t in ws2], 1)} ms, peak RSS per rank {spread(rss['ws2'], 0)} MiB"
    )
    print(f"  ws2 threshold=0  step {spread([t * 1000 for t in ws2_zero], 1)} ms (same launches, alternating blocks)")
    time_ratio = [b / a for a, b in zip(ws1, ws2, strict=True)]
    rss_ratio = [b / a for a, b in zip(rss["ws1"], rss["ws2"], strict=True)]
    threshold_ratio = [b / a for a, b in zip(ws2, ws2_zero, strict=True)]
    print(ratio_line("RATIO step time ws2/ws1 (same global batch)", time_ratio, note="0.50 = perfect 2-core scaling"))
    print(ratio_line("RATIO peak RSS per rank ws2/ws1", rss_ratio))
    print(
        ratio_line("RATIO step time threshold=0 / default (ws2)", threshold_ratio, note="< 1: sharding all is faster")
    )
    print(PERSISTENCE_NOTE)


if __name__ == "__main__":
    main()
