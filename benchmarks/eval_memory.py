"""Peak memory per rank of a training run with the in-loop evaluation on, against the same run without it.

    python benchmarks/eval_memory.py [--rounds 2] [--steps 8] [--every 2] [--hidden 256]

The real `mtrain train` path (`mtrain.engine.run`: set_up, train, finish) on 2 torchrun ranks: a widened
tiny LLaVA (configs/tiny.yaml with `model.tiny.hidden_size`), LoRA, M3 scales 1/4/16/64, ZeRO-3 with every
parameter sharded (persistence threshold 0), fp32, on the sample shards. Two settings, alternating within
every round (ABBA), each its own launch:

  train   training alone;
  eval    the same, plus `eval.every` on a held-out shard at every scale (4 forwards per batch, batches of
          the training micro-batch), so a run of `--steps` steps evaluates steps/every times.

Each rank reports `ru_maxrss` (its peak RSS) after set-up and after the training loop; the ratio is the
larger rank's peak with evaluation over the larger rank's peak without (issue 19: within 10%). The
"growth" figures are peak minus the peak after set-up: what the loop itself added, where evaluation's own
cost would show (an eval batch larger than the training one, kept logits, a graph built without no_grad,
a held-out loader that outlives its evaluation would all grow it with every evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import in_turn, launch_for_result, ratio_line, scratch_with_shards, spread  # noqa: E402

SETTINGS = ("train", "eval")
SCALES = "[1,4,16,64]"


def peak_mib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def overrides(args: argparse.Namespace, setting: str, run_dir: Path) -> list[str]:
    shards = Path(args.shards)
    common = [
        f"run.dir={run_dir}", f"run.max_steps={args.steps}", f"data.shards={shards / 'shard-{000000..000003}.tar'}",
        f"model.tiny.hidden_size={args.hidden}", "model.tiny.num_layers=4", "model.tiny.num_heads=8",
        "matryoshka.tokens.mode=m3", f"matryoshka.tokens.scales={SCALES}", "zero.param_persistence_threshold=0",
        "run.precision=fp32", "run.device=cpu", "logging.progress=false",
        "checkpoint.save_at_end=false", "checkpoint.export_at_end=false",
    ]  # fmt: skip
    if setting == "eval":
        common += [f"eval.shards={shards / 'heldout' / 'shard-{000000..000001}.tar'}", f"eval.every={args.every}"]
    return common


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from mtrain.config import load_config
    from mtrain.engine.run import finish, set_up, train

    cfg = load_config(REPO / "configs/tiny.yaml", overrides(args, args.setting, Path(args.run_dir)))
    run = set_up(cfg)
    after_setup = peak_mib()
    history = train(run)
    figures = torch.tensor([after_setup, peak_mib()], dtype=torch.float64)
    gathered = [torch.zeros_like(figures) for _ in range(run.world.world_size)]
    dist.all_gather(gathered, figures)
    if run.world.is_main:
        evals = sum(1 for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if '"eval/' in line)
        ranks = [g.tolist() for g in gathered]
        Path(args.out).write_text(json.dumps({"setup_mib": [r[0] for r in ranks], "peak_mib": [r[1] for r in ranks],
                                              "evaluations": evals}))  # fmt: skip
    finish(run, history)


def launch(setting: str, args: argparse.Namespace, scratch: Path, round_index: int) -> dict:
    from mtrain.launch.distributed import free_port

    out = scratch / f"{setting}-{round_index}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "--worker", "--setting", setting, "--shards", args.shards, "--out", str(out),
           "--run-dir", str(scratch / f"run-{setting}-{round_index}"), "--steps", str(args.steps),
           "--every", str(args.every), "--hidden", str(args.hidden)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return launch_for_result(cmd, env, out, args.verbose)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=2, help="eval.every of the eval setting")
    parser.add_argument("--hidden", type=int, default=256, help="the tiny language model's width")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--setting", choices=SETTINGS)
    parser.add_argument("--shards")
    parser.add_argument("--out")
    parser.add_argument("--run-dir")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from data_pipeline.sample_data import write_sample_shards

    scratch = scratch_with_shards("mtrain-eval-memory-")
    args.shards = str(scratch / "shards")
    write_sample_shards(Path(args.shards) / "heldout", num_shards=2, samples_per_shard=24, seed=7)
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        for setting in in_turn(SETTINGS, round_index):
            result = launch(setting, args, scratch, round_index)
            results[setting].append(result)
            print(f"  round {round_index} {setting:5s} peak RSS per rank "
                  f"{', '.join(f'{p:.0f}' for p in result['peak_mib'])} MiB (after set-up "
                  f"{', '.join(f'{s:.0f}' for s in result['setup_mib'])}), {result['evaluations']} evaluations",
                  flush=True)  # fmt: skip
    peak = {name: [max(r["peak_mib"]) for r in rs] for name, rs in results.items()}
    growth = {name: [max(p - s for p, s in zip(r["peak_mib"], r["setup_mib"], strict=True)) for r in rs]
              for name, rs in results.items()}  # fmt: skip
    print(f"\nPeak RSS per rank, 2-rank ZeRO-3 tiny LLaVA (hidden {args.hidden}, 4 layers), M3 {SCALES}, "
          f"{args.steps} steps, eval every {args.every} at every scale; {args.rounds} alternating rounds")  # fmt: skip
    for name in SETTINGS:
        print(f"  {name:5s}  peak {spread(peak[name], 0)} MiB, loop growth over set-up {spread(growth[name], 0)} MiB")
    ratio = [e / t for t, e in zip(peak["train"], peak["eval"], strict=True)]
    print(ratio_line("RATIO peak RSS per rank eval/train", ratio, target="<= 1.10"))
    extra = [e - t for t, e in zip(peak["train"], peak["eval"], strict=True)]
    print(f"  evaluation's extra peak: {spread(extra, 0)} MiB per rank")


if __name__ == "__main__":
    main()
