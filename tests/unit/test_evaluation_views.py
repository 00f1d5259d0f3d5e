"""Each registry entry says which task `mtrain eval` and the embed API score: the trained one, or one over its model."""

from __future__ import annotations

import pytest
import torch

from mtrain.config import load_config
from mtrain.model.build import build_model
from mtrain.task.contrastive import ContrastiveTask
from mtrain.task.language_modeling import LanguageModelingTask
from mtrain.task.matryoshka_tokens import MatryoshkaTokenTask
from mtrain.task.registry import budget_view, build_task, retrieval_view


def trained(*overrides: str):
    cfg = load_config(None, list(overrides))
    built = build_model(cfg.model, torch.float32, None, cfg.run.seed, cfg.matryoshka.tokens)
    return cfg, built, build_task(cfg, built, rank=0)


@pytest.mark.parametrize(
    ("overrides", "trained_as"),
    [([], LanguageModelingTask), (["task.objective=contrastive"], ContrastiveTask)],
    ids=["language_modeling", "contrastive"],
)
def test_a_model_trained_without_token_scales_is_scored_at_every_m3_budget_of_its_grid(overrides, trained_as):
    cfg, built, task = trained(*overrides)
    assert type(task) is trained_as
    view = budget_view(cfg, built, task, None)
    assert isinstance(view, MatryoshkaTokenTask) and view.model is task.model and not view.training
    assert (view.tokens.mode, view.tokens.scales) == ("m3", [1, 4, 16, 64])  # the tiny preset's 8x8 grid
    assert budget_view(cfg, built, task, [4, 16]).tokens.scales == [4, 16]


def test_a_matryoshka_model_is_scored_at_its_trained_scales_or_at_budgets_of_its_own_mode():
    cfg, built, task = trained("matryoshka.tokens.mode=mqt", "matryoshka.tokens.mqt_queries=16")
    assert budget_view(cfg, built, task, None) is task
    view = budget_view(cfg, built, task, [2, 8])
    assert (view.tokens.mode, view.tokens.scales, view.tokens.mqt_queries) == ("mqt", [2, 8], 16)
    assert view.model is task.model


def test_retrieval_embeds_with_the_trained_contrastive_task_or_one_over_the_model():
    cfg, built, task = trained("task.objective=contrastive")
    assert retrieval_view(cfg, built, task) is task
    cfg, built, task = trained("matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[4,64]")
    view = retrieval_view(cfg, built, task)
    assert isinstance(view, ContrastiveTask) and view.model is task.model and not view.training
