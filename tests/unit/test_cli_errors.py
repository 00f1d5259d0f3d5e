"""`mtrain eval` and `mtrain inspect` given the wrong kind of folder, or missing shards: one clear line,
before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, launch_env


def mtrain_in_child(*args: str) -> subprocess.CompletedProcess:
    """Run `mtrain ARGS` in a fresh interpreter and report whether the model builder was imported."""
    code = (
        "import sys\nfrom mtrain.cli import main\nrc = main(sys.argv[1:])\n"
        "print('model-loaded' if 'transformers.models.llava.modeling_llava' in sys.modules else 'model-not-loaded')\nsys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=launch_env(), cwd=REPO
    )


def test_eval_of_an_export_says_what_it_takes(tmp_path):
    export = tmp_path / "export"
    (export / "model").mkdir(parents=True)
    (export / "mtrain.json").write_text(json.dumps({"step": 4}))
    proc = mtrain_in_child("eval", str(export))
    assert proc.returncode == 2
    assert "checkpoint.resume" not in proc.stderr
    assert f"{export} is an export (load it with transformers/PEFT), not an mtrain checkpoint" in proc.stderr
    assert "model-not-loaded" in proc.stdout


def test_eval_with_missing_shards_fails_before_loading_the_model(tmp_path):
    proc = mtrain_in_child("eval", str(REPO / "configs/tiny.yaml"), "--shards", str(tmp_path / "x-{0..1}.tar"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("mtrain: error: --shards: 2 shard(s) not found")
    assert "model-not-loaded" in proc.stdout
    proc = mtrain_in_child("eval", str(REPO / "configs/tiny.yaml"), f"data.shards={tmp_path}/y.tar")
    assert (
        proc.returncode == 2 and "data.shards (pass --shards to evaluate others): 1 shard(s) not found" in proc.stderr
    )
    assert "model-not-loaded" in proc.stdout


def test_inspect_of_a_run_folder_reads_its_checkpoints(tmp_path):
    from mtrain.checkpoint.inspect import inspect_path

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert inspect_path(tmp_path / "run").startswith(f"{tmp_path / 'run' / 'checkpoints'}: 0 complete checkpoint(s)")
