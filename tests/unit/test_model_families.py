"""Model families: the llava entry counts visual tokens from its tower's real output (CLIP and SigLIP),
checks scales against the model's grid, and a SigLIP-tower tiny llava trains end to end."""

from __future__ import annotations

import math

import pytest
import torch

from mtrain.config import load_config
from mtrain.model.build import build_model
from mtrain.model.families import SUPPORTED_MODEL_TYPES, UnsupportedModelError, family_for
from mtrain.model.families.llava import tiny_llava_config
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer
from mtrain.task.registry import build_task
from tests.conftest import REPO
from tests.data_factory import make_loader

pytestmark = pytest.mark.timeout(300)


def tiny_config(tower: str, strategy: str | None = None):
    tokenizer = build_tiny_tokenizer()
    tiny = load_config(None, [f"model.tiny.vision_tower={tower}"]).model.tiny
    config = tiny_llava_config(tiny, 512, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id)
    if strategy is not None:
        config.vision_feature_select_strategy = strategy
    return config


@pytest.mark.parametrize(
    ("tower", "strategy", "expected"),
    [("clip", "default", 64), ("clip", "full", 65), ("siglip", "full", 64), ("siglip", "default", 63)],
)
def test_llava_visual_tokens_equal_the_towers_real_output(tower, strategy, expected):
    config = tiny_config(tower, strategy)
    family = family_for(config.model_type)
    model = family.model_class()(config).eval()
    with torch.no_grad():
        output = model.model.get_image_features(pixel_values=torch.zeros(2, 3, 32, 32), return_dict=True)
    assert torch.stack(list(output.pooler_output)).shape[1] == family.visual_tokens(config) == expected
    assert (family.visual_grid(config) is not None) == (expected == 64)


def test_m3_scales_are_checked_against_the_models_grid():
    family = family_for("llava")
    tokens = load_config(None, ["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16,64]"])
    assert family.problems(tiny_config("siglip"), tokens.matryoshka.tokens) == []
    problems = family.problems(tiny_config("siglip", "default"), tokens.matryoshka.tokens)
    assert len(problems) == 1 and "'full' for a SigLIP tower" in problems[0]
    folder = ["model.preset=none", "model.path=any-folder"]  # the tiny preset's own grid check stays out of the way
    nine = load_config(None, [*folder, "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,9]"]).matryoshka.tokens
    config = tiny_config("clip")
    config.vision_config.image_size = 48  # a 12x12 grid: 9 = 3x3 fits, 64 = 8x8 does not
    assert family.problems(config, nine) == []
    (problem,) = family.problems(tiny_config("clip"), nine)
    assert "[9] do not fit this model's 8x8 grid" in problem and "[1, 4, 16, 64]" in problem


def test_an_unknown_model_type_names_the_supported_families():
    with pytest.raises(UnsupportedModelError, match=r"'qwen2_vl' model; mtrain supports the model families llava"):
        family_for("qwen2_vl")
    assert SUPPORTED_MODEL_TYPES == ("llava",)


def test_a_siglip_tower_tiny_llava_trains_with_m3_scales(shards_pattern):
    """The real loader expands each <image> to the family's count; the one-pass M3 step trains on it."""
    cfg = load_config(
        str(REPO / "configs/tiny.yaml"),
        ["model.tiny.vision_tower=siglip", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16,64]"],
    )
    built = build_model(cfg.model, torch.float32, None, seed=0, tokens=cfg.matryoshka.tokens)
    assert type(built.model.get_base_model().model.vision_tower).__name__ == "SiglipVisionModel"
    assert built.visual_tokens == 64
    task = build_task(cfg, built, rank=0)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    batch = next(iter(make_loader(shards_pattern, visual_tokens=built.visual_tokens, image_size=32)))
    image_tokens = (batch["input_ids"] == built.image_token_id).sum().item()
    assert image_tokens == 64 * batch["pixel_values"].shape[0]
    losses = []
    for step in range(6):
        task.begin_step(step)
        loss, _ = task(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
