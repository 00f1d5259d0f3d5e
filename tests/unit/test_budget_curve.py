"""Budget curves from real evaluations of the tiny model: the checkpoint's JSON and PNG, and `mtrain plot`'s
quality against budget over training (the checkpoint folder that holds one and resumes bit-exactly is
tests/integration/test_checkpoint_resume.py)."""

from __future__ import annotations

import json

import pytest
import torch

from mtrain.cli import main
from mtrain.eval.curves import BudgetCurve, budget_curve, plot_panels, read_curve, thinned, write_curve
from tests.unit.test_in_loop_eval import SINGLE, build

SCALES = [1, 4, 16, 64]


def drawn(path) -> bool:
    """A PNG with something on it, not a blank canvas."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)[..., :3].std() > 0.05


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
    """Two real in-loop evaluations of the tiny M3 model on held-out shards, before and after 4 training steps."""
    from data_pipeline.sample_data import write_sample_shards
    from mtrain.eval.in_loop import InLoopEval
    from mtrain.eval.run import eval_batches

    folder = tmp_path_factory.mktemp("heldout")
    write_sample_shards(folder, num_shards=1, samples_per_shard=8, seed=3)
    held_out = str(folder / "shard-000000.tar")
    overrides = [f"eval.shards={held_out}", "matryoshka.tokens.mode=m3", f"matryoshka.tokens.scales={SCALES}"]
    cfg, built, task = build("tiny.yaml", [o.replace(" ", "") for o in overrides])
    evaluation = InLoopEval.for_run(cfg, SINGLE, built, task)
    before = evaluation.evaluate(lambda batch: batch, "cpu")
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(4):  # the held-out batch itself: the loss there must fall
        for batch in eval_batches(cfg, built, held_out):
            optimizer.zero_grad()
            task(batch)[0].backward()
            optimizer.step()
    return {2: before, 6: evaluation.evaluate(lambda batch: batch, "cpu")}


def test_checkpoint_curve_holds_every_metric_per_budget(evaluations, tmp_path):
    metrics = evaluations[6]
    curve = budget_curve(6, {"loss": 1.0, "lr": 0.1, **metrics})  # the training scalars beside it are ignored
    json_path, png_path = write_curve(curve, tmp_path)
    written = json.loads(json_path.read_text())
    assert written["step"] == 6 and written["axis"] == "scale"
    assert [point["scale"] for point in written["points"]] == SCALES
    for point in written["points"]:
        for name in ("loss", "token_accuracy", "answer_accuracy", "tokens", "answers"):
            assert point[name] == metrics[f"eval/{name}/scale_{point['scale']}"], name
        assert point["answers"] == 8 and isinstance(point["answers"], int)
    assert read_curve(tmp_path) == curve
    assert curve.quality_metrics == ["loss", "token_accuracy", "answer_accuracy"]  # counts are not drawn
    assert drawn(png_path)
    with pytest.raises(FileNotFoundError, match="eval.shards"):
        read_curve(tmp_path / "nothing")


def test_contrastive_budgets_by_dim_and_layer():
    metrics = {f"eval/{name}/layer_{layer}/dim_{dim}": layer + dim / 100 for name in ("recall_at_1", "queries")
               for layer in (1, 2) for dim in (64, 8)}  # fmt: skip
    curve = budget_curve(3, metrics)
    assert curve.axis == "dim" and curve.layers == [1, 2]
    assert curve.series("recall_at_1", 2) == ([8, 64], [2.08, 2.64])
    assert curve.points[0] == {"layer": 1, "dim": 8, "recall_at_1": 1.08, "queries": 1}
    assert budget_curve(3, {"loss": 1.0}) is None
    with pytest.raises(ValueError, match="both kinds"):
        budget_curve(3, {"eval/loss/scale_4": 1.0, "eval/recall_at_1/dim_8": 0.5})


def test_plot_draws_quality_against_budget_over_training(evaluations, tmp_path, capsys):
    from mtrain.metrics.sinks import JsonlSink

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sink = JsonlSink(run_dir / "metrics.jsonl")
    for step in range(1, 7):  # as a run logs them: training lines, and eval lines at steps 2 and 6
        sink.log(step, {"loss": 6.0 / step, "tokens_per_s": 100.0})
        if step in evaluations:
            sink.log(step, evaluations[step])
    sink.close()
    largest = f"eval/loss/scale_{SCALES[-1]}"
    assert evaluations[6][largest] < evaluations[2][largest]  # the two lines differ: the model trained between

    assert main(["plot", str(run_dir)]) == 0
    plots = run_dir / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["budget.png", "loss.png", "throughput.png"]
    assert drawn(plots / "budget.png")
    assert main(["plot", str(run_dir), "--budget", "--out", str(tmp_path / "only")]) == 0
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["budget.png"]
    assert "no budget.png" not in capsys.readouterr().out


def test_plot_of_a_run_without_evaluation_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert main(["plot", str(run_dir), "--budget"]) == 2
    assert "holds no eval records" in capsys.readouterr().err
    assert main(["plot", str(run_dir)]) == 0  # the loss curves still, and a line on why no budget plot
    assert "no budget.png: the run logged no evaluation" in capsys.readouterr().out


def test_thinned_keeps_first_last_and_evenly_spaced():
    curves = [BudgetCurve(step, "scale", []) for step in range(10, 210, 10)]
    assert [c.step for c in thinned(curves, 5)] == [10, 60, 110, 150, 200]
    assert thinned(curves[:3], 5) == curves[:3]


def test_panels_cover_every_metric_any_evaluation_logged():
    early = budget_curve(2, {"eval/loss/scale_4": 2.0, "eval/answers/scale_4": 8})
    late = budget_curve(4, {"eval/loss/scale_4": 1.0, "eval/generated_accuracy/scale_4": 0.5})
    assert plot_panels([early, late]) == [("loss", None), ("generated_accuracy", None)]
