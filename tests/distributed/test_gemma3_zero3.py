"""The tiny-gemma3 preset under real 2-rank ZeRO-3: M3 at every scale in one pass, MSS LoRA (a shared
adapter plus one per scale) and packed rows, through the real loader (Gemma 3's image processor, the
bidirectional image attention per packed document); the export at the end is a folder stock
transformers loads as Gemma 3."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, read_metrics, run, torchrun

pytestmark = pytest.mark.timeout(300)


def test_two_rank_zero3_gemma3_m3_mss_lora_packed(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    steps = 8
    cmd = [
        *torchrun(), "-m", "mtrain",
        "train", str(REPO / "configs/tiny.yaml"), f"run.dir={run_dir}", f"data.shards={shards_pattern}",
        "model.preset=tiny-gemma3", f"run.max_steps={steps}", "optim.warmup_steps=2", "logging.progress=false",
        "zero.param_persistence_threshold=0", "data.packing=true", "matryoshka.tokens.layout=packed",
        "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16]", "matryoshka.tokens.policy=all",
        "model.lora.strategy=shared_plus_per_scale",
    ]  # fmt: skip
    proc = run(cmd, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0

    metrics = read_metrics(run_dir)
    assert len(metrics) == steps
    losses = [m["loss"] for m in metrics]  # 6.24 -> 4.73 over the 8 steps when written
    assert losses[-1] < 0.85 * losses[0] and all(a > b for a, b in zip(losses[:-1], losses[1:], strict=True))
    assert all(f"loss/scale_{s}" in m for m in metrics for s in (1, 4, 16))  # every scale, every step

    import torch
    from transformers import AutoModelForImageTextToText

    exported = run_dir / "export" / "model"
    model = AutoModelForImageTextToText.from_pretrained(exported, local_files_only=True)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0  # the seeded start, trained
    assert not torch.isnan(model.lm_head.weight).any()
    assert sorted(p.name for p in (run_dir / "export" / "adapter").iterdir() if p.is_dir()) == [
        "scale_1", "scale_16", "scale_4", "shared",
    ]  # fmt: skip
