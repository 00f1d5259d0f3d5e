"""`mtrain eval --task retrieval`: recall@1 and recall@5 at every embedding dim (and layer), table, JSON, PNG.

Held-out pairs are embedded once at every layer evaluated; each (layer, dim) then scores the
prefixes as the model was trained (cosine of re-normalised prefixes, or Starbucks' dot). The
gallery is the set of distinct positives (pairs sharing a caption share one gallery entry), so a
query is right at k when its positive is among the k most similar entries.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mtrain.eval.budget import format_columns, save_log2_curves
from mtrain.task.embedding_losses import Scoring, prefix_scores

RECALL_AT = (1, 5)


@dataclass
class RetrievalResult:
    layer: int
    dim: int
    recall_at_1: float
    recall_at_5: float
    queries: int
    gallery: int


@torch.no_grad()
def embed_pairs(
    task: Any, batches: Iterator[dict[str, Any]], num_batches: int, layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(layers, N, width) query and positive embeddings of `num_batches` batches, and the positive texts."""
    queries, positives, texts = [], [], []
    for _, batch in zip(range(num_batches), batches, strict=False):
        q, p = task.encode_pairs(batch, layers)
        queries.append(q.float().cpu())  # scored on the host, beside the texts
        positives.append(p.float().cpu())
        texts += batch["positive_texts"]
    if not queries:
        raise ValueError("the evaluation shards gave no batch; point --shards at held-out pair shards")
    return torch.cat(queries, dim=1), torch.cat(positives, dim=1), texts


def recall_at(
    queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor, dim: int, scoring: Scoring = "cosine"
) -> dict[int, float]:
    """Fraction of queries whose target is among the k most similar gallery entries, for k in RECALL_AT,
    scored as the model was trained (`matryoshka.dims.scoring`: Starbucks ranks by raw dot products)."""
    scores = prefix_scores(queries, gallery, dim, scoring)
    target_scores = scores.gather(1, targets[:, None])
    rank = (scores > target_scores).sum(dim=1)  # entries strictly better than the target
    return {k: float((rank < k).float().mean()) for k in RECALL_AT}


def evaluate_retrieval(
    task: Any, batches: Iterator[dict[str, Any]], num_batches: int, dims: list[int] | None = None
) -> list[RetrievalResult]:
    layers = task.evaluated_layers()
    queries, positives, texts = embed_pairs(task, batches, num_batches, layers)
    return score_retrieval(queries, positives, texts, layers, dims or task.dims, task.dims_config.resolved_scoring)


def score_retrieval(
    queries: torch.Tensor,
    positives: torch.Tensor,
    texts: list[str],
    layers: list[int],
    dims: list[int],
    scoring: Scoring,
) -> list[RetrievalResult]:
    """Recall at every (layer, dim) of (layers, N, width) embeddings; the gallery is the distinct positives."""
    distinct = list(dict.fromkeys(texts))
    first = [texts.index(text) for text in distinct]
    targets = torch.tensor([distinct.index(text) for text in texts])
    results = []
    for i, layer in enumerate(layers):
        gallery = positives[i, first]
        for dim in dims:
            recall = recall_at(queries[i], gallery, targets, dim, scoring)
            results.append(RetrievalResult(layer, dim, recall[1], recall[5], len(texts), len(distinct)))
    return results


def format_retrieval_table(results: list[RetrievalResult]) -> str:
    columns = [("layer", 5, "d"), ("dim", 6, "d"), ("recall@1", 9, ".3f"), ("recall@5", 9, ".3f")]
    rows = [(r.layer, r.dim, r.recall_at_1, r.recall_at_5, r.queries, r.gallery) for r in results]
    return format_columns([*columns, ("queries", 8, "d"), ("gallery", 8, "d")], rows)


def plot_recall_curve(results: list[RetrievalResult], path: Path, title: str) -> Path:
    """Recall@1 and recall@5 against dims (log axis), one line per layer."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for layer in sorted({r.layer for r in results}):
        rows = [r for r in results if r.layer == layer]
        for ax, metric in zip(axes, ("recall_at_1", "recall_at_5"), strict=True):
            ax.plot([r.dim for r in rows], [getattr(r, metric) for r in rows], marker="o", label=f"layer {layer}")
    for ax in axes:
        ax.set_ylim(0, 1.02)
    figure.suptitle(title, fontsize=9)
    return save_log2_curves(figure, axes, "embedding dims", ("recall@1", "recall@5"), path)


def write_retrieval_report(results: list[RetrievalResult], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "retrieval.json"
    json_path.write_text(json.dumps({"name": name, "results": [asdict(r) for r in results]}, indent=1))
    return json_path, plot_recall_curve(results, out_dir / "retrieval.png", name)


def run_retrieval_eval(
    source: str, overrides: list[str], shards: str | None, num_batches: int, dims: list[int] | None, out: str
) -> list[RetrievalResult]:
    from data_pipeline.pairs import PairForm  # noqa: PLC0415
    from mtrain.engine.data import pair_spec  # noqa: PLC0415
    from mtrain.engine.setup import resolve_placement  # noqa: PLC0415
    from mtrain.engine.trainer import batch_to_device  # noqa: PLC0415
    from mtrain.eval.budget import eval_source, whole_task  # noqa: PLC0415
    from mtrain.eval.run import eval_batches  # noqa: PLC0415
    from mtrain.task.registry import retrieval_view  # noqa: PLC0415

    if shards:  # before the model loads, as `mtrain eval` does for the token budgets
        from mtrain.launch.inputs import check_shards_exist  # noqa: PLC0415

        check_shards_exist(shards, "--shards")
    cfg, checkpoint = eval_source(source, overrides, shards)
    placement = resolve_placement(cfg)  # the training precision: bf16 on a GPU, fp32 on the CPU by default
    built, task = whole_task(cfg, checkpoint, placement.dtype, placement.device)
    view = retrieval_view(cfg, built, task)
    stream = eval_batches(cfg, built, shards, num_batches, form=PairForm(pair_spec(cfg, built)))
    moved = (batch_to_device(batch, placement.device, view.input_dtype) for batch in stream)
    results = evaluate_retrieval(view, moved, num_batches or sys.maxsize, dims)
    print(format_retrieval_table(results))
    json_path, png_path = write_retrieval_report(results, Path(out), name=str(source))
    print(f"wrote {json_path} and {png_path}")
    return results
