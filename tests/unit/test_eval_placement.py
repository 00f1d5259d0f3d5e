"""`mtrain eval` runs in the training run's placement: `run.device` / `run.precision` pick the device and dtype
(auto: bf16 on a GPU, fp32 on the CPU), with the same algorithm either way. Here on the CPU in one process; the
GPU run is tests/gpu/test_gpu_eval.py, the ZeRO-3 partitioned run on 2 ranks tests/integration/
test_checkpoint_resume.py (its figures equal the in-loop evaluation's)."""

from __future__ import annotations

import pytest
import torch

from mtrain.config import load_config
from mtrain.engine.setup import resolve_placement
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def test_auto_placement_is_bf16_on_a_gpu_and_fp32_on_the_cpu(monkeypatch):
    cfg = load_config(TINY)
    assert (resolve_placement(cfg).device, resolve_placement(cfg).dtype) == ("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the choice is made, nothing runs there
    placement = resolve_placement(cfg)
    assert (placement.device, placement.dtype, placement.backend) == ("cuda", torch.bfloat16, "nccl")


def test_mtrain_eval_uses_the_configured_precision_with_the_same_algorithm(tmp_path, capsys):
    from data_pipeline.sample_data import write_sample_shards
    from mtrain.eval.budget import eval_source
    from mtrain.eval.run import eval_model, run_eval
    from mtrain.launch.env import WorldInfo

    write_sample_shards(tmp_path, num_shards=1, samples_per_shard=6, seed=3)
    held_out = str(tmp_path / "shard-000000.tar")
    single = WorldInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")
    rows = {}
    for precision, dtype in (("auto", torch.float32), ("bf16", torch.bfloat16)):
        overrides = [f"run.precision={precision}"]
        cfg, _ = eval_source(TINY, overrides, held_out)
        _, task = eval_model(cfg, None, single, resolve_placement(cfg))
        assert {param.dtype for param in task.parameters()} == {dtype}
        rows[precision] = run_eval(TINY, overrides, held_out, 0, None, str(tmp_path / precision))[0]
        shown = "fp32" if dtype == torch.float32 else "bf16"
        assert f"mtrain eval: 1 rank(s), cpu/{shown}, rank 0 holds" in capsys.readouterr().err
    fp32, bf16 = rows["auto"], rows["bf16"]
    assert (fp32.tokens, fp32.answers) == (bf16.tokens, bf16.answers) and fp32.answers == 6  # the same rows counted
    assert bf16.loss == pytest.approx(fp32.loss, rel=0.02)  # bf16 rounding of the same forwards
