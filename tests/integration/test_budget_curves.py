"""The budget-curve experiments on real digits, shortened: each Matryoshka head beats its baseline.

`benchmarks/budget_curves/run.py --quick` builds the digit shards with `mtrain data build`, trains
M3 and its full-grid-only baseline, MRL and its no-MRL baseline (fewer steps than the full
script), each evaluating the held-out scans in the loop after its last step; the figures are the
final checkpoints' budget curves.
"""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.budget_curves.run import curve
from tests.conftest import REPO, run
from tests.unit.test_generation import GENERATED_ACCURACY_FLOOR


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_matryoshka_heads_beat_their_baselines_on_digits(tmp_path):
    out, data = tmp_path / "results", tmp_path / "digits"
    script = REPO / "benchmarks" / "budget_curves" / "run.py"
    command = [sys.executable, str(script), "--quick", "--out", str(out), "--data", str(data), "--work", str(tmp_path)]
    proc = run(command, REPO, timeout=1100)
    assert proc.returncode == 0
    assert json.loads((data / "conversation" / "heldout" / "index.json").read_text())["samples"], "no held-out shards"
    runs = json.loads((out / "results.json").read_text())
    assert set(runs) == {"m3", "full_grid", "mrl", "no_mrl"}

    m3, full_grid_only = curve(runs["m3"]), curve(runs["full_grid"])
    assert sorted(m3) == sorted(full_grid_only) == [1, 4, 16]
    assert all(r["answers"] == 360 for r in runs["m3"]["results"]), "every held-out scan is answered once"
    assert (tmp_path / "m3" / "run" / "export" / "model" / "config.json").is_file()
    final = tmp_path / "m3" / "run" / "checkpoints" / f"step_{runs['m3']['steps']:08d}"
    assert (final / "budget_curve.png").stat().st_size > 1000  # the checkpoint's curve, which results.json holds
    assert m3[1] > full_grid_only[1], f"M3 {m3} is not above the full-grid-only baseline {full_grid_only} at 1 token"
    assert m3[16] > 0.3, f"M3 did not learn the digits (chance is 0.1): {m3}"
    # Greedy generation answers every held-out scan as well: above the floor a random model stays under
    # (tests/unit/test_generation.py), and close to the teacher-forced answer accuracy (the same argmaxes).
    generated = {r["scale"]: r["generated_accuracy"] for r in runs["m3"]["results"]}
    assert all(r["generated_answers"] == 360 for r in runs["m3"]["results"])
    assert generated[16] > GENERATED_ACCURACY_FLOOR, f"M3's generated answers {generated} are not above the floor"
    assert all(abs(generated[s] - m3[s]) < 0.05 for s in m3), f"generated {generated} vs teacher-forced {m3}"

    mrl, no_mrl = curve(runs["mrl"]), curve(runs["no_mrl"])
    assert sorted(mrl) == [8, 16, 32, 64]
    assert mrl[8] > no_mrl[8], f"MRL {mrl} is not above truncated no-MRL {no_mrl} at 8 dims"
    assert all(r["queries"] == 360 for r in runs["mrl"]["results"]), "every held-out scan is a query once"

    report = (out / "RESULTS.md").read_text()
    assert "## The expected shapes" in report
    for plot in ("tokens.png", "dims.png"):
        assert (out / plot).stat().st_size > 1000
