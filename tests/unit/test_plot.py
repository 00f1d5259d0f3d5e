"""`mtrain plot RUN_DIR`: PNG curves from a metrics.jsonl the test writes."""

from __future__ import annotations

import json

import pytest

from mtrain.cli import main
from mtrain.metrics.plot import loss_keys, read_metrics


def write_metrics(run_dir, steps: int) -> None:
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as out:
        for step in range(1, steps + 1):
            record = {"step": step, "loss": 6.0 / step, "tokens_per_s": 1000.0 + step, "samples_per_s": 10.0 + step}
            record |= {f"loss/scale_{s}": 6.5 / step - s / 100 for s in (1, 4, 16, 64)}
            record |= {f"loss/dim_{d}": 7.0 / step - d / 1000 for d in (8, 32)}
            record |= {"data_wait_frac": 0.05, "mfu": 0.3}
            out.write(json.dumps(record) + "\n")


def test_plot_writes_non_empty_pngs(tmp_path, capsys):
    import matplotlib.image

    run_dir = tmp_path / "run"
    write_metrics(run_dir, steps=12)
    assert loss_keys(read_metrics(run_dir / "metrics.jsonl")) == [
        "loss", "loss/dim_8", "loss/dim_32", "loss/scale_1", "loss/scale_4", "loss/scale_16", "loss/scale_64",
    ]  # fmt: skip
    assert main(["plot", str(run_dir)]) == 0
    written = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert written == ["loss.png", "throughput.png", "utilisation.png"]
    for name in written:
        path = run_dir / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] >= 300 and image.shape[1] >= 500
        assert image[..., :3].std() > 0.05  # curves were drawn, not a blank canvas
    assert "wrote" in capsys.readouterr().out


def test_plot_explains_a_missing_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "give a run folder written by `mtrain train`" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no logged steps"):
        read_metrics(tmp_path / "empty" / "metrics.jsonl")
