"""`mtrain eval` orchestration: load, stream held-out batches, score every scale, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtrain.eval.budget import budget_view, evaluate_budgets, format_table, load_for_eval, write_report


def eval_batches(cfg: Any, built: Any, shards: str | None, num_batches: int = 0, form: Any = None) -> Any:
    """One pass over the held-out batches in a single process, in shard order (no shuffling): the whole set,
    or its first `num_batches`; the loader of the in-loop evaluation (`form` as in build_data_loader)."""
    from mtrain.eval.in_loop import held_out_loader, one_pass  # noqa: PLC0415
    from mtrain.launch.env import WorldInfo  # noqa: PLC0415

    single = WorldInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")
    return one_pass(held_out_loader(cfg, built, single, shards, form), num_batches)


def trained_scales(cfg: Any, built: Any) -> list[int]:
    """The visual-token budgets a model was trained at: its scales, or the full grid without any."""
    tokens = cfg.matryoshka.tokens
    return list(tokens.scales) if tokens.mode != "none" else [built.visual_tokens]


def check_budgets_trained(scales: list[int], trained: list[int], allow_untrained: bool) -> None:
    """Refuse budgets the model never trained at unless asked for explicitly (their figures are then marked)."""
    untrained = [s for s in scales if s not in trained]
    if untrained and not allow_untrained:
        raise ValueError(
            f"--scales {untrained}: this model was trained only at {trained} visual tokens; add --untrained-budgets "
            "to evaluate there anyway (the table and budget.json mark those budgets)"
        )


def run_eval(
    source: str,
    overrides: list[str],
    shards: str | None,
    num_batches: int,
    scales: list[int] | None,
    out: str,
    allow_untrained: bool = False,
) -> list:
    if shards:  # before the model loads: a typo here should not cost a model load
        from mtrain.launch.inputs import check_shards_exist  # noqa: PLC0415

        check_shards_exist(shards, "--shards")
    cfg, built, task = load_for_eval(source, overrides, shards)
    trained = trained_scales(cfg, built)
    check_budgets_trained(scales or trained, trained, allow_untrained)
    view = budget_view(cfg, built, task, scales or (trained if cfg.matryoshka.tokens.mode == "none" else None))
    results = evaluate_budgets(view, eval_batches(cfg, built, shards, num_batches))
    for result in results:
        result.trained = result.scale in trained
    print(format_table(results))
    if not all(r.trained for r in results):
        print("trained=no: a budget this model never trained at (--untrained-budgets)")
    json_path, png_path = write_report(results, Path(out), name=str(source))
    print(f"wrote {json_path} and {png_path}")
    return results
