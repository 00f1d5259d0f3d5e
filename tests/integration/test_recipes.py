"""Every tiny recipe (configs/recipes/tiny/, overlays of the full-size recipes) trains a few steps,
single-process, on sample shards of its data form; each run shows what its recipe is for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, read_metrics, run

TINY = REPO / "configs/recipes/tiny"
STAGE1_STEPS = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    """Sample shards of every form the recipes read, written once: form -> brace pattern."""
    from data_pipeline.pairs import write_pair_shards
    from data_pipeline.sample_data import write_conversation_shards, write_interleaved_shards, write_sample_shards

    root = tmp_path_factory.mktemp("recipe_shards")
    writers = {
        "caption": (write_sample_shards, "shard"),
        "interleaved": (write_interleaved_shards, "docs"),
        "conversation": (write_conversation_shards, "chat"),
        "pairs": (write_pair_shards, "pairs"),
    }
    patterns = {}
    for form, (writer, prefix) in writers.items():
        writer(root / form, num_shards=2, samples_per_shard=32, seed=0)
        patterns[form] = str(root / form / f"{prefix}-{{000000..000001}}.tar")
    return patterns


def train_recipe(recipe: str, run_dir: Path, shards: str, *overrides: str, steps: int = 2) -> str:
    """`python -m mtrain train configs/recipes/tiny/RECIPE.yaml ...`; returns its stderr."""
    cmd = [
        str(BIN / "python"),
        "-m",
        "mtrain",
        "train",
        str(TINY / f"{recipe}.yaml"),
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"run.max_steps={steps}",
        "checkpoint.export_at_end=false",
        "logging.progress=false",
        *overrides,
    ]
    proc = run(cmd, cwd=run_dir.parent)
    assert proc.returncode == 0, f"tiny recipe {recipe} failed"
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, steps + 1))
    return proc.stderr


def engine_elements(run_dir: Path) -> dict[str, int]:
    return json.loads((run_dir / "ranks/rank00000.json").read_text())["parameter_elements"]["engine"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, shards) -> Path:
    run_dir = tmp_path_factory.mktemp("recipes") / "pretrain_projector"
    train_recipe("pretrain_projector", run_dir, shards["caption"], steps=STAGE1_STEPS)
    return run_dir


def test_pretrain_projector_trains_only_the_projector_and_head(stage1):
    metrics = read_metrics(stage1)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    elements = engine_elements(stage1)
    # Vision tower and LLM frozen: the projector and the tiny LM's head are a small share.
    assert 0 < elements["trainable"] < elements["total"] / 4
    assert not any(metric.startswith("loss/scale_") for metric in metrics[0])
    assert not (stage1 / f"checkpoints/step_{STAGE1_STEPS:08d}/adapter").exists()


def test_continue_pretrain_interleaved_from_stage1_with_m3_and_packing(tmp_path, shards, stage1):
    stage2 = tmp_path / "continue"
    log = train_recipe(
        "continue_pretrain_interleaved",
        stage2,
        shards["interleaved"],
        f"checkpoint.init_from={stage1 / 'checkpoints'}",
    )
    assert "init_from: weights from" in log
    metrics = read_metrics(stage2)
    for step in metrics:
        assert {f"loss/scale_{s}" for s in (1, 4, 16, 64)} <= step.keys()
    # Packing: more documents than rows (micro-batch 4 rows per step).
    assert metrics[0]["data/samples"] > 4
    scratch = tmp_path / "scratch"
    train_recipe("continue_pretrain_interleaved", scratch, shards["interleaved"], "checkpoint.init_from=null", steps=1)
    # Same seed and data order: the first batch is the same; stage 1's weights already help.
    assert metrics[0]["loss"] < read_metrics(scratch)[0]["loss"] - 0.1


def test_lora_sft_matryoshka_trains_shared_and_per_scale_adapters(tmp_path, shards):
    run_dir = tmp_path / "lora_sft"
    train_recipe("lora_sft_matryoshka", run_dir, shards["conversation"])
    scales = (1, 4, 16, 64)
    for step in read_metrics(run_dir):
        assert {f"loss/scale_{s}" for s in scales} <= step.keys()
    adapters = {path.name for path in (run_dir / "checkpoints/step_00000002/adapter").iterdir()}
    assert adapters == {"shared", *(f"scale_{s}" for s in scales)}


def test_mqt_finetune_draws_one_scale_per_step(tmp_path, shards):
    run_dir = tmp_path / "mqt"
    train_recipe("mqt_finetune", run_dir, shards["conversation"], steps=3)
    for step in read_metrics(run_dir):
        drawn = int(step["scale_drawn"])
        assert drawn in range(2, 17, 2) and step["scale_drawn_rank_spread"] == 0
        assert [key for key in step if key.startswith("loss/scale_")] == [f"loss/scale_{drawn}"]


def test_embedding_mrl_sums_the_loss_over_every_dim(tmp_path, shards):
    run_dir = tmp_path / "embedding"
    train_recipe("embedding_mrl", run_dir, shards["pairs"])
    for step in read_metrics(run_dir):
        dims = {key.rsplit("_dim", 1)[1] for key in step if key.startswith("loss/layer")}
        assert dims == {"8", "16", "32", "64"}
