"""Budget curves: quality against budget, read from the `eval/<metric>/<budget>` scalars an evaluation logs.

    one evaluation's metrics ──► BudgetCurve (per budget: every metric) ──► budget_curve.json + .png
                                                                          in the checkpoint of that step
    metrics.jsonl's eval lines ──► one BudgetCurve per eval step ──► plots/budget.png (`mtrain plot`)

A budget is a visual-token scale (`scale_<s>`, lm) or an embedding dim (`dim_<d>`, contrastive; with
several layers evaluated, `layer_<l>/dim_<d>`). The curves are read from the metric names alone, so a
metric an evaluation adds later is kept and drawn without a change here. Counts (tokens, answers,
generated answers, queries) stay in the JSON and out of the plots.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EVAL_METRIC = re.compile(r"^eval/(?P<metric>\w+)/(?:layer_(?P<layer>\d+)/)?(?P<axis>scale|dim)_(?P<size>\d+)$")
COUNTS = frozenset({"tokens", "answers", "generated_answers", "queries", "gallery"})
"""Metrics that count what was evaluated: written, not plotted."""
CURVE_JSON, CURVE_PNG = "budget_curve.json", "budget_curve.png"
AXIS_LABELS = {"scale": "visual tokens per image", "dim": "embedding dims"}
MAX_LINES = 8
"""Lines of one plot over training: the first and last evaluation and evenly spaced ones between."""


@dataclass
class BudgetCurve:
    """One evaluation's figures per budget."""

    step: int
    axis: str
    """"scale" (visual tokens per image) or "dim" (embedding dims)."""
    points: list[dict[str, Any]]
    """One per budget, smallest first: its size under `axis` (and `layer`), then every metric by name."""

    @property
    def quality_metrics(self) -> list[str]:
        """The metrics worth a panel, in logged order: every one but the counts."""
        names = [name for point in self.points for name in point if name not in (self.axis, "layer")]
        return [name for name in dict.fromkeys(names) if name not in COUNTS]

    @property
    def layers(self) -> list[int | None]:
        """The layers evaluated ([None] when the budgets name none)."""
        return sorted({point.get("layer") for point in self.points}, key=lambda layer: layer or 0)

    def series(self, metric: str, layer: int | None = None) -> tuple[list[int], list[float]]:
        """(budgets, values) of `metric` at `layer`."""
        points = [p for p in self.points if p.get("layer") == layer and metric in p]
        return [p[self.axis] for p in points], [p[metric] for p in points]


def budget_curve(step: int, metrics: dict[str, float]) -> BudgetCurve | None:
    """The curve of one evaluation's `eval/...` scalars (other keys are ignored); None when it has none."""
    by_budget: dict[tuple[int, int], dict[str, Any]] = {}
    axes = set()
    for name, value in metrics.items():
        match = EVAL_METRIC.match(name)
        if match is None:
            continue
        axis, size, layer = match["axis"], int(match["size"]), match["layer"]
        axes.add(axis)
        point = by_budget.setdefault((int(layer or 0), size), {**({"layer": int(layer)} if layer else {}), axis: size})
        point[match["metric"]] = int(value) if match["metric"] in COUNTS else value
    if not by_budget:
        return None
    if len(axes) > 1:
        raise ValueError(f"step {step} logged budgets of both kinds ({sorted(axes)}): one evaluation has one kind")
    return BudgetCurve(step, axes.pop(), [by_budget[key] for key in sorted(by_budget)])


def curves_from_records(records: list[dict[str, float]]) -> list[BudgetCurve]:
    """One curve per logged evaluation of `metrics.jsonl`, in step order."""
    curves = [budget_curve(int(record["step"]), record) for record in records]
    return sorted((c for c in curves if c is not None), key=lambda c: c.step)


def write_curve(curve: BudgetCurve, folder: Path) -> tuple[Path, Path]:
    """`budget_curve.json` (per budget: every metric) and `budget_curve.png` (quality against budget) in `folder`."""
    json_path = folder / CURVE_JSON
    json_path.write_text(json.dumps(asdict(curve), indent=1))
    return json_path, plot_curves([curve], folder / CURVE_PNG, f"held-out quality at step {curve.step}")


def read_curve(folder: Path) -> BudgetCurve:
    """The curve a checkpoint folder holds, or an error that says how it gets one."""
    path = folder / CURVE_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a checkpoint holds its budget curve when the run evaluated (eval.shards set)"
        )
    return BudgetCurve(**json.loads(path.read_text()))


def thinned(curves: list[BudgetCurve], most: int = MAX_LINES) -> list[BudgetCurve]:
    """At most `most` curves: the first, the last and evenly spaced ones between."""
    if len(curves) <= most:
        return curves
    picked = sorted({round(i * (len(curves) - 1) / (most - 1)) for i in range(most)})
    return [curves[i] for i in picked]


def plot_panels(curves: list[BudgetCurve]) -> list[tuple[str, int | None]]:
    """(metric, layer) of each panel: every quality metric and layer any of `curves` logged (an evaluation
    may log a metric the others do not)."""
    metrics = dict.fromkeys(metric for curve in curves for metric in curve.quality_metrics)
    layers = sorted({layer for curve in curves for layer in curve.layers}, key=lambda layer: layer or 0)
    return [(metric, layer) for metric in metrics for layer in layers]


def plot_curves(curves: list[BudgetCurve], path: Path, title: str) -> Path:
    """One panel per quality metric (and layer), x = budget on a log-2 axis, one line per curve (step)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from mtrain.eval.budget import save_log2_curves  # noqa: PLC0415

    last = curves[-1]
    panels = plot_panels(curves)
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(panels) :]:
        ax.remove()
    colours = plt.get_cmap("viridis")
    for i, curve in enumerate(curves):
        # Early dark, late light; viridis' last yellow is hard to see on white, so the scale stops short of it.
        colour = colours(0.85 * i / (len(curves) - 1)) if len(curves) > 1 else "C0"
        for ax, (metric, layer) in zip(axes, panels, strict=False):
            ax.plot(*curve.series(metric, layer), marker="o", color=colour, label=f"step {curve.step}")
    labels = tuple(
        metric.replace("_", " ") + ("" if layer is None else f" (layer {layer})") for metric, layer in panels
    )
    figure.suptitle(title, fontsize=10)
    if len(curves) > 1:  # one legend of the steps, beside the last panel, where it hides no line
        axes[len(panels) - 1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    budgets = sorted({point[curve.axis] for curve in curves for point in curve.points})
    axis_label = AXIS_LABELS[last.axis]
    return save_log2_curves(figure, axes[: len(panels)], axis_label, labels, path, ticks=budgets, legend=False)
