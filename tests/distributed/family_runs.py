"""The 2-rank ZeRO-3 run the single-image families share (gemma3, qwen2_vl): M3 at scales [1,4,16] in one
pass, MSS LoRA (a shared adapter plus one per scale) and packed rows through the real loader, then a look at
its export."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import mtrain_train, read_metrics, run

SCALES = (1, 4, 16)


def train_m3_mss_packed(tmp_path: Path, shards_pattern: str, preset: str, steps: int) -> tuple[Path, list[dict]]:
    """Train `preset` for `steps` on 2 ranks; returns the run folder and its metrics, one a step, each with
    every scale's loss."""
    run_dir = tmp_path / "run"
    cmd = mtrain_train(
        run_dir, shards_pattern,
        f"model.preset={preset}", f"run.max_steps={steps}", "optim.warmup_steps=2",
        "zero.param_persistence_threshold=0", "data.packing=true", "matryoshka.tokens.layout=packed",
        "matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16]", "matryoshka.tokens.policy=all",
        "model.lora.strategy=shared_plus_per_scale",
        ranks=2,
    )  # fmt: skip
    proc = run(cmd, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0

    metrics = read_metrics(run_dir)
    assert len(metrics) == steps
    assert all(f"loss/scale_{s}" in m for m in metrics for s in SCALES)  # every scale, every step
    return run_dir, metrics


def load_export(run_dir: Path, model_class: str):
    """The exported model as stock transformers loads it, of class `model_class`; the export also holds the
    shared and per-scale adapters."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(run_dir / "export" / "model", local_files_only=True)
    assert type(model).__name__ == model_class
    assert sorted(p.name for p in (run_dir / "export" / "adapter").iterdir() if p.is_dir()) == [
        "scale_1", "scale_16", "scale_4", "shared",
    ]  # fmt: skip
    return model
