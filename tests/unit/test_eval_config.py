"""The `eval:` block: strict values checked when the config is built, missing held-out shards before any spawn,
and the pieces of the in-loop evaluation that need no model (one pass over a real loader, lockstep rounds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtrain.config import ConfigError, load_config
from mtrain.eval.budget import TOKEN_SUMS
from mtrain.eval.held_out import lockstep, one_pass
from mtrain.eval.in_loop import token_metrics

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
M3 = ["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16,64]"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.shards=h.tar", "eval.every=-1"], r"eval.every: must be >= 0"),
        (["eval.shards=h.tar", "eval.batches=-2"], r"eval.batches: must be >= 0"),
        (["eval.every=5"], r"eval.shards: is empty, so nothing is evaluated"),
        (["eval.shards=h.tar", "eval.scales=[4,1]"], r"eval.scales: must be positive and strictly increasing"),
        (["eval.shards=h.tar", "eval.scales=[9]"], r"eval.scales: \[9\]: each must be a square whose side divides"),
        (["eval.shards=h.tar", "eval.scales=[256]"], r"eval.scales: 256 exceeds the 64 visual tokens"),
        (["eval.shards=h.tar", "eval.dims=[16]"], r"eval.dims: are embedding budgets of task.objective=contrastive"),
        (
            [*M3, "model.lora.strategy=per_scale", "eval.shards=h.tar", "eval.scales=[1,2]"],
            r"eval.scales: \[2\] have no per_scale LoRA adapter",
        ),
        (["eval.shard=h.tar"], r"eval.shard: unknown key; did you mean 'eval.shards'"),
        (["eval.shards=h.tar", "eval.generate_samples=-1"], r"eval.generate_samples: must be >= 0 \(0: no generation"),
        (["eval.shards=h.tar", "eval.max_new_tokens=0"], r"eval.max_new_tokens: must be >= 1"),
        (
            ["task.objective=contrastive", "eval.shards=h.tar", "eval.generate_samples=8"],
            r"eval.generate_samples: needs task.objective=lm",
        ),
    ],
)
def test_bad_eval_values_fail_when_the_config_is_built(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_eval_defaults_are_off_and_valid_settings_load():
    assert not load_config(TINY).eval.enabled
    cfg = load_config(TINY, [*M3, "eval.shards=h.tar", "eval.every=10", "eval.scales=[1,64]", "eval.batches=3"])
    assert (cfg.eval.enabled, cfg.eval.every, cfg.eval.scales, cfg.eval.batches) == (True, 10, [1, 64], 3)
    assert cfg.eval.generate_samples == 0  # generation is off unless asked for
    cfg = load_config(TINY, ["eval.shards=h.tar", "eval.generate_samples=32", "eval.max_new_tokens=8"])
    assert (cfg.eval.generate_samples, cfg.eval.max_new_tokens) == (32, 8)


def test_missing_held_out_shards_fail_in_validate_before_any_spawn(tmp_path, capsys):
    from mtrain.cli import main

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-000000.tar").write_bytes(b"")
    code = main(["validate", str(TINY), f"data.shards={shards}/shard-000000.tar", f"eval.shards={tmp_path}/nope.tar"])
    assert code == 2
    assert "eval.shards: 1 shard(s) not found" in capsys.readouterr().err


def test_one_pass_reads_each_rank_share_once_and_stops(tmp_path):
    """A real loader over 11 held-out samples on 2 ranks (6 + 5, batches of 4): each rank's share once, in order."""
    import random

    from tests.data_factory import caption_shard, make_loader

    keys = [f"h{i:03d}" for i in range(11)]
    caption_shard(tmp_path / "held-000000.tar", keys, random.Random(0))
    pattern = str(tmp_path / "held-000000.tar")
    shares = [[k for b in one_pass(make_loader(pattern, rank=r, world_size=2, shuffle=False)) for k in b["keys"]]
              for r in range(2)]  # fmt: skip
    assert sorted(shares[0] + shares[1]) == keys and not set(shares[0]) & set(shares[1])
    assert [len(s) for s in shares] == [6, 5]
    limited = list(one_pass(make_loader(pattern, shuffle=False), limit=2))
    assert [len(b["keys"]) for b in limited] == [4, 4]


def sums_reduce(values: torch.Tensor) -> torch.Tensor:
    return values  # one rank: the sum over ranks is the rank's own


def test_lockstep_runs_every_round_and_counts_only_real_batches():
    # Two "ranks" simulated in turn is not possible here; one rank with 3 batches: 3 counted rounds, then stop.
    batches = iter([{"i": 0}, {"i": 1}, {"i": 2}])
    rounds = list(lockstep(batches, sums_reduce, world_size=1))
    assert [(b["i"], counted) for b, counted in rounds] == [(0, True), (1, True), (2, True)]


def test_lockstep_repeats_the_last_batch_uncounted_while_another_rank_still_has_batches():
    holding = iter([2.0, 2.0, 1.0, 1.0, 0.0])  # what the all-reduce reports: this rank ends first

    def other_rank_longer(values: torch.Tensor) -> torch.Tensor:
        return torch.tensor([next(holding)], dtype=torch.float64)

    rounds = list(lockstep(iter([{"i": 0}, {"i": 1}]), other_rank_longer, world_size=2))
    assert [(b["i"], counted) for b, counted in rounds] == [(0, True), (1, True), (1, False), (1, False)]


def test_lockstep_refuses_a_held_out_set_smaller_than_the_ranks():
    with pytest.raises(ValueError, match=r"eval.shards gave 1 of 2 ranks no batch"):
        list(lockstep(iter([]), lambda values: torch.tensor([1.0], dtype=torch.float64), world_size=2))


def test_token_metrics_divide_sums_over_ranks():
    sums = {4: torch.tensor([30.0, 10.0, 4.0, 1.0, 2.0], dtype=torch.float64)}
    assert len(TOKEN_SUMS) == 5
    metrics = token_metrics(sums)
    assert metrics["eval/loss/scale_4"] == 3.0
    assert metrics["eval/token_accuracy/scale_4"] == 0.4
    assert metrics["eval/answer_accuracy/scale_4"] == 0.5
    assert (metrics["eval/tokens/scale_4"], metrics["eval/answers/scale_4"]) == (10.0, 2.0)


def test_mtrain_eval_refuses_untrained_budgets_without_the_flag():
    from mtrain.eval.run import check_budgets_trained

    with pytest.raises(
        ValueError, match=r"--scales \[1, 4\]: this model was trained only at \[64\].*--untrained-budgets"
    ):
        check_budgets_trained([1, 4, 64], [64], allow_untrained=False)
    check_budgets_trained([1, 4, 64], [64], allow_untrained=True)
    check_budgets_trained([4, 64], [1, 4, 16, 64], allow_untrained=False)
