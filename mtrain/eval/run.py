"""`mtrain eval` orchestration: load, stream held-out batches, score every scale, report."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mtrain.eval.budget import evaluate_budgets, format_table, load_for_eval, write_report
from mtrain.task.registry import budget_view


def eval_batches(cfg: Any, built: Any, shards: str | None, form: Any = None) -> Any:
    """Held-out batches in a single process, in shard order (no shuffling); `form` as in build_data_loader."""
    from mtrain.engine.data import build_data_loader  # noqa: PLC0415
    from mtrain.launch.env import WorldInfo  # noqa: PLC0415

    data = dataclasses.replace(cfg.data, shuffle=False, num_workers=0)
    if shards:
        data = dataclasses.replace(data, shards=shards, sources=[])
    single = WorldInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")
    return build_data_loader(dataclasses.replace(cfg, data=data), built, single, form=form)


def run_eval(
    source: str, overrides: list[str], shards: str | None, num_batches: int, scales: list[int] | None, out: str
) -> list:
    if shards:  # before the model loads: a typo here should not cost a model load
        from mtrain.launch.inputs import check_shards_exist  # noqa: PLC0415

        check_shards_exist(shards, "--shards")
    cfg, built, task = load_for_eval(source, overrides, shards)
    view = budget_view(cfg, built, task, scales)
    results = evaluate_budgets(view, eval_batches(cfg, built, shards), num_batches)
    print(format_table(results))
    json_path, png_path = write_report(results, Path(out), name=str(source))
    print(f"wrote {json_path} and {png_path}")
    return results
