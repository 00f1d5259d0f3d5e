"""`mtrain plot RUN_DIR`: PNG curves from `RUN_DIR/metrics.jsonl` (loss per scale and dim, throughput) and,
for a run that evaluated, quality against budget over training (`budget.png`, see `mtrain/eval/curves.py`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mtrain.eval.curves import curves_from_records, plot_curves, thinned

BUDGET_PLOT = "budget.png"
PER_SCALE = re.compile(r"loss/(scale|dim)_(\d+)$")


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a run folder written by `mtrain train` (run.dir)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no logged steps yet")
    return records


def series(records: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that logged `key`."""
    pairs = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def loss_keys(records: list[dict[str, float]]) -> list[str]:
    """`loss` first, then `loss/scale_<s>` and `loss/dim_<d>` sorted by kind and size."""
    found = {key for record in records for key in record if PER_SCALE.match(key)}
    ordered = sorted(found, key=lambda k: (PER_SCALE.match(k).group(1), int(PER_SCALE.match(k).group(2))))
    return ["loss", *ordered]


def plot_budget_over_training(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """`budget.png`: each eval metric against budget (log-2 axis), one line per evaluation (at most
    `MAX_LINES` of them, first and last included), darker to lighter as training goes on."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    curves = curves_from_records(records)
    if not curves:
        raise ValueError(
            f"{run_dir / 'metrics.jsonl'} holds no eval records, so there is no quality-against-budget curve: "
            "train with held-out shards, e.g. eval.shards=data/heldout/shard-000000.tar eval.every=20"
        )
    out = Path(out_dir) if out_dir else run_dir / "plots"
    shown = thinned(curves)
    title = f"{run_dir.name}: held-out quality against budget, {len(shown)} of {len(curves)} evaluations"
    return plot_curves(shown, out / BUDGET_PLOT, title)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, budget: bool = True) -> list[Path]:
    """Write loss.png and throughput.png (and utilisation.png when data-wait or MFU was logged), and
    budget.png when `budget` and the run logged evaluations."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    panels = {
        "loss.png": [("loss", loss_keys(records))],
        "throughput.png": [("tokens/s", ["tokens_per_s"]), ("samples/s", ["samples_per_s"])],
        "utilisation.png": [("fraction of step time", ["data_wait_frac", "mfu"])],
    }
    written = []
    for filename, axes_spec in panels.items():
        axes_spec = [(label, [k for k in keys if any(k in r for r in records)]) for label, keys in axes_spec]
        axes_spec = [(label, keys) for label, keys in axes_spec if keys]
        if not axes_spec:
            continue
        figure, axes = plt.subplots(1, len(axes_spec), figsize=(6 * len(axes_spec), 4), squeeze=False)
        for ax, (label, keys) in zip(axes[0], axes_spec, strict=True):
            for key in keys:
                ax.plot(*series(records, key), label=key, linewidth=2.0 if key == "loss" else 1.2)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        figure.suptitle(f"{run_dir.name}: {filename.removesuffix('.png')}")
        figure.tight_layout()
        figure.savefig(out / filename, dpi=100)
        plt.close(figure)
        written.append(out / filename)
    if budget and curves_from_records(records):
        written.append(plot_budget_over_training(run_dir, out))
    return written
