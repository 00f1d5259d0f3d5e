"""M3 pooling, MQT prefixes, image-run shrinking, the scale sampler, and their config checks."""

import pytest
import torch

from data_pipeline.tokenize import IGNORE_INDEX
from mtrain.config import ConfigError, load_config
from mtrain.model.token_scales import QueryTransformerProjector, pool_grid
from mtrain.task.draws import ScaleSampler
from mtrain.task.token_layout import shrink_image_runs


def test_pool_grid_averages_blocks():
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # a 4x4 grid, one channel
    pooled = pool_grid(grid, 4)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_grid(grid, 1).item() == pytest.approx(7.5)
    assert pool_grid(grid, 16) is grid


def test_pool_grid_rejects_non_dividing_scale():
    with pytest.raises(ValueError, match="cannot pool a 64-token grid to 9 tokens"):
        pool_grid(torch.zeros(1, 64, 2), 9)


def test_mqt_prefix_equals_fewer_queries():
    torch.manual_seed(0)
    projector = QueryTransformerProjector(vision_dim=8, text_dim=16, num_queries=16, num_heads=2, num_patches=64).eval()
    features = torch.randn(3, 64, 8)
    full = projector(features)
    assert full.shape == (3, 16, 16)
    # Queries attend only to the image: dropping the later queries changes nothing for the first m.
    projector.queries.data = projector.queries.data[:4]
    projector.query_positions = projector.query_positions[:4]
    torch.testing.assert_close(projector(features), full[:, :4])


def test_shrink_keeps_first_tokens_of_each_image_run():
    image, pad, X = 9, 0, IGNORE_INDEX
    ids = torch.tensor([[1, 9, 9, 9, 9, 5, 9, 9, 9, 9, 6, 0]])
    labels = torch.tensor([[X, X, X, X, X, 5, X, X, X, X, 6, X]])
    mask = (ids != pad).long()
    new_ids, new_labels, new_mask = shrink_image_runs(
        ids, labels, mask, image, visual_tokens=4, keep=1, pad_token_id=pad
    )
    assert new_ids.tolist() == [[1, 9, 5, 9, 6]]
    assert new_labels.tolist() == [[X, X, 5, X, 6]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1]]


def test_sampler_draws_depend_on_seed_and_step_only():
    sampler = ScaleSampler([2, 4, 8, 16, 32, 64], "sample_per_step", seed=3)
    other_rank_copy = ScaleSampler([2, 4, 8, 16, 32, 64], "sample_per_step", seed=3)
    draws = [sampler.step_scale(step) for step in range(50)]
    assert draws == [other_rank_copy.step_scale(step) for step in range(50)]
    assert len(set(draws)) >= 4  # it does vary from step to step
    assert sampler.row_scales(5, rows=32) == other_rank_copy.row_scales(5, rows=32)
    assert sampler.row_scales(5, rows=32, micro_batch=0) != sampler.row_scales(5, rows=32, micro_batch=1)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,8]"], "every scale is a perfect square; [8]"),
        (["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,9,64]"], "matryoshka.tokens.scales: [9]"),
        (["matryoshka.tokens.mode=mqt", "matryoshka.tokens.scales=[2,128]"], "128 exceeds mqt_queries=64"),
        (["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[4,1]"], "strictly increasing"),
        (["matryoshka.tokens.mode=m3"], "scales: is empty"),
        (["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4]", "matryoshka.tokens.weights=[1]"], "weights"),
        (["model.lora.enabled=true", "model.lora.strategy=per_scale"], "needs visual scales"),
    ],
)
def test_scale_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)
