"""Scaling: step time and per-rank peak memory at world size 1 against 2 on the same global batch.

    python benchmarks/scaling.py [--rounds 2] [--warmup 2] [--steps 6] [--global-batch 8]

mtrain's tiny LLaVA (configs/tiny.yaml: LoRA, ZeRO-3, fp32) on the sample shards, each setting in
its own torchrun launch, settings alternating within every round:

  ws1          1 rank,  micro-batch = global batch, OMP_NUM_THREADS=1;
  ws2          2 ranks, micro-batch = global / 2,   OMP_NUM_THREADS=1 per rank (one core each);
  ws2_gather   as ws2 with zero.param_persistence_threshold=0: every parameter, however small,
               is partitioned and re-gathered in forward and backward.

One thread per rank, so each rank computes on one core (two threads on a 2-core machine shared with
other jobs oversubscribe it and make ws1 erratic). With free communication ws2 would take half of
ws1's step time (ratio 0.50: half the samples per rank, one core each); what it exceeds that by is
ZeRO-3's all-gather / reduce-scatter over gloo and the partition bookkeeping.
Peak RSS is `ru_maxrss` of each rank after the timed steps. `--profile DIR` writes cProfile stats
of the timed steps per setting and rank.

Why ws2_gather (threshold 0, every parameter sharded) is faster than ws2 (DeepSpeed's default
threshold 1e5) on this model -- measured with --profile, read in deepspeed/runtime/zero/:
every one of the tiny LLaVA's 77 parameters has <= 1e5 elements, so at the default threshold all
are "persistent" (ds_persist). Persistent parameters are still partitioned at every optimizer
step (stage3.py `step` -> `_partition_all_parameters` -> `release_and_reset_all`), then gathered
back in `_post_step` through `Init._all_gather(..., async_op=False)` ->
`_allgather_params_coalesced`, which despite its name issues one `all_gather_into_tensor` per
parameter: 77 small blocking gloo collectives per step, the 64 frozen parameters included (their
values never change). At threshold 0 the parameter coordinator fetches modules through the
prefetch path instead, and with the prefetch bucket (5e7 elements) larger than the whole model
and stage3_max_reuse_distance (1e9) keeping gathered parameters alive from forward to backward,
that is one flat all-gather of the whole model per step. The bytes moved are about the same (the
whole model, 218k elements); the number of collectives is 77 to 1, and on gloo each small
collective costs a round trip and thread wake-ups on both ranks. On a real model the persistent
set is only norms and biases (a small share of the bytes), so the default threshold's cost is
the per-parameter latency of those gathers, not bandwidth; with NCCL that latency is microseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import launch_for_result, leave_together, ratio_line, timed_engine_steps  # noqa: E402

PERSISTENCE_NOTE = """\
Why threshold=0 is faster here (see this script's docstring; profiled with --profile): all 77
parameters of the tiny model are below the default persistence threshold (1e5 elements), and
DeepSpeed re-partitions persistent parameters at every step and gathers them back in _post_step
with one blocking all_gather per parameter (77 gloo collectives per step, frozen ones included).
With threshold 0, the prefetch path gathers the whole model in one flat all_gather per step and
keeps it through backward (prefetch bucket and max reuse distance exceed the model). Same bytes,
77 collectives against 1: the cost is collective latency, which NCCL makes small on GPUs."""

SETTINGS = {  # name: (ranks, threads per rank, extra overrides)
    "ws1": (1, 1, []),
    "ws2": (2, 1, []),
    "ws2_gather": (2, 1, ["zero.param_persistence_threshold=0"]),
}


def launch(name: str, args: argparse.Namespace, out: Path) -> dict:
    from mtrain.launch.distributed import free_port

    ranks, threads, overrides = SETTINGS[name]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), __file__, "--worker", "--shards", args.shards, "--out", str(out),
           "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--micro-batch", str(args.global_batch // ranks), *[f"--set={o}" for o in overrides]]  # fmt: skip
    if args.profile:
        cmd += ["--profile", str(Path(args.profile) / name)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
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
    overrides = ["optim.warmup_steps=0", "run.max_steps=1000", f"data.micro_batch_size={args.micro_batch}", *args.set]
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    data = dataclasses.replace(cfg.data, shards=str(Path(args.shards) / "shard-{000000..000003}.tar"), sources=[])
    cfg = dataclasses.replace(cfg, data=data)
    ds = deepspeed_config(cfg, world_size=world.world_size, precision="fp32")
    built = build_model(cfg.model, torch.float32, ds, cfg.run.seed)
    engine = initialize_engine(cfg, built, ds, world.rank)
    loader = build_data_loader(cfg, built, world)
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    profile_to = Path(f"{args.profile}-rank{world.rank}.prof") if args.profile else None
    step_s = timed_engine_steps(engine, batches, args.warmup, profile_to)
    rss_mb = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    gathered = [torch.zeros(1) for _ in range(world.world_size)]
    dist.all_gather(gathered, rss_mb)
    if world.rank == 0:
        Path(args.out).write_text(json.dumps({"step_s": step_s, "rss_mb": [float(r) for r in gathered]}))
    leave_together(engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--shards")
    parser.add_argument("--out")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--profile", help="folder for per-rank cProfile stats of the timed steps (<setting>-rank<r>.prof)"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from data_pipeline.sample_data import write_sample_shards

    scratch = Path(tempfile.mkdtemp(prefix="mtrain-scaling-"))
    args.shards = str(scratch / "shards")
    write_sample_shards(args.shards, num_shards=4, samples_per_shard=48)
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        for name in SETTINGS:
            result = launch(name, args, scratch / f"{name}-{round_index}.json")
            results[name].append(result)
            print(f"  round {round_index} {name:10s} step {result['step_s'] * 1000:7.1f} ms, "
                  f"peak RSS per rank {', '.join(f'{r:.0f}' for r in result['rss_mb'])} MiB", flush=True)  # fmt: skip
    step = {name: [r["step_s"] for r in rs] for name, rs in results.items()}
    rss = {name: [max(r["rss_mb"]) for r in rs] for name, rs in results.items()}
    print(f"\nScaling, tiny LLaVA + LoRA, ZeRO-3 fp32, global batch {args.global_batch}, 2 cores, "
          f"{args.rounds} rounds x {args.steps} steady steps")  # fmt: skip
    for name in SETTINGS:
        print(f"  {name:10s} median step {statistics.median(step[name]) * 1000:7.1f} ms, "
              f"peak RSS per rank {statistics.median(rss[name]):.0f} MiB")  # fmt: skip
    time_ratio = [b / a for a, b in zip(step["ws1"], step["ws2"], strict=True)]
    rss_ratio = [b / a for a, b in zip(rss["ws1"], rss["ws2"], strict=True)]
    gather_ratio = [b / a for a, b in zip(step["ws2"], step["ws2_gather"], strict=True)]
    persist_share = [(a - b) / a for a, b in zip(step["ws2"], step["ws2_gather"], strict=True)]
    print(ratio_line("RATIO step time ws2/ws1 (same global batch)", time_ratio, note="0.50 = perfect 2-core scaling"))
    print(ratio_line("RATIO peak RSS per rank ws2/ws1", rss_ratio))
    print(ratio_line("RATIO step time threshold=0 / default (ws2)", gather_ratio))
    print(
        ratio_line(
            "RATIO (default - threshold=0) / default (ws2)", persist_share,
            note="(share of the default step spent on per-parameter gathers of persistent parameters)",
        )
    )  # fmt: skip
    print(PERSISTENCE_NOTE)


if __name__ == "__main__":
    main()
