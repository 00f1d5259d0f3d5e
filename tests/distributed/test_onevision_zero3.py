"""The tiny LLaVA-OneVision preset under real 2-rank ZeRO-3: M3 at every scale (each anyres crop pooled),
per-scale LoRA and packed rows train, and the export reloads in stock transformers with the logits of
the checkpoint's own model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, read_metrics, run, torchrun

pytestmark = pytest.mark.timeout(400)

# What configs/tiny_onevision.yaml trains, as the checkpoint's config.yaml records it.
SETTINGS = [
    ("preset", "tiny-llava-onevision"),
    ("mode", "m3"),
    ("strategy", "shared_plus_per_scale"),
    ("packing", "true"),
]


def test_two_rank_zero3_trains_m3_per_crop_with_scale_lora_and_packing_then_exports(tmp_path, shards_pattern):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    run_dir, steps = tmp_path / "run", 4
    cmd = [
        *torchrun(), "-m", "mtrain",
        "train", str(REPO / "configs/tiny_onevision.yaml"), f"run.dir={run_dir}", f"data.shards={shards_pattern}",
        f"run.max_steps={steps}", "optim.warmup_steps=1", "logging.progress=false", "zero.param_persistence_threshold=0",
        "data.micro_batch_size=2",
    ]  # fmt: skip
    # configs/tiny_onevision.yaml: M3 at scales [1,4,16] (policy all), shared+per-scale LoRA, packed rows of 200.
    proc = run(cmd, cwd=tmp_path, timeout=360)
    assert proc.returncode == 0

    metrics = read_metrics(run_dir)
    assert len(metrics) == steps
    assert all(f"loss/scale_{s}" in m for m in metrics for s in (1, 4, 16))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    saved = (run_dir / "checkpoints" / f"step_{steps:08d}" / "config.yaml").read_text()
    assert all(f"{key}: {value}" in saved for key, value in SETTINGS), saved

    # The export: stock transformers loads the merged model (shared + scale_16 adapters) and gives the
    # logits of the checkpoint's own task at the full scale, on an image the processor crops 2x2.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from PIL import Image

    from mtrain.config import load_config
    from mtrain.model.build import build_model
    from mtrain.task.registry import build_task

    folder = run_dir / "export" / "model"
    stock = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(stock).__name__ == "LlavaOnevisionForConditionalGeneration"
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    checkpoint = run_dir / "checkpoints" / f"step_{steps:08d}"
    cfg = load_config(checkpoint / "config.yaml")
    built = build_model(cfg.model, torch.float32, None, cfg.run.seed, cfg.matryoshka.tokens)
    task = build_task(cfg, built, rank=0)
    task.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))
    task.eval()

    pixels = image_processor(images=Image.new("RGB", (48, 48), (200, 30, 30)), return_tensors="pt")
    assert tuple(pixels["pixel_values"].shape) == (1, 5, 3, 16, 16)
    ids = tokenizer("<image>" * built.visual_tokens + "a red circle.", return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids), **pixels}
    batch["image_sizes"] = pixels["image_sizes"].tolist()
    with torch.no_grad():
        exported = stock(input_ids=ids, **pixels).logits
        trained, _ = task.run(batch, [16])
    torch.testing.assert_close(trained, exported, rtol=1e-4, atol=1e-4)
