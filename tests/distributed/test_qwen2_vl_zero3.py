"""The tiny-qwen2-vl, tiny-qwen2.5-vl and tiny-qwen3-vl presets under real 2-rank ZeRO-3: M3 at every scale in one
pass, MSS LoRA (a shared adapter plus one per scale) and packed rows, through the real loader (captions with Qwen's
vision markers, Qwen's patches, 3-D M-RoPE ids per document; Qwen3-VL's DeepStack sets pooled with the merged
tokens, at the packed image positions); the export at the end is a folder stock transformers loads as Qwen2-VL /
Qwen2.5-VL / Qwen3-VL, with the logits of the checkpoint's own task at full scale."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.distributed.family_runs import (
    assert_loss_is_the_mean_of_the_scale_losses,
    checkpoint_task,
    generated_answers,
    load_export,
    train_m3_mss_packed,
)

pytestmark = pytest.mark.timeout(300)

# preset: (stock class, steps, the loss the last step must be under, as a fraction of the first); when written,
# tiny-qwen2-vl went 6.15 -> 4.62 over its 8 steps, tiny-qwen2.5-vl 6.34 -> 5.81 over its 3, tiny-qwen3-vl
# 6.25 -> 5.68 over its 3.
PRESETS = {
    "tiny-qwen2-vl": ("Qwen2VLForConditionalGeneration", 8, 0.8),
    "tiny-qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", 3, 0.95),
    "tiny-qwen3-vl": ("Qwen3VLForConditionalGeneration", 3, 0.95),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_two_rank_zero3_qwen_m3_mss_lora_packed_then_exports(tmp_path, shards_pattern, preset):
    from transformers import AutoImageProcessor, AutoTokenizer

    from mtrain.model.families.qwen2_vl import IMAGE_PAD, VISION_END, VISION_START

    model_class, steps, drop = PRESETS[preset]
    run_dir, metrics = train_m3_mss_packed(tmp_path, shards_pattern, preset, steps=steps)
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < drop * losses[0] and all(a > b for a, b in zip(losses[:-1], losses[1:], strict=True))
    assert_loss_is_the_mean_of_the_scale_losses(metrics)

    # The export: stock transformers with its own tokenizer and image processor gives the logits of the
    # checkpoint's task at full scale (shared + scale_16 adapters merged), on a caption as the data has it.
    stock = load_export(run_dir, model_class)
    folder = run_dir / "export" / "model"
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    built, task = checkpoint_task(run_dir, steps)
    text = f"{VISION_START}{IMAGE_PAD * built.visual_tokens}{VISION_END}\na red circle."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    pixels = image_processor(images=Image.new("RGB", (32, 32), (200, 30, 30)), return_tensors="pt")
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        exported = stock(input_ids=ids, mm_token_type_ids=(ids == built.image_token_id).int(), **pixels).logits
        trained, _ = task.run({**batch, "pixel_values": pixels["pixel_values"][None]}, [16])
    torch.testing.assert_close(trained, exported, rtol=1e-4, atol=1e-4)
    # `mtrain generate` without torchvision (the prompt from Qwen's tokenizer and image processor): the export and
    # the checkpoint give the same answer.
    from_export, from_checkpoint = generated_answers(run_dir)
    assert from_export == from_checkpoint
