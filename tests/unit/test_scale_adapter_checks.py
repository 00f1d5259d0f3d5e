"""Per-scale LoRA never silently trains or evaluates a scale without its adapter."""

from __future__ import annotations

import pytest

from mtrain.config import ConfigError, load_config
from mtrain.eval.budget import load_for_eval
from mtrain.task.registry import budget_view

PER_SCALE = ["model.lora.enabled=true", "model.lora.strategy=per_scale"]


@pytest.mark.parametrize("strategy", ["per_scale", "shared_plus_per_scale"])
def test_mqt_stage_one_with_scale_adapters_needs_all_m_queries_among_the_scales(strategy):
    stage_one = ["matryoshka.tokens.mode=mqt", "matryoshka.tokens.mqt_stage=1", "matryoshka.tokens.mqt_queries=16"]
    lora = ["model.lora.enabled=true", f"model.lora.strategy={strategy}"]
    with pytest.raises(ConfigError, match="MQT stage 1 trains only at all 16 queries.*add 16 to the scales"):
        load_config(None, [*stage_one, *lora, "matryoshka.tokens.scales=[2,4,8]"])
    assert load_config(None, [*stage_one, *lora, "matryoshka.tokens.scales=[2,4,16]"])
    assert load_config(None, [*stage_one, "matryoshka.tokens.scales=[2,4,8]", "model.lora.enabled=true"])


def test_eval_refuses_a_scale_without_an_adapter(shards_pattern):
    overrides = [
        *PER_SCALE,
        "matryoshka.tokens.mode=m3",
        "matryoshka.tokens.scales=[4,64]",
        f"data.shards={shards_pattern}",
    ]
    cfg, built, task = load_for_eval("configs/tiny.yaml", overrides)
    with pytest.raises(
        ValueError, match=r"--scales \[16\]: this model has per_scale LoRA adapters only for the scales \[4, 64\]"
    ):
        budget_view(cfg, built, task, [4, 16])
    assert budget_view(cfg, built, task, [4]).tokens.scales == [4]
    assert budget_view(cfg, built, task, None) is task
