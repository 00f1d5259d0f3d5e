"""One entry per training objective: how to build its task, its batches and its export extras.

torchtitan's `TrainSpec` at mtrain's size. The engine looks the entry up once
(`objective_for(cfg)`) and never branches on the objective again, so a new objective is a new
`Objective` here (and its task module), not edits across the engine.

    language_modeling    next-token loss on the loader's batches (captions, documents, chat)
    matryoshka_tokens    the same batches, every visual-token scale in one pass (M3, MQT)
    contrastive          (query, positive) pair batches, InfoNCE with Matryoshka dims (MRL, 2DMSE, Starbucks)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrain.config.schema import TrainConfig
from mtrain.launch.env import WorldInfo
from mtrain.model.build import BuiltModel
from mtrain.task.base import Task
from mtrain.task.contrastive import ContrastiveTask
from mtrain.task.language_modeling import LanguageModelingTask
from mtrain.task.matryoshka_tokens import MatryoshkaTokenTask


def no_export_extras(task: Task, export_dir: Path, write: bool) -> None:
    """The Hugging Face export (and the adapter) is all this objective exports."""


def language_modeling_task(cfg: TrainConfig, built: BuiltModel, rank: int) -> Task:
    return LanguageModelingTask(built.model, built.image_token_id)


def matryoshka_tokens_task(cfg: TrainConfig, built: BuiltModel, rank: int) -> Task:
    return MatryoshkaTokenTask(
        built.model,
        cfg.matryoshka.tokens,
        image_token_id=built.image_token_id,
        visual_tokens=built.visual_tokens,
        pad_token_id=built.tokenizer.pad_token_id,
        seed=cfg.run.seed,
        rank=rank,
        routing=built.scale_routing,
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


@dataclass(frozen=True)
class Objective:
    """How one objective plugs into the engine."""

    name: str
    build_task: Callable[[TrainConfig, BuiltModel, int], Task]
    """The one module DeepSpeed wraps: the model with this objective's losses."""
    build_batches: Callable[[TrainConfig, BuiltModel, WorldInfo], Any]
    """This rank's endless, resumable batches (a `mtrain.engine.data.Batches`)."""
    export_extras: Callable[[Task, Path, bool], None] = no_export_extras
    """What the end-of-run export writes beside the model; every rank calls it, `write` ranks write."""


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        Objective("language_modeling", language_modeling_task, loader_batches),
        Objective("matryoshka_tokens", matryoshka_tokens_task, loader_batches),
        Objective("contrastive", contrastive_task, pair_batches, embedding_head_export),
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
