"""The tiny-qwen2-vl preset under real 2-rank ZeRO-3: M3 at every scale in one pass, MSS LoRA (a shared
adapter plus one per scale) and packed rows, through the real loader (Qwen's patches, 3-D M-RoPE ids
per document); the export at the end is a folder stock transformers loads as Qwen2-VL."""

from __future__ import annotations

import pytest

from tests.distributed.family_runs import load_export, train_m3_mss_packed

pytestmark = pytest.mark.timeout(300)


def test_two_rank_zero3_qwen2_vl_m3_mss_lora_packed(tmp_path, shards_pattern):
    run_dir, metrics = train_m3_mss_packed(tmp_path, shards_pattern, "tiny-qwen2-vl", steps=8)
    assert metrics[-1]["loss"] < 0.75 * metrics[0]["loss"]
    load_export(run_dir, "Qwen2VLForConditionalGeneration")
