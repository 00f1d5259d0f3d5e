"""A LLaVA checkpoint saved to disk by the test loads through model.path; exports load in stock HF/PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtrain.config.schema import TinyLlavaConfig
from mtrain.model.build import tiny_image_processor, tiny_llava_config
from mtrain.model.tokenizer import IMAGE_TOKEN, build_tiny_tokenizer
from tests.conftest import mtrain_train, read_metrics, run

pytestmark = pytest.mark.timeout(300)


def save_tiny_llava(folder: Path) -> None:
    """What a user's local LLaVA folder looks like: config, safetensors, tokenizer, processor."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    config = tiny_llava_config(
        TinyLlavaConfig(), 512, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id
    )
    torch.manual_seed(7)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tiny_image_processor(32).save_pretrained(folder)


def test_train_from_local_folder_then_export_loads_in_stock_libraries(tmp_path, shards_pattern):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    source = tmp_path / "my-llava"
    save_tiny_llava(source)
    run_dir = tmp_path / "run"
    overrides = ["model.preset=none", f"model.path={source}", "run.max_steps=3", "optim.warmup_steps=0"]
    proc = run(mtrain_train(run_dir, shards_pattern, *overrides), cwd=tmp_path)
    assert proc.returncode == 0
    assert f"model {source.resolve()}" in proc.stderr
    assert len(read_metrics(run_dir)) == 3
    assert json.loads((run_dir / "export" / "mtrain.json").read_text())["source"] == str(source.resolve())

    # Stock transformers loads the merged export; stock PEFT puts the adapter on the original base.
    merged = AutoModelForImageTextToText.from_pretrained(run_dir / "export" / "model").eval()
    base = AutoModelForImageTextToText.from_pretrained(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export" / "model")
    ids = torch.tensor(
        [
            [tokenizer.bos_token_id]
            + [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] * 64
            + tokenizer("a red circle").input_ids
        ]
    )
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, pixel_values=pixels).logits
        base_logits = base(input_ids=ids, pixel_values=pixels).logits
        adapted = PeftModel.from_pretrained(base, run_dir / "export" / "adapter").eval()  # wraps base in place
        adapted_logits = adapted(input_ids=ids, pixel_values=pixels).logits
    assert (merged_logits - base_logits).abs().max() > 1e-2  # training changed the model
    # The adapter carries LoRA plus the fully trained modules (projector, lm_head): on the original
    # base it reproduces the merged export.
    torch.testing.assert_close(adapted_logits, merged_logits, rtol=1e-4, atol=1e-4)


def test_bad_model_path_is_a_clear_error(tmp_path, shards_pattern):
    command = mtrain_train(tmp_path / "run", shards_pattern, "model.preset=none", f"model.path={tmp_path}")
    proc = run(command, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert not (tmp_path / "run").exists()  # rejected before any process group formed
    assert "is not a Hugging Face model folder (no config.json)" in proc.stderr
