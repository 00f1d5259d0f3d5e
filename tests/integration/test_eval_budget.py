"""`mtrain eval` on a trained tiny M3 checkpoint prints the per-scale table and writes the curve; its figures
separate a trained model from a freshly initialised one."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BIN, REPO, run

pytestmark = pytest.mark.timeout(300)

# A freshly initialised tiny model scores about ln(vocabulary) = 6.28 at every scale and predicts no
# caption token; six steps of training bring every scale below 5.9 and a tenth of the tokens right.
LOSS_FLOOR, ACCURACY_FLOOR = 5.9, 0.1
M3 = ["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16,64]", "model.lora.strategy=shared_plus_per_scale"]


def test_eval_prints_per_scale_table_and_writes_plot(tmp_path, shards_pattern):
    run_dir = tmp_path / "run"
    train = run([str(BIN / "python"), "-m", "mtrain", "train", str(REPO / "configs/tiny.yaml"), f"run.dir={run_dir}",
                 f"data.shards={shards_pattern}", "run.max_steps=6", "logging.progress=false",
                 "checkpoint.export_at_end=false", *M3], cwd=tmp_path)  # fmt: skip
    assert train.returncode == 0
    out = tmp_path / "eval"
    proc = run([str(BIN / "python"), "-m", "mtrain", "eval", str(run_dir / "checkpoints"), "--batches", "2",
                "--shards", shards_pattern, "--out", str(out)], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0
    table = [line.split() for line in proc.stdout.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in table] == [1, 4, 16, 64]
    results = json.loads((out / "budget.json").read_text())["results"]
    assert [r["scale"] for r in results] == [1, 4, 16, 64]
    assert all(r["answers"] == 16 and r["tokens"] > 0 for r in results)
    assert all(r["loss"] < LOSS_FLOOR and r["token_accuracy"] > ACCURACY_FLOOR for r in results), results
    png = (out / "budget.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # A freshly initialised full-grid model (a config: built as configured, random weights) fails the floors at
    # every scale; the pooled scales it never trained at are evaluated only on request, and marked.
    fresh = run([str(BIN / "python"), "-m", "mtrain", "eval", str(REPO / "configs/tiny.yaml"), "--batches", "2",
                 "--scales", "1,4,16,64", "--untrained-budgets", "--shards", shards_pattern,
                 "--out", str(tmp_path / "fresh")], cwd=tmp_path)  # fmt: skip
    assert fresh.returncode == 0
    untrained = json.loads((tmp_path / "fresh" / "budget.json").read_text())["results"]
    assert all(r["loss"] > LOSS_FLOOR and r["token_accuracy"] < ACCURACY_FLOOR for r in untrained), untrained
    assert [r["trained"] for r in untrained] == [False, False, False, True]
    assert "trained=no: a budget this model never trained at" in fresh.stdout
