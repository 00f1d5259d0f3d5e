"""`mtrain eval`: loss and accuracy at every visual-token scale, as a table, JSON and a PNG curve.

Any model can be evaluated at M3 scales (a model trained at the full grid only is the baseline
the M3 paper beats); an MQT model is evaluated at its query budgets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mtrain.config import TrainConfig, load_config

# Per-budget sums of a language-model evaluation (`MatryoshkaTokenTask.evaluate_scale`).
TOKEN_SUMS = ("loss_sum", "tokens", "correct_tokens", "answers_correct", "answers")


@dataclass
class ScaleResult:
    scale: int
    loss: float
    token_accuracy: float
    answer_accuracy: float
    answers: int
    tokens: int = 0
    trained: bool = True
    """False for a budget the model never trained at (`mtrain eval --untrained-budgets`)."""
    generated_accuracy: float | None = None
    """Greedy answers equal to the reference (`mtrain.eval.generation`); None when nothing was generated."""
    generated_answers: int = 0


def eval_source(
    source: str | Path, overrides: list[str], shards: str | None = None, data_needed: bool = True
) -> tuple[TrainConfig, tuple[Path, str] | None]:
    """The config of a checkpoint (with the checkpoint's folder and tag) or of a config file (no checkpoint).

    Without `shards` (evaluation shards given apart), the config's data.shards must exist when
    `data_needed`: checked before any model loads."""
    from mtrain.checkpoint.export import resolve_checkpoint  # noqa: PLC0415

    source = Path(source)
    checkpoint = resolve_checkpoint(source) if source.is_dir() else None
    cfg = load_config(checkpoint[0] / checkpoint[1] / "config.yaml" if checkpoint else source, overrides)
    if shards is None and data_needed:
        from mtrain.launch.inputs import check_shards_exist  # noqa: PLC0415

        check_shards_exist(cfg.data.shards, "data.shards (pass --shards to evaluate others)")
    return cfg, checkpoint


def consolidated_weights(checkpoint: tuple[Path, str]) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 weights, every rank's ZeRO shards joined (any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint[0]), tag=checkpoint[1])


def load_for_eval(
    source: str | Path,
    overrides: list[str],
    shards: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    data_needed: bool = True,
) -> tuple[TrainConfig, Any, torch.nn.Module]:
    """(config, built model, task) from a checkpoint (trained weights) or a config (as configured), whole in
    this process, in `dtype` on `device` (the weights are stored in fp32 and rounded to `dtype`)."""
    cfg, checkpoint = eval_source(source, overrides, shards, data_needed)
    return (cfg, *whole_task(cfg, checkpoint, dtype, device))


def whole_task(
    cfg: TrainConfig, checkpoint: tuple[Path, str] | None, dtype: torch.dtype, device: str
) -> tuple[Any, torch.nn.Module]:
    """(built model, task in eval mode) with every weight in this process, in `dtype` on `device`."""
    from mtrain.model.build import build_model  # noqa: PLC0415
    from mtrain.task.registry import build_task  # noqa: PLC0415

    built = build_model(cfg.model, dtype, None, cfg.run.seed, cfg.matryoshka.tokens)
    task = build_task(cfg, built, rank=0)
    if checkpoint:
        task.load_state_dict(consolidated_weights(checkpoint), strict=True)
    for param in task.parameters():  # parameters only, as DeepSpeed casts them (PEFT made its adapters fp32)
        param.data = param.data.to(dtype)
    return built, task.to(device).eval()


def evaluate_token_budgets(
    view: Any, rounds: Iterator[tuple[dict[str, Any], bool]], to_device: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[int, torch.Tensor]:
    """This rank's sums (`TOKEN_SUMS`) per visual-token scale of `view` (a MatryoshkaTokenTask)."""
    sums = {scale: torch.zeros(len(TOKEN_SUMS), dtype=torch.float64) for scale in view.tokens.scales}
    for batch, counted in rounds:
        batch = to_device(batch)
        for scale in view.tokens.scales:
            stats = view.evaluate_scale(batch, scale)
            if counted:
                sums[scale] += torch.tensor([stats[name] for name in TOKEN_SUMS], dtype=torch.float64)
    return sums


def reduce_sums(
    sums: dict[int, torch.Tensor], all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Every rank's per-scale sums added up, in one collective: counts stay exact."""
    scales = sorted(sums)
    return dict(zip(scales, all_reduce(torch.stack([sums[s] for s in scales])), strict=True))


def evaluate_budgets(task: Any, batches: Iterator[dict[str, Any]], num_batches: int = 0) -> list[ScaleResult]:
    """Every scale of `task` over `num_batches` batches (0: until `batches` ends), in this one process."""
    from itertools import islice  # noqa: PLC0415

    rounds = ((batch, True) for batch in islice(batches, num_batches or None))
    return scale_results(evaluate_token_budgets(task, rounds, to_device=lambda batch: batch))


def scale_results(sums: dict[int, torch.Tensor]) -> list[ScaleResult]:
    """One row per scale from the sums of `TOKEN_SUMS` (over every rank)."""
    results = []
    for scale, values in sorted(sums.items()):
        t = dict(zip(TOKEN_SUMS, values.tolist(), strict=True))
        results.append(
            ScaleResult(
                scale=scale,
                loss=t["loss_sum"] / max(t["tokens"], 1),
                token_accuracy=t["correct_tokens"] / max(t["tokens"], 1),
                answer_accuracy=t["answers_correct"] / max(t["answers"], 1),
                answers=int(t["answers"]),
                tokens=int(t["tokens"]),
            )
        )
    return results


def format_columns(columns: list[tuple[str, int, str]], rows: list[tuple[Any, ...]]) -> str:
    """A right-aligned text table; each column is (header, width, format spec of its values)."""
    lines = [" ".join(f"{name:>{width}}" for name, width, _ in columns)]
    lines += [
        " ".join(f"{value:>{width}{spec}}" for value, (_, width, spec) in zip(row, columns, strict=True))
        for row in rows
    ]
    return "\n".join(lines)


def format_table(results: list[ScaleResult]) -> str:
    columns = [("visual tokens", 13, "d"), ("loss", 8, ".4f"), ("token acc", 10, ".3f"), ("answer acc", 11, ".3f")]
    rows = [
        (r.scale, r.loss, r.token_accuracy, r.answer_accuracy, r.answers, "yes" if r.trained else "no") for r in results
    ]
    columns += [("answers", 8, "d"), ("trained", 8, "s")]
    if any(r.generated_accuracy is not None for r in results):
        columns += [("generated acc", 14, ".3f"), ("generated", 10, "d")]
        rows = [(*row, r.generated_accuracy, r.generated_answers) for row, r in zip(rows, results, strict=True)]
    return format_columns(columns, rows)


def plot_budget_curve(curves: dict[str, list[ScaleResult]], path: Path, metric: str = "answer_accuracy") -> Path:
    """Quality against visual tokens (log axis), one line per method."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, results in curves.items():
        scales = [r.scale for r in results]
        axes[0].plot(scales, [getattr(r, metric) for r in results], marker="o", label=name)
        axes[1].plot(scales, [r.loss for r in results], marker="o", label=name)
    if len(curves) == 1:  # its name (often a long checkpoint path) as the title; a legend would cover the curve
        figure.suptitle(next(iter(curves)), fontsize=9)
    ticks = sorted({r.scale for results in curves.values() for r in results})
    labels = (metric.replace("_", " "), "loss")
    return save_log2_curves(figure, axes, "visual tokens per image", labels, path, ticks=ticks, legend=len(curves) > 1)


def save_log2_curves(
    figure: Any,
    axes: Any,
    xlabel: str,
    ylabels: tuple[str, ...],
    path: Path,
    ticks: list[int] | None = None,
    legend: bool = True,
) -> Path:
    """Label the panels (log-2 x axis, grid, a legend in each unless not `legend`) and write the PNG;
    `ticks`: the budgets to mark."""
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, NullLocator, ScalarFormatter  # noqa: PLC0415

    for ax, label in zip(axes, ylabels, strict=True):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())  # budgets read as 1, 4, 16, not 2^0, 2^2, 2^4
        if ticks:  # exactly the budgets evaluated, as integers
            ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if legend:
            ax.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(results: list[ScaleResult], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "budget.json"
    json_path.write_text(json.dumps({"name": name, "results": [asdict(r) for r in results]}, indent=1))
    return json_path, plot_budget_curve({name: results}, out_dir / "budget.png")
