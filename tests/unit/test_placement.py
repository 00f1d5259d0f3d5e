import pytest
import torch

from mtrain.config import load_config
from mtrain.engine.schedule import warmup_cosine
from mtrain.engine.setup import resolve_placement
from mtrain.model.build import attention_implementation, lora_target_pattern


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_cpu_placement_is_fp32_gloo_sdpa():
    placement = resolve_placement(load_config(None))
    assert (placement.device, placement.precision, placement.backend) == ("cpu", "fp32", "gloo")
    assert attention_implementation("auto") == "sdpa"


def test_explicit_choices_are_kept():
    placement = resolve_placement(load_config(None, ["run.precision=bf16", "dist.backend=gloo"]))
    assert (placement.precision, placement.dtype) == ("bf16", torch.bfloat16)
    assert attention_implementation("eager") == "eager"


def test_warmup_then_cosine_to_floor():
    values = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:], strict=False))
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_lora_pattern_is_scoped_to_the_language_model():
    import re

    pattern = re.compile(lora_target_pattern(["q_proj", "v_proj"]))
    assert pattern.fullmatch("model.language_model.layers.0.self_attn.q_proj")
    assert not pattern.fullmatch("model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert not pattern.fullmatch("model.language_model.layers.0.self_attn.k_proj")
