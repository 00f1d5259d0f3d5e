"""`mtrain eval` orchestration: load, stream held-out batches, score every scale, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtrain.eval.budget import budget_view, evaluate_budgets, format_table, load_for_eval, write_report


def eval_batches(cfg: Any, built: Any, shards: str) -> Any:
    """Held-out batches in a single process, in order (no shuffling)."""
    from data_pipeline.loader import CaptionStream, TextSpec  # noqa: PLC0415

    text = TextSpec(built.tokenizer, built.image_token_id, built.visual_tokens, cfg.data.max_len, cfg.data.prompt)
    return iter(CaptionStream(shards, 0, 1, cfg.data.micro_batch_size, text, built.image_processor, seed=cfg.run.seed))


def run_eval(
    source: str, overrides: list[str], shards: str | None, num_batches: int, scales: list[int] | None, out: str
) -> list:
    cfg, built, task = load_for_eval(source, overrides)
    view = budget_view(cfg, built, task, scales)
    results = evaluate_budgets(view, eval_batches(cfg, built, shards or cfg.data.shards), num_batches)
    print(format_table(results))
    json_path, png_path = write_report(results, Path(out), name=str(source))
    print(f"wrote {json_path} and {png_path}")
    return results
