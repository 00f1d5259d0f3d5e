"""The tiny LLaVA-OneVision and LLaVA-NeXT presets under real 2-rank ZeRO-3: M3 at every scale (each anyres
crop pooled), per-scale LoRA and packed rows train (configs/tiny_onevision.yaml; LLaVA-NeXT with its preset
swapped in), and the export reloads in stock transformers with the logits of the checkpoint's own model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, read_metrics, run, torchrun
from tests.distributed.family_runs import assert_loss_is_the_mean_of_the_scale_losses, checkpoint_task, load_export

pytestmark = pytest.mark.timeout(400)

# What configs/tiny_onevision.yaml trains, as the checkpoint's config.yaml records it.
SETTINGS = [
    ("mode", "m3"),
    ("strategy", "shared_plus_per_scale"),
    ("packing", "true"),
]
# preset: (stock class, steps)
PRESETS = {
    "tiny-llava-onevision": ("LlavaOnevisionForConditionalGeneration", 4),
    "tiny-llava-next": ("LlavaNextForConditionalGeneration", 2),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_two_rank_zero3_trains_m3_per_crop_with_scale_lora_and_packing_then_exports(tmp_path, shards_pattern, preset):
    from transformers import AutoImageProcessor, AutoTokenizer

    model_class, steps = PRESETS[preset]
    run_dir = tmp_path / "run"
    cmd = [
        *torchrun(), "-m", "mtrain",
        "train", str(REPO / "configs/tiny_onevision.yaml"), f"run.dir={run_dir}", f"data.shards={shards_pattern}",
        f"model.preset={preset}", f"run.max_steps={steps}", "optim.warmup_steps=1", "logging.progress=false",
        "zero.param_persistence_threshold=0", "data.micro_batch_size=2",
        # The in-loop evaluation after the last step runs outside the engine's forward: every parameter the
        # family reads there (the learned image newline) must be whole, not this rank's empty partition.
        f"eval.shards={shards_pattern}", f"eval.every={steps}", "eval.batches=1", "eval.at_end=false",
    ]  # fmt: skip
    # configs/tiny_onevision.yaml: M3 at scales [1,4,16] (policy all), shared+per-scale LoRA, packed rows of 200.
    proc = run(cmd, cwd=tmp_path, timeout=360)
    assert proc.returncode == 0

    logged = read_metrics(run_dir)
    metrics = [m for m in logged if "loss" in m]
    evaluated = [m for m in logged if "eval/loss/scale_16" in m]
    assert len(metrics) == steps
    assert all(f"loss/scale_{s}" in m for m in metrics for s in (1, 4, 16))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert_loss_is_the_mean_of_the_scale_losses(metrics)
    assert len(evaluated) == 1 and all(f"eval/loss/scale_{s}" in evaluated[0] for s in (1, 4, 16)), logged
    saved = (run_dir / "checkpoints" / f"step_{steps:08d}" / "config.yaml").read_text()
    assert all(f"{key}: {value}" in saved for key, value in [("preset", preset), *SETTINGS]), saved

    # The export: stock transformers loads the merged model (shared + scale_16 adapters) and gives the
    # logits of the checkpoint's own task at the full scale, on an image the processor crops 2x2.
    from PIL import Image

    stock = load_export(run_dir, model_class)
    folder = run_dir / "export" / "model"
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    built, task = checkpoint_task(run_dir, steps)

    pixels = image_processor(images=Image.new("RGB", (48, 48), (200, 30, 30)), return_tensors="pt")
    assert tuple(pixels["pixel_values"].shape) == (1, 5, 3, 16, 16)
    ids = tokenizer("<image>" * built.visual_tokens + "a red circle.", return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids), **pixels}
    batch["image_sizes"] = pixels["image_sizes"].tolist()
    with torch.no_grad():
        exported = stock(input_ids=ids, **pixels).logits
        trained, _ = task.run(batch, [16])
    torch.testing.assert_close(trained, exported, rtol=1e-4, atol=1e-4)
