"""Draws of visual-token scales and MQT's m: per micro-batch, the same on every rank, uniform, resumable."""

from __future__ import annotations

import collections

import torch

from mtrain.config import load_config
from mtrain.model.build import build_model
from mtrain.task.draws import ScaleSampler, draw_seed, mqt_even_budgets
from mtrain.task.registry import build_task

# chi2.ppf(0.001, 127) and chi2.ppf(0.999, 127) (scipy.stats), for 128 equally likely budgets.
CHI2_127_LOW, CHI2_127_HIGH = 83.381, 181.993


def test_mqt_budgets_default_to_every_even_number_up_to_m_as_the_recipe_trains():
    cfg = load_config(None, ["matryoshka.tokens.mode=mqt", "matryoshka.tokens.mqt_queries=16"])
    assert cfg.matryoshka.tokens.scales == [2, 4, 6, 8, 10, 12, 14, 16] == mqt_even_budgets(16)
    recipe = load_config("configs/recipes/mqt_finetune.yaml", [])
    assert recipe.matryoshka.tokens.scales == list(range(2, 257, 2))
    assert recipe.matryoshka.tokens.policy == "sample_per_step"
    explicit = load_config(None, ["matryoshka.tokens.mode=mqt", "matryoshka.tokens.scales=[4,64]"])
    assert explicit.matryoshka.tokens.scales == [4, 64]


def test_mqt_m_draws_are_uniform_over_the_even_budgets_chi_squared():
    budgets = mqt_even_budgets(256)
    sampler = ScaleSampler(budgets, "sample_per_step", seed=1234)
    draws = [sampler.step_scale(step, micro_batch) for step in range(3200) for micro_batch in range(4)]
    counts = collections.Counter(draws)
    assert set(counts) == set(budgets)  # every even m is drawn, none other
    expected = len(draws) / len(budgets)
    chi2 = sum((counts[m] - expected) ** 2 / expected for m in budgets)
    assert CHI2_127_LOW < chi2 < CHI2_127_HIGH, chi2


def test_draw_keys_never_collide_across_neighbouring_steps_micro_batches_and_streams():
    keys = {draw_seed(7, step, micro, stream) for step in range(50) for micro in range(4) for stream in ("a", "b")}
    assert len(keys) == 50 * 4 * 2


def token_task(rank: int, policy: str):
    cfg = load_config(
        None,
        [
            "matryoshka.tokens.mode=m3",
            "matryoshka.tokens.scales=[1,4,16,64]",
            f"matryoshka.tokens.policy={policy}",
            "optim.grad_accum_steps=4",
        ],
    )
    built = build_model(cfg.model, torch.float32, None, seed=0)
    return build_task(cfg, built, rank=rank)


def test_sample_per_sample_draws_anew_per_micro_batch_and_alike_on_every_rank():
    rank0, rank1 = token_task(0, "sample_per_sample"), token_task(1, "sample_per_sample")
    plans = {}
    for micro_batch in range(4):
        for task in (rank0, rank1):
            task.begin_step(9, micro_batch)
        plan = rank0.variant_scales(rows=1)
        assert plan == rank1.variant_scales(rows=1)  # every rank runs the same scales
        plans[micro_batch] = rank0.variant_scales(rows=8)
        assert plans[micro_batch] == rank1.variant_scales(rows=8)
    # micro_batch_size 1 under accumulation no longer collapses to one scale per step
    assert len({tuple(plan[:1]) for plan in plans.values()}) > 1
    assert len({tuple(plan) for plan in plans.values()}) == 4
    # Resumable: the draws hold no state, so coming back to (step, micro-batch) later draws the same.
    rank0.begin_step(10, 0)
    rank0.variant_scales(rows=8)
    rank0.begin_step(9, 2)
    assert rank0.variant_scales(rows=8) == plans[2]
    assert ScaleSampler([1, 4, 16, 64], "sample_per_sample", seed=1234).row_scales(9, 8, micro_batch=2) == plans[2]


def test_sample_per_step_draws_one_scale_per_micro_batch_alike_on_every_rank():
    rank0, rank1 = token_task(0, "sample_per_step"), token_task(1, "sample_per_step")
    drawn = []
    for step in range(6):
        for micro_batch in range(4):
            rank0.begin_step(step, micro_batch)
            rank1.begin_step(step, micro_batch)
            plan = rank0.variant_scales(rows=3)
            assert plan == rank1.variant_scales(rows=3) and len(set(plan)) == 1
            drawn.append(plan[0])
    assert len(set(drawn[:4])) > 1 or len(set(drawn[4:8])) > 1  # micro-batches of one step differ


def test_rank_spread_is_zero_for_ranks_that_agree_even_when_micro_batches_differ():
    from mtrain.task.draws import draw_slots, rank_spread

    def totals(per_rank_draws: list[list[int]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for draws in per_rank_draws:  # the trainer sums over micro-batches, then over ranks
            for micro_batch, value in enumerate(draws):
                for name, tensor in draw_slots("m", value, micro_batch).items():
                    out[name] = out[name] + tensor if name in out else tensor
        return out

    assert rank_spread(totals([[2, 64, 8], [2, 64, 8]]), "m") == 0.0
    assert rank_spread(totals([[2, 64, 8], [2, 64, 10]]), "m") == 1.0  # (8 - 10)^2 / 4
