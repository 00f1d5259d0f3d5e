"""Which model families greedy generation runs: the others are refused with `eval.generate_samples` named, at
config load for a preset and before any process group for a folder, and `mtrain generate` / `mtrain.infer`
on such an export stop with a clear error instead of failing inside transformers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mtrain.config import ConfigError, load_config
from mtrain.launch.model_checks import model_problems
from mtrain.model.build import build_model
from mtrain.model.families import FAMILIES
from tests.conftest import REPO
from tests.unit.test_model_checks import folder_config, tiny_llava_folder

HELD_OUT = ["eval.shards=h.tar", "eval.generate_samples=2"]
M3 = ["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[4,16]"]  # fits every preset's grid; qwen3 needs m3
GENERATING = {"llava", "mtrain_mqt_llava"}
NOT_GENERATING = ["tiny-llava-onevision", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl",
                  "tiny-gemma3"]  # fmt: skip


def test_families_say_whether_they_generate():
    assert {name for name, family in FAMILIES.items() if family.generates} == GENERATING


@pytest.mark.parametrize("preset", NOT_GENERATING)
def test_a_preset_whose_family_cannot_generate_is_refused_at_config_load(preset):
    load_config(None, [f"model.preset={preset}", *M3, "eval.shards=h.tar"])  # without generation it loads
    with pytest.raises(ConfigError, match=rf"eval.generate_samples: greedy generation .* not the {preset} preset.*"
                                          r"set eval.generate_samples=0"):  # fmt: skip
        load_config(None, [f"model.preset={preset}", *M3, *HELD_OUT])


def test_the_qwen_recipe_with_in_loop_generation_is_refused_and_llava_still_generates():
    recipe = REPO / "configs/recipes/tiny/lora_sft_matryoshka_qwen2_5_vl.yaml"
    with pytest.raises(ConfigError, match="eval.generate_samples: greedy generation"):
        load_config(recipe, [*HELD_OUT, "eval.every=2", "checkpoint.export_at_end=false"])
    assert load_config(None, [*M3, *HELD_OUT]).eval.generate_samples == 2  # tiny-llava


def save_qwen_folder(folder):
    preset = build_model(load_config(None, ["model.preset=tiny-qwen2.5-vl"]).model, torch.float32, None, seed=0)
    preset.model.save_pretrained(folder)
    preset.tokenizer.save_pretrained(folder)
    preset.image_processor.save_pretrained(folder)
    return folder, preset


def test_a_folder_whose_family_cannot_generate_is_refused_before_any_process_group(tmp_path):
    folder, _ = save_qwen_folder(tmp_path / "qwen")
    overrides = ["model.image_size=[32,32]", "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4]"]
    assert model_problems(folder_config(folder, *overrides, "eval.shards=h.tar")) == []
    (problem,) = model_problems(folder_config(folder, *overrides, *HELD_OUT))
    assert problem.startswith(f"model.path={str(folder)!r}: eval.generate_samples: greedy generation")
    assert "not a qwen2_5_vl model" in problem and "set eval.generate_samples=0" in problem
    assert model_problems(folder_config(tiny_llava_folder(tmp_path / "llava"), *HELD_OUT)) == []


def test_generating_from_an_export_of_such_a_family_stops_with_a_clear_error(tmp_path, capsys):
    from mtrain.cli import main
    from mtrain.infer import MatryoshkaModel, MatryoshkaSpec
    from mtrain.infer import main as infer_main

    export = tmp_path / "export"
    _, preset = save_qwen_folder(export / "model")
    (export / "mtrain.json").write_text(json.dumps({"matryoshka": {"token_mode": "m3", "scales": [1, 4]}}))
    picture = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), "red").save(picture)
    refusal = "this is a 'qwen2_5_vl' model; mtrain.infer generates (and scores logits) for the model types llava"
    model = MatryoshkaModel(preset.model, MatryoshkaSpec(token_mode="m3", scales=[1, 4]))
    with pytest.raises(ValueError, match=r"'qwen2_5_vl' model; mtrain.infer generates"):
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    args = ["--image", str(picture), "--prompt", "What is drawn?"]
    assert main(["generate", str(export), *args]) == 2
    assert refusal in capsys.readouterr().err
    assert infer_main([str(export), *args]) == 2
    assert refusal in capsys.readouterr().err
