"""An MQT model folder reloads in mtrain with its trained projector, never a random one, and a LLaVA folder
starts MQT with every language-model weight it holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mtrain.checkpoint.export import _save_hf_folder
from mtrain.config.schema import ModelConfig, TokenScalesConfig
from mtrain.model.build import build_model

MQT = TokenScalesConfig(mode="mqt", mqt_queries=16, scales=[4, 16])


def folder_of(tmp_path: Path, tokens: TokenScalesConfig, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A saved model folder of the tiny preset whose weights are all perturbed (unlike any fresh init)."""
    built = build_model(ModelConfig(), torch.float32, None, seed=0, tokens=tokens)
    with torch.no_grad():
        for param in built.model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    _save_hf_folder(built.model, built, tmp_path / name)
    return tmp_path / name, {k: v.clone() for k, v in built.model.state_dict().items()}


def load(folder: Path, tokens: TokenScalesConfig) -> torch.nn.Module:
    model_cfg = ModelConfig(preset="none", path=str(folder))
    return build_model(model_cfg, torch.float32, None, seed=1, tokens=tokens).model


@pytest.fixture(scope="module")
def mqt_folder(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    return folder_of(tmp_path_factory.mktemp("mqt"), MQT, "model")


def test_an_mqt_folder_reloads_bit_exactly(mqt_folder):
    folder, saved = mqt_folder
    loaded = load(folder, MQT).state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)


def test_an_mqt_llava_layout_folder_reloads_bit_exactly(tmp_path):
    tokens = dataclasses.replace(MQT, mqt_architecture="mqt_llava")
    folder, saved = folder_of(tmp_path, tokens, "model")
    loaded = load(folder, tokens).state_dict()
    assert "model.multi_modal_projector.pos_embed" in saved
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[name], saved[name]) for name in saved)


def test_an_mqt_folder_without_its_projector_is_refused(mqt_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = mqt_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "multi_modal_projector" not in k}, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks \d+ weight\(s\).*multi_modal_projector.*would start random"):
        load(broken, MQT)


def test_an_mqt_folder_needs_the_runs_mqt_settings(mqt_folder):
    folder, _ = mqt_folder
    with pytest.raises(ValueError, match="set matryoshka.tokens.mqt_queries=16 \\(the config has 64\\)"):
        load(folder, dataclasses.replace(MQT, mqt_queries=64, scales=[4, 64]))
    with pytest.raises(ValueError, match="holds an MQT model.*set matryoshka.tokens.mode=mqt"):
        load(folder, TokenScalesConfig())


def test_a_llava_folder_starts_mqt_with_its_language_model(tmp_path):
    folder, saved = folder_of(tmp_path, TokenScalesConfig(), "llava")
    loaded = load(folder, MQT).state_dict()
    kept = [name for name in saved if "multi_modal_projector" not in name]
    assert all(torch.equal(loaded[name], saved[name]) for name in kept)
    assert "model.multi_modal_projector.queries" in loaded  # a fresh query transformer replaces the MLP


def test_build_names_the_mqt_model_type_of_the_registered_class():
    from mtrain.model.build import MQT_MODEL_TYPE
    from mtrain.model.mqt_model import MQTLlavaConfig

    assert MQTLlavaConfig.model_type == MQT_MODEL_TYPE


def test_an_mqt_folder_passes_the_checks_before_any_process_group(mqt_folder):
    """`model.path` at an MQT folder (what an MQT run exports) is a supported family whose config loads
    without running the folder's remote code."""
    from mtrain.config import load_config
    from mtrain.launch.model_checks import model_problems

    folder, _ = mqt_folder
    overrides = ["model.preset=none", f"model.path={folder}", "matryoshka.tokens.mode=mqt",
                 "matryoshka.tokens.mqt_queries=16", "matryoshka.tokens.scales=[4,16]"]  # fmt: skip
    assert model_problems(load_config(None, overrides)) == []
    refused = model_problems(load_config(None, overrides[:2]))  # the folder's queries need mode=mqt
    assert len(refused) == 1 and "set matryoshka.tokens.mode=mqt" in refused[0]
