"""Loader state: re-partitioning to another world size (with packing leftovers), mixture weights."""

from __future__ import annotations

import json
from collections import Counter

import torch

from tests.data_factory import caption_shard, make_loader, rest_of_epoch, write_mixed_shards

PACKED = {"batch_size": 2, "max_len": 256, "visual_tokens": 16, "image_size": 16, "packing": True, "pack_window": 8}


def all_keys(pattern: str) -> list[str]:
    return rest_of_epoch(make_loader(pattern, **PACKED))


def test_repartition_loses_and_repeats_nothing_with_packing_leftovers(tmp_path):
    pattern = write_mixed_shards(tmp_path / "mix", [23, 5, 31, 12])  # unequal shards
    expected = Counter(all_keys(pattern))
    assert len(expected) == 71 and set(expected.values()) == {1}

    for old_world, new_world in ((2, 1), (2, 3), (1, 2), (3, 2)):
        taken: list[str] = []
        states = []
        for rank in range(old_world):
            loader = make_loader(pattern, rank=rank, world_size=old_world, **PACKED)
            for _ in range(2 + rank):  # ranks stand at different points, as they do between steps
                keys = next(loader)["keys"]
                if loader.epoch == 0:  # unsynced, a rank may run into epoch 1: only epoch 0 is checked
                    taken += keys
            states.append(json.loads(json.dumps(loader.state_dict())))
        assert any(state["planner"]["pending"] for state in states)  # packing leftovers are in the state
        for rank in range(new_world):
            loader = make_loader(pattern, rank=rank, world_size=new_world, **PACKED)
            loader.load_state_dict(states)
            taken += rest_of_epoch(loader)
        assert Counter(taken) == expected, (old_world, new_world)


def test_mixture_weights_hold_over_a_window_and_across_resume(tmp_path):
    """Stated tolerance: the share of each source over 600 samples is within 0.05 of its weight."""
    import random

    rng = random.Random(0)
    caption_shard(tmp_path / "a-000000.tar", [f"a{i:04d}" for i in range(150)], rng)
    caption_shard(tmp_path / "b-000000.tar", [f"b{i:04d}" for i in range(40)], rng)
    sources = [(str(tmp_path / "a-000000.tar"), 0.7), (str(tmp_path / "b-000000.tar"), 0.3)]

    reference = make_loader(sources, batch_size=10)
    expected = [next(reference) for _ in range(60)]
    first = make_loader(sources, batch_size=10)
    keys = [k for _ in range(25) for k in next(first)["keys"]]
    resumed = make_loader(sources, batch_size=10)
    resumed.load_state_dict([json.loads(json.dumps(first.state_dict()))])
    for batch in expected[25:]:
        got = next(resumed)
        assert got["keys"] == batch["keys"] and torch.equal(got["input_ids"], batch["input_ids"])
        keys += got["keys"]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert len(keys) > 580 and abs(share - 0.7) <= 0.05, share  # epoch ends may leave a short batch
    # The small source cycles on its own (40 samples, drawn ~180 times): each of its samples
    # comes again only after all 40 have come.
    b_keys = [k for k in keys if k.startswith("b")]
    assert len(set(b_keys[:40])) == 40
    # The first source defines the epoch: each of its samples exactly once, then the epoch ends.
    first_epoch = Counter(k for k in rest_of_epoch(make_loader(sources, batch_size=10)) if k.startswith("a"))
    assert len(first_epoch) == 150 and set(first_epoch.values()) == {1}
    print(f"mixture: share of the 0.7 source over {len(keys)} samples across a resume = {share:.3f}")


def test_resampled_mode_is_endless_and_resumes_exactly(tmp_path):
    import random

    caption_shard(tmp_path / "s-000000.tar", [f"s{i:03d}" for i in range(9)], random.Random(0))
    pattern = str(tmp_path / "s-000000.tar")
    reference = make_loader(pattern, batch_size=4, epoch_mode="resampled")
    expected = [next(reference)["keys"] for _ in range(12)]  # 48 draws from 9 samples
    assert reference.epoch == 0 and len({k for keys in expected for k in keys}) <= 9
    first = make_loader(pattern, batch_size=4, epoch_mode="resampled")
    [next(first) for _ in range(5)]
    resumed = make_loader(pattern, batch_size=4, epoch_mode="resampled")
    resumed.load_state_dict([first.state_dict()])
    assert [next(resumed)["keys"] for _ in range(7)] == expected[5:]


def test_data_config_sources_and_modes_are_checked():
    import pytest

    from mtrain.config import ConfigError, load_config
    from tests.conftest import REPO

    tiny = str(REPO / "configs/tiny.yaml")
    cfg = load_config(tiny, ["data.sources=[{shards: a.tar, weight: 0.7}, {shards: b.tar, weight: 0.3}]"])
    assert cfg.data.source_list == [("a.tar", 0.7), ("b.tar", 0.3)]
    assert load_config(tiny, []).data.source_list == [(cfg.data.shards, 1.0)]
    with pytest.raises(ConfigError, match="data.sources\\[0\\].weight: must be > 0"):
        load_config(tiny, ["data.sources=[{shards: a.tar, weight: 0}]"])
    with pytest.raises(ConfigError, match="did you mean 'resampled'"):
        load_config(tiny, ["data.epoch_mode=resample"])


def test_repartition_deals_the_rest_of_an_epoch_evenly():
    """1 -> 2 ranks with 3 leftovers and 5 fresh positions: 4 each, so no rank drops a batch at the end."""
    from data_pipeline.epoch_order import next_position, repartition

    old = [{"epoch": 0, "base": 30, "stride": 1, "offset": 0, "taken": 13, "backlog": []}]
    shares = []
    for rank in range(2):
        cursor = repartition(old, [[40, 41, 42]], rank, 2, 48)
        positions = []
        while (position := next_position(cursor, 48)) is not None:
            positions.append(position)
        shares.append(positions)
    assert sorted(shares[0] + shares[1]) == list(range(40, 48))
    assert [len(share) for share in shares] == [4, 4]  # the old dealing gave 5 and 3


def test_a_replay_stream_pair_checkpoint_fails_to_resume_naming_the_way_out(tmp_path):
    """The removed replay_stream pair loader saved only a batch count per rank: resuming it must say
    so and how to go on (init_from), at the same world size and at another, not raise a KeyError."""
    import pytest

    from data_pipeline.pairs import write_pair_shards

    paths = write_pair_shards(tmp_path / "pairs", num_shards=1, samples_per_shard=6, seed=0)
    old = [{"batches_taken": 5, "rank": r, "world_size": 2, "num_workers": 0} for r in range(2)]
    for world_size, saved in ((2, old), (1, old), (1, old[:1])):
        loader = make_loader(str(paths[0]), world_size=world_size, pairs=True)
        with pytest.raises(ValueError, match=r"lacks epoch, planner.*replay_stream.*checkpoint\.init_from="):
            loader.load_state_dict(saved)


def test_a_position_saved_under_the_previous_epoch_order_resumes_with_a_warning(tmp_path):
    """Positions saved before the NumPy shard permutation (no `order_version`) still resume, and the
    user is told that the rest of that epoch follows the new order; today's positions resume silently."""
    import random
    import warnings

    import pytest

    pattern = str(tmp_path / "a.tar")
    caption_shard(tmp_path / "a.tar", [f"k{i}" for i in range(8)], random.Random(0))
    first = make_loader(pattern, batch_size=2)
    next(first)
    saved = first.state_dict()
    assert saved["order_version"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current rule: no warning
        make_loader(pattern, batch_size=2).load_state_dict([saved])
    older = {key: value for key, value in saved.items() if key != "order_version"}
    with pytest.warns(UserWarning, match=r"epoch-order rule \[1\].*rule 2.*seen twice or not at all"):
        make_loader(pattern, batch_size=2).load_state_dict([older])
