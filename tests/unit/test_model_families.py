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
from mtrain.model.families.qwen2_vl import (
    Qwen2VLFamily,
    factor_problems,
    merged_grid,
    pool_merged,
    pooled_grid_thw,
)
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


def test_a_siglip_exports_processor_expands_image_to_the_familys_count():
    from PIL import Image

    from mtrain.checkpoint.export import llava_processor
    from mtrain.model.families.llava import tiny_image_processor

    config = tiny_config("siglip")
    tokenizer = build_tiny_tokenizer()
    built = type("Built", (), {"tokenizer": tokenizer, "image_processor": tiny_image_processor(32, "siglip")})
    processor = llava_processor(config, built, tokenizer.chat_template)
    inputs = processor(images=Image.new("RGB", (40, 24)), text="<image>\nWhat is it?", return_tensors="pt")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == family_for("llava").visual_tokens(config) == 64
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)


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
    with pytest.raises(UnsupportedModelError, match=r"'mllama' model; mtrain supports the model families llava"):
        family_for("mllama")
    own_projector = ("llava_onevision", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3")
    mqt_exports = tuple(f"mtrain_mqt_{family}" for family in own_projector)  # mtrain/model/families/mqt_export.py
    assert SUPPORTED_MODEL_TYPES == ("llava", "mtrain_mqt_llava", *own_projector, *mqt_exports)


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


# ── qwen2_vl: M3 on native-resolution grids, M-RoPE from the pooled grid (model level) ─────────────
IMAGE, VISION_START, VISION_END = 4, 6, 7
BEFORE, AFTER = [10, 11, 12], [20, 21, 22, 23]


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "bos_token_id": 1, "eos_token_id": 2,
        },
        vision_config={
            "depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
        },
        image_token_id=IMAGE, video_token_id=5, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2VLFamily().model_class()(config)


def qwen_row(model, features, grid_thw, factor):
    """One image's row at pooling factor `factor`: embeddings, 3-D position ids and labels."""
    merge = model.config.vision_config.spatial_merge_size
    pooled = pool_merged(features, merged_grid(grid_thw, merge), factor)
    ids = torch.tensor([BEFORE + [VISION_START] + [IMAGE] * pooled.shape[0] + [VISION_END] + AFTER])
    image = ids == IMAGE
    positions, _ = model.model.get_rope_index(ids, image.int(), image_grid_thw=pooled_grid_thw(grid_thw[None], factor))
    embeddings = model.get_input_embeddings()(ids).masked_scatter(image[..., None], pooled)
    return ids, embeddings, positions, ids.masked_fill(image, -100)


def test_qwen2_vl_m3_at_full_size_equals_the_stock_forward():
    model = tiny_qwen2_vl().eval()
    grid_thw = torch.tensor([[1, 4, 8]])  # 16x32 px: 4x8 patches, a 2x4 merged grid
    pixels = torch.randn(32, 3 * 2 * 4 * 4)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid_thw).pooler_output[0]
        ids, embeddings, positions, _ = qwen_row(model, features, grid_thw[0], 1)
        ours = model(inputs_embeds=embeddings, position_ids=positions).logits
        stock = model(
            input_ids=ids, pixel_values=pixels, image_grid_thw=grid_thw, mm_token_type_ids=(ids == IMAGE).int()
        )
    torch.testing.assert_close(ours, stock.logits)


def test_qwen2_vl_trains_with_m3_factors_on_non_square_grids_and_pooled_mrope_ids():
    model = tiny_qwen2_vl()
    grid_thw = torch.tensor([[1, 4, 8], [1, 8, 4]])  # merged 2x4 and 4x2: not square
    pixels = torch.randn(64, 3 * 2 * 4 * 4)
    factors = [1, 2]
    assert factor_problems([merged_grid(g, 2) for g in grid_thw], factors) == []
    assert factor_problems([merged_grid(g, 2) for g in grid_thw], [4]) == [
        "pooling factor 4 does not divide a 2x4 merged grid",
        "pooling factor 4 does not divide a 4x2 merged grid",
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        features = model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid_thw).pooler_output
        step_losses = []
        for factor in factors:
            for image_features, thw in zip(features, grid_thw, strict=True):
                ids, embeddings, positions, labels = qwen_row(model, image_features, thw, factor)
                step_losses.append(model(inputs_embeds=embeddings, position_ids=positions, labels=labels).loss)
        loss = torch.stack(step_losses).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # At factor 2 the 2x4 grid pools to 1x2: two image tokens with the M-RoPE ids of a 1x2 grid,
    # and the text after the image continues from the pooled grid's extent (max(1, 2) = 2).
    ids, _, positions, _ = qwen_row(model, features[0].detach(), grid_thw[0], 2)
    start = len(BEFORE) + 1
    assert (ids[0] == IMAGE).sum() == 2
    assert positions[:, 0, start : start + 2].tolist() == [[start, start], [start, start], [start, start + 1]]
    assert positions[0, 0, start + 2].item() == start + 2  # vision_end
