"""One entry per training objective: how to build its task, its batches, its export extras and its
evaluation views.

torchtitan's `TrainSpec` at mtrain's size. The engine and `mtrain eval` look the entry up once
(`objective_for(cfg)`) and never branch on the objective again, so a new objective is a new
`Objective` here (and its task module), not edits across the engine and the evaluation.

    language_modeling    next-token loss on the loader's batches (captions, documents, chat)
    matryoshka_tokens    the same batches, every visual-token scale in one pass (M3, MQT)
    contrastive          (query, positive) pair batches, InfoNCE with Matryoshka dims (MRL, 2DMSE, Starbucks)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrain.config.schema import TokenScalesConfig, TrainConfig
from mtrain.launch.env import WorldInfo
from mtrain.model.build import BuiltModel
from mtrain.model.token_scales import grid_scales, m3_scales, reference_scales
from mtrain.task.base import Task
from mtrain.task.contrastive import ContrastiveTask
from mtrain.task.language_modeling import LanguageModelingTask
from mtrain.task.matryoshka_tokens import MatryoshkaTokenTask


def no_export_extras(task: Task, export_dir: Path, write: bool) -> None:
    """The Hugging Face export (and the adapter) is all this objective exports."""


def language_modeling_task(cfg: TrainConfig, built: BuiltModel, rank: int) -> Task:
    return LanguageModelingTask(built.model, built.image_token_id, built.family, built.visual_grid, built.visual_tokens)


def matryoshka_tokens_task(cfg: TrainConfig, built: BuiltModel, rank: int) -> Task:
    return token_scales_task(cfg, built, cfg.matryoshka.tokens, rank)


def token_scales_task(cfg: TrainConfig, built: BuiltModel, tokens: TokenScalesConfig, rank: int) -> MatryoshkaTokenTask:
    """A Matryoshka task over the built model at the visual-token scales of `tokens`."""
    return MatryoshkaTokenTask(
        built.model,
        tokens,
        image_token_id=built.image_token_id,
        visual_tokens=built.visual_tokens,
        pad_token_id=built.tokenizer.pad_token_id,
        seed=cfg.run.seed,
        rank=rank,
        routing=built.scale_routing,
        family=built.family,
        visual_grid=built.visual_grid,
    )


def contrastive_task(cfg: TrainConfig, built: BuiltModel, rank: int) -> Task:
    return ContrastiveTask(
        built.model,
        cfg.task.contrastive,
        cfg.matryoshka.dims,
        image_token_id=built.image_token_id,
        visual_tokens=built.visual_tokens,
        pad_token_id=built.tokenizer.pad_token_id,
        seed=cfg.run.seed,
        family=built.family,
        visual_grid=built.visual_grid,
    )


def loader_batches(cfg: TrainConfig, built: BuiltModel, world: WorldInfo) -> Any:
    from mtrain.engine.data import build_data_loader  # noqa: PLC0415

    return build_data_loader(cfg, built, world)


def pair_batches(cfg: TrainConfig, built: BuiltModel, world: WorldInfo) -> Any:
    from mtrain.engine.data import build_pair_loader  # noqa: PLC0415

    return build_pair_loader(cfg, built, world)


def embedding_head_export(task: Task, export_dir: Path, write: bool) -> None:
    """`embedding.json` and the projection head beside the Hugging Face export (collective under ZeRO-3)."""
    from mtrain.checkpoint.embedding_export import save_embedding_head  # noqa: PLC0415

    save_embedding_head(task, export_dir, write=write)


# ── evaluation views: the task `mtrain eval` scores, from the task the run trained ─────────────
def m3_budget_view(cfg: TrainConfig, built: BuiltModel, task: Task, scales: list[int] | None) -> Task:
    """A model trained without visual-token scales, scored at M3's pooled budgets (default: every one its
    grid has): the baseline the M3 paper beats."""
    tokens = TokenScalesConfig(mode="m3", scales=scales or default_m3_budgets(built))
    return token_scales_task(cfg, built, tokens, rank=0).eval()


def default_m3_budgets(built: BuiltModel) -> list[int]:
    """Every M3 budget of the model's images: its grid's (the family's M3 grid, or Qwen's merged grid at one
    image size), the reference grid's at Qwen's native resolution, else those of a square grid."""
    grid = built.family.m3_grid(built.model.config) if built.family is not None else None
    grid = grid or built.visual_grid
    if grid:
        return grid_scales(grid)
    if getattr(built.image_processor, "variable_patches", False):
        return reference_scales(built.visual_tokens)
    return m3_scales(built.visual_tokens)


def trained_budget_view(cfg: TrainConfig, built: BuiltModel, task: Task, scales: list[int] | None) -> Task:
    """The trained Matryoshka task at its own scales, or one of its mode at `scales`."""
    if not scales:
        return task
    check_scale_adapters(cfg, scales)
    trained = cfg.matryoshka.tokens
    tokens = TokenScalesConfig(mode=trained.mode, scales=scales, mqt_queries=trained.mqt_queries)
    return token_scales_task(cfg, built, tokens, rank=0).eval()


def check_scale_adapters(cfg: TrainConfig, scales: list[int]) -> None:
    """Refuse scales without an adapter in a model with per-scale LoRA: they would run with none, silently."""
    missing = cfg.scales_without_adapter(scales)
    if missing:
        raise ValueError(
            f"--scales {missing}: this model has {cfg.model.lora.strategy} LoRA adapters only for the scales "
            f"{cfg.matryoshka.tokens.scales}, so it would run there without a scale adapter; evaluate at trained scales"
        )


def full_width_retrieval_view(cfg: TrainConfig, built: BuiltModel, task: Task) -> Task:
    """A model trained for next tokens, embedded through a contrastive task over it (at the full width)."""
    return contrastive_task(cfg, built, rank=0).eval()


def trained_retrieval_view(cfg: TrainConfig, built: BuiltModel, task: Task) -> Task:
    """The trained contrastive task itself: its projection head and dims are what retrieval scores."""
    return task


@dataclass(frozen=True)
class Objective:
    """How one objective plugs into the engine and the evaluation."""

    name: str
    build_task: Callable[[TrainConfig, BuiltModel, int], Task]
    """The one module DeepSpeed wraps: the model with this objective's losses."""
    build_batches: Callable[[TrainConfig, BuiltModel, WorldInfo], Any]
    """This rank's endless, resumable batches (a `mtrain.engine.data.Batches`)."""
    export_extras: Callable[[Task, Path, bool], None] = no_export_extras
    """What the end-of-run export writes beside the model; every rank calls it, `write` ranks write."""
    budget_view: Callable[[TrainConfig, BuiltModel, Task, list[int] | None], Task] = m3_budget_view
    """`mtrain eval`'s task at visual-token budgets (None: the default ones), from the trained task."""
    retrieval_view: Callable[[TrainConfig, BuiltModel, Task], Task] = full_width_retrieval_view
    """The task `mtrain eval --task retrieval` and `Embedder` embed with, from the trained task."""
    embeds: bool = False
    """The model's output is an embedding: the export records its dims and layers and writes the
    `matryoshka_dimensions` serving stacks read."""
    held_out_metrics: str = "token_budgets"
    """What the in-loop evaluation reports: "token_budgets" (loss and accuracy per visual-token scale,
    through `budget_view`) or "retrieval" (recall@k per dim and layer, through `retrieval_view`)."""


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        Objective("language_modeling", language_modeling_task, loader_batches),
        Objective("matryoshka_tokens", matryoshka_tokens_task, loader_batches, budget_view=trained_budget_view),
        Objective(
            "contrastive",
            contrastive_task,
            pair_batches,
            export_extras=embedding_head_export,
            retrieval_view=trained_retrieval_view,
            embeds=True,
            held_out_metrics="retrieval",
        ),
    )
}


def objective_for(cfg: TrainConfig) -> Objective:
    """The registry entry a config trains: `task.objective`, with visual-token scales when they are on."""
    if cfg.task.objective == "contrastive":
        return OBJECTIVES["contrastive"]
    return OBJECTIVES["matryoshka_tokens" if cfg.matryoshka.tokens.mode != "none" else "language_modeling"]


def build_task(cfg: TrainConfig, built: BuiltModel, rank: int) -> Task:
    """The task module of the configured objective."""
    return objective_for(cfg).build_task(cfg, built, rank)


def budget_view(cfg: TrainConfig, built: BuiltModel, task: Task, scales: list[int] | None) -> Task:
    """The task `mtrain eval` scores at visual-token `scales` (None: the trained ones, else every M3 one)."""
    return objective_for(cfg).budget_view(cfg, built, task, scales)


def retrieval_view(cfg: TrainConfig, built: BuiltModel, task: Task) -> Task:
    """The contrastive task retrieval evaluation and the embed API use: the trained one, or one over its model."""
    return objective_for(cfg).retrieval_view(cfg, built, task)
