"""Budget curves on real digits: do mtrain's Matryoshka heads learn the papers' shapes?

Every experiment goes end to end through mtrain: shards built by `mtrain data build`
(prepare_digits.py), training by `mtrain train` under torchrun with DeepSpeed ZeRO-3, and the
figures from its in-loop evaluation of the held-out scans after the last step, which the final
checkpoint keeps as its budget curve (`budget_curve.json`).

1. tokens:   M3 all-scale training, MQT with random m, and a model trained at the full grid only
             (evaluated with M3's pooled grids): answer accuracy at each visual-token budget;
2. dims:     MRL against the same contrastive training without MRL, truncated: recall@1 per dim;
3. adapters: per_scale and shared_plus_per_scale LoRA against shared, at each visual scale.

    python benchmarks/budget_curves/run.py            # all seven runs, about 20 min on 2 cores
    python benchmarks/budget_curves/run.py --quick    # four runs at fewer steps (the slow test)

Each run is one rank (two runs side by side fill the two cores; a 2-rank ZeRO-3 job on two
cores spends most of a tiny step in communication, see benchmarks/RESULTS.md). Seeds are fixed
in the configs, so a rerun on the same machine gives the same figures. Results: RESULTS.md,
results.json and PNG curves in --out (default benchmarks/budget_curves/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "experiments" / "digits"
TOKEN_SCALES = "[1,4,16]"
EMBEDDING_DIMS = "[8,16,32,64]"
HELDOUT_SCANS = 360  # every held-out scan also answered by greedy generation
ANSWER_TOKENS = 4  # a digit's name and the end of the turn, with room to spare


@dataclass(frozen=True)
class Experiment:
    name: str
    label: str
    evaluation: str  # "budget" (answer accuracy per visual scale) or "retrieval" (recall@1 per dim)
    groups: tuple[str, ...]  # the tables and plots it appears in

    @property
    def config(self) -> Path:
        return CONFIGS / f"{self.name}.yaml"


EXPERIMENTS = (
    Experiment("m3", "M3 all-scale (shared LoRA)", "budget", ("tokens", "adapters")),
    Experiment("full_grid", "full grid only, pooled at eval", "budget", ("tokens",)),
    Experiment("mrl", "MRL", "retrieval", ("dims",)),
    Experiment("no_mrl", "no MRL, truncated", "retrieval", ("dims",)),
    Experiment("mqt", "MQT, random m", "budget", ("tokens",)),
    Experiment("per_scale", "per-scale LoRA", "budget", ("adapters",)),
    Experiment("shared_plus_per_scale", "shared + per-scale LoRA (MSS)", "budget", ("adapters",)),
)
QUICK = ("m3", "full_grid", "mrl", "no_mrl")
# A budget's quality may fall by this much before it counts as a fall: about two binomial
# standard deviations of an accuracy near 0.8 measured on 360 held-out scans.
NOISE = 0.05


def shard_list(folder: Path) -> str:
    """The shards `mtrain data build` wrote to `folder` (from its index.json), `::`-joined."""
    index = folder / "index.json"
    if not index.is_file():
        raise SystemExit(f"{index} is missing: run python benchmarks/budget_curves/prepare_digits.py first")
    return "::".join(str(folder / name) for name in sorted(json.loads(index.read_text())["samples"]))


def data_folder(experiment: Experiment, data: Path, split: str) -> Path:
    return data / ("conversation" if experiment.evaluation == "budget" else "pairs") / split


def run_logged(what: str, command: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{what} exited with {result.returncode}; see {log}")


def evaluation_overrides(experiment: Experiment, data: Path) -> list[str]:
    """The in-loop evaluation after the last step, over every held-out scan: at the trained budgets, at M3's
    pooled grids for the full-grid model (budgets it never saw), at the MRL dims for both embedding runs."""
    overrides = [f"eval.shards={shard_list(data_folder(experiment, data, 'heldout'))}", "eval.at_end=true"]
    if experiment.evaluation == "retrieval":
        return [*overrides, f"eval.dims={EMBEDDING_DIMS}"]
    overrides += [f"eval.generate_samples={HELDOUT_SCANS}", f"eval.max_new_tokens={ANSWER_TOKENS}"]
    if experiment.name == "full_grid":
        overrides.append(f"eval.scales={TOKEN_SCALES}")
    return overrides


def train_and_evaluate(experiment: Experiment, work: Path, data: Path, steps: int | None) -> dict[str, Any]:
    """`mtrain train` (torchrun, one rank, ZeRO-3) from scratch, evaluating the held-out split after its last step.

    The run folder (checkpoint with its budget curve, export) and the log go to work/<name>/.
    """
    from mtrain.checkpoint.export import resolve_checkpoint  # noqa: PLC0415
    from mtrain.eval.curves import read_curve  # noqa: PLC0415

    folder = work / experiment.name
    shutil.rmtree(folder, ignore_errors=True)  # a leftover checkpoint would be resumed, not retrained
    run_dir, log = folder / "run", folder / "log.txt"
    folder.mkdir(parents=True)
    train = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "mtrain", "train", str(experiment.config), f"run.dir={run_dir}", "logging.progress=false",
        f"data.shards={shard_list(data_folder(experiment, data, 'train'))}", *evaluation_overrides(experiment, data),
    ] + ([f"run.max_steps={steps}"] if steps else [])  # fmt: skip
    started = time.perf_counter()
    run_logged("mtrain train", train, log)
    trained_s = time.perf_counter() - started
    root, tag = resolve_checkpoint(run_dir / "checkpoints")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return {
        "name": experiment.name,
        "label": experiment.label,
        "evaluation": experiment.evaluation,
        "steps": metrics[-1]["step"],
        "train_loss": [losses[0], losses[-1]],
        "train_s": round(trained_s, 1),
        "results": read_curve(root / tag).points,
    }


def curve(run: dict[str, Any]) -> dict[int, float]:
    """Budget -> quality: answer accuracy per visual-token scale, or recall@1 per dim (last layer)."""
    if run["evaluation"] == "budget":
        return {r["scale"]: r["answer_accuracy"] for r in run["results"]}
    last = max(r.get("layer", 0) for r in run["results"])  # points name their layer only when several were evaluated
    return {r["dim"]: r["recall_at_1"] for r in run["results"] if r.get("layer", 0) == last}


def non_decreasing(points: dict[int, float]) -> bool:
    values = [points[k] for k in sorted(points)]
    return all(later >= earlier - NOISE for earlier, later in zip(values, values[1:], strict=False))


def claims(runs: dict[str, dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """The issue's expected shapes, each as (claim, holds, the figures behind it)."""
    checks = []
    if "m3" in runs and "full_grid" in runs:
        m3, base = curve(runs["m3"]), curve(runs["full_grid"])
        smallest, second, full = sorted(m3)[0], sorted(m3)[1], max(m3)
        checks += [
            (f"M3 at {second} tokens >= 0.9x its full-grid ({full}) accuracy", m3[second] >= 0.9 * m3[full],
             f"{m3[second]:.3f} vs 0.9 x {m3[full]:.3f} = {0.9 * m3[full]:.3f}"),
            (f"M3 above the full-grid-only baseline at {second} tokens", m3[second] > base[second],
             f"{m3[second]:.3f} vs {base[second]:.3f}"),
            (f"M3 above the full-grid-only baseline at {smallest} token(s)", m3[smallest] > base[smallest],
             f"{m3[smallest]:.3f} vs {base[smallest]:.3f}"),
        ]  # fmt: skip
    if "mrl" in runs and "no_mrl" in runs:
        mrl, base = curve(runs["mrl"]), curve(runs["no_mrl"])
        smallest, full = min(mrl), max(mrl)
        checks += [
            (f"MRL recall@1 at {smallest} dims (1/{full // smallest}) >= 0.9x its full ({full}) recall@1",
             mrl[smallest] >= 0.9 * mrl[full], f"{mrl[smallest]:.3f} vs 0.9 x {mrl[full]:.3f} = {0.9 * mrl[full]:.3f}"),
            (f"MRL above the truncated no-MRL baseline at {smallest} dims", mrl[smallest] > base[smallest],
             f"{mrl[smallest]:.3f} vs {base[smallest]:.3f}"),
        ]  # fmt: skip
    trained_nested = [name for name in ("m3", "mqt", "per_scale", "shared_plus_per_scale", "mrl") if name in runs]
    for name in trained_nested:
        points = curve(runs[name])
        shown = ", ".join(f"{points[k]:.3f}" for k in sorted(points))
        checks.append((f"{runs[name]['label']}: quality non-decreasing with budget (within {NOISE})",
                       non_decreasing(points), shown))  # fmt: skip
    return checks


GROUPS = {
    "tokens": ("Tokens: answer accuracy per visual-token budget", "visual tokens per image", "answer accuracy"),
    "adapters": ("Adapters: answer accuracy per visual scale, by LoRA strategy", "visual tokens per image",
                 "answer accuracy"),
    "dims": ("Dims: image -> caption recall@1 per embedding size", "embedding dims", "recall@1"),
}  # fmt: skip


def table(title: str, axis: str, rows: list[dict[str, Any]]) -> str:
    budgets = sorted({b for run in rows for b in curve(run)})
    lines = [f"### {title}", "", f"| method \\ {axis} | " + " | ".join(str(b) for b in budgets) + " | steps |"]
    lines.append("|---" * (len(budgets) + 2) + "|")
    for run in rows:
        points = curve(run)
        cells = " | ".join(f"{points[b]:.3f}" if b in points else "" for b in budgets)
        lines.append(f"| {run['label']} | {cells} | {run['steps']} |")
    return "\n".join(lines)


def plot(title: str, xlabel: str, ylabel: str, rows: list[dict[str, Any]], path: Path) -> Path:
    """Quality against budget (log-2 axis), one line per method."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from mtrain.eval.budget import save_log2_curves  # noqa: PLC0415

    figure, axes = plt.subplots(1, 1, figsize=(6, 4))
    for run in rows:
        points = curve(run)
        axes.plot(sorted(points), [points[b] for b in sorted(points)], marker="o", label=run["label"])
    axes.set_ylim(0, 1.02)
    axes.set_title(title, fontsize=9)
    return save_log2_curves(figure, [axes], xlabel, (ylabel,), path)


def write_report(runs: dict[str, dict[str, Any]], out: Path, wall_s: float, quick: bool, machine: list[str]) -> str:
    sections = [
        "# Budget curves on real digits",
        "",
        f"Written by `python benchmarks/budget_curves/run.py{' --quick' if quick else ''}` in {wall_s / 60:.1f} min "
        "wall. Data: scikit-learn's 1,797 real 8x8 scans of handwritten digits, upscaled to 32 px, a fixed "
        "stratified 20% held out (360 scans; `prepare_digits.py`). Every figure is measured on the held-out "
        "scans by the run's in-loop evaluation after its last step (the final checkpoint's `budget_curve.json`). "
        "Seeds are fixed in `configs/experiments/digits/`.",
        "",
        *machine,
        "",
    ]
    for group, (title, xlabel, ylabel) in GROUPS.items():
        rows = [run for name, run in runs.items() if group in experiment_named(name).groups]
        if not rows:
            continue
        axis = "dims" if group == "dims" else "tokens"
        plot(title, xlabel, ylabel, rows, out / f"{group}.png")
        sections += [table(title, axis, rows), "", f"![{group}]({group}.png)", ""]
    sections += ["## The expected shapes", "", "| claim | holds | figures |", "|---|---|---|"]
    sections += [f"| {claim} | {'yes' if ok else 'NO'} | {figures} |" for claim, ok, figures in claims(runs)]
    sections += ["", "## Runs", "", "| run | steps | train loss first -> last | train s |", "|---|---|---|---|"]
    sections += [
        f"| {run['label']} | {run['steps']} | {run['train_loss'][0]:.3f} -> {run['train_loss'][1]:.3f} "
        f"| {run['train_s']:.0f} |"
        for run in runs.values()
    ]
    report = "\n".join(sections) + "\n"
    (out / "RESULTS.md").write_text(report)
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    return report


def experiment_named(name: str) -> Experiment:
    return next(e for e in EXPERIMENTS if e.name == name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "budget_curves" / "results"), help="results folder")
    parser.add_argument("--data", default=str(REPO / "data" / "digits"), help="digit shards (built when missing)")
    parser.add_argument("--work", help="run folders and logs (default runs/budget_curves)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, at --steps (default 400)")
    parser.add_argument("--steps", type=int, help="override every config's run.max_steps")
    parser.add_argument("--only", nargs="+", choices=[e.name for e in EXPERIMENTS], help="run only these")
    parser.add_argument("--parallel", type=int, default=2, help="runs side by side (one rank each)")
    args = parser.parse_args(argv)
    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    work = Path(args.work).resolve() if args.work else REPO / "runs" / "budget_curves"
    steps = args.steps or (400 if args.quick else None)
    if not (data / "conversation" / "heldout" / "index.json").is_file():
        from benchmarks.budget_curves.prepare_digits import main as prepare  # noqa: PLC0415

        prepare(["--out", str(data)])
    chosen = [e for e in EXPERIMENTS if (e.name in QUICK or not args.quick) and (not args.only or e.name in args.only)]
    from benchmarks.common import machine, versions  # noqa: PLC0415

    machine_lines = [*machine(), f"- versions: {versions()}"]  # the load average before the runs start
    started = time.perf_counter()
    print(f"budget curves: {len(chosen)} runs, {args.parallel} at a time; logs in {work}, results in {out}", flush=True)

    def one(experiment: Experiment) -> dict[str, Any]:
        print(f"  {experiment.name}: training {experiment.config.relative_to(REPO)}", flush=True)
        try:
            run = train_and_evaluate(experiment, work, data, steps)
        except Exception as error:
            print(f"  {experiment.name}: FAILED: {error}", flush=True)
            raise
        points = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(curve(run).items()))
        print(f"  {experiment.name}: done in {run['train_s']:.0f} s of training; {points}", flush=True)
        return run

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = {run["name"]: run for run in pool.map(one, chosen)}
    print(write_report(runs, out, time.perf_counter() - started, args.quick, machine_lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
