"""The in-loop evaluation in one process on the tiny model: what it logs per budget, that it leaves the
training RNG and train mode as they were, and that it equals `mtrain eval`'s code path (the 2-rank ZeRO-3
proof is tests/integration/test_checkpoint_resume.py)."""

from __future__ import annotations

import random

import pytest
import torch

from mtrain.config import load_config
from mtrain.eval.in_loop import InLoopEval
from mtrain.launch.env import WorldInfo
from tests.conftest import REPO

SINGLE = WorldInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")


def build(config: str, overrides: list[str]):
    from mtrain.model.build import build_model
    from mtrain.task.registry import build_task

    cfg = load_config(REPO / "configs" / config, overrides)
    built = build_model(cfg.model, torch.float32, None, cfg.run.seed, cfg.matryoshka.tokens)
    return cfg, built, build_task(cfg, built, rank=0).train()


def evaluate_untouched(cfg, built, task: torch.nn.Module) -> dict[str, float]:
    """Set up and evaluate as a training run does, checking that the RNG streams and every module's train mode
    are as they were (a view built in eval mode once switched the training model's dropout off)."""
    evaluation = InLoopEval.for_run(cfg, SINGLE, built, task)
    assert all(module.training for module in task.modules())
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    metrics = evaluation.evaluate(lambda batch: batch, "cpu")
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert all(module.training for module in task.modules())
    return metrics


def test_language_model_budgets_equal_mtrain_eval_and_leave_training_untouched(tmp_path):
    from data_pipeline.sample_data import write_sample_shards
    from mtrain.eval.budget import evaluate_budgets
    from mtrain.eval.run import eval_batches
    from mtrain.task.registry import budget_view

    write_sample_shards(tmp_path, num_shards=1, samples_per_shard=12, seed=3)
    held_out = str(tmp_path / "shard-000000.tar")
    cfg, built, task = build("tiny.yaml", [f"eval.shards={held_out}", "eval.scales=[4,64]", "data.micro_batch_size=5"])
    metrics = evaluate_untouched(cfg, built, task)
    assert [metrics[f"eval/answers/scale_{s}"] for s in (4, 64)] == [12.0, 12.0]  # 5 + 5 + 2 rows, each once
    offline = evaluate_budgets(budget_view(cfg, built, task.eval(), [4, 64]), eval_batches(cfg, built, held_out))
    for row in offline:
        assert row.tokens == metrics[f"eval/tokens/scale_{row.scale}"]
        assert row.loss == pytest.approx(metrics[f"eval/loss/scale_{row.scale}"], rel=1e-6)


def test_contrastive_recall_per_dim_equals_mtrain_eval(tmp_path):
    from data_pipeline.pairs import PairForm, write_pair_shards
    from mtrain.engine.data import pair_spec
    from mtrain.eval.retrieval import evaluate_retrieval
    from mtrain.eval.run import eval_batches

    write_pair_shards(tmp_path, num_shards=1, samples_per_shard=10, seed=4)
    held_out = str(tmp_path / "pairs-000000.tar")
    cfg, built, task = build("tiny_embed.yaml", [f"eval.shards={held_out}", "eval.dims=[8,64]"])
    metrics = evaluate_untouched(cfg, built, task)
    assert sorted(metrics) == sorted(
        f"eval/{name}/dim_{d}" for name in ("recall_at_1", "recall_at_5", "queries") for d in (8, 64)
    )
    assert metrics["eval/queries/dim_8"] == 10.0
    stream = eval_batches(cfg, built, held_out, form=PairForm(pair_spec(cfg, built)))
    offline = evaluate_retrieval(task.eval(), stream, 1 << 30, [8, 64])
    for row in offline:
        assert (row.recall_at_1, row.recall_at_5) == (
            metrics[f"eval/recall_at_1/dim_{row.dim}"],
            metrics[f"eval/recall_at_5/dim_{row.dim}"],
        )
