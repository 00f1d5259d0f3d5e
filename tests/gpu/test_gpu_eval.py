"""`mtrain eval` on one CUDA GPU in bf16 (the auto placement there) against the same evaluation on the CPU in
fp32 (`run.device=cpu`): the same rows counted, the loss within bf16 rounding. Skipped without a GPU; the CPU
side of the precision choice is tests/unit/test_eval_placement.py. Run by `scripts/gpu-check.sh`."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

TINY = str(REPO / "configs" / "tiny.yaml")
LOSS_RTOL = 0.01  # as tests/gpu/test_gpu_compute.py: bf16 keeps 8 mantissa bits


def test_mtrain_eval_in_bf16_on_the_gpu_matches_fp32_on_the_cpu(tmp_path, capsys):
    from data_pipeline.sample_data import write_sample_shards
    from mtrain.eval.run import run_eval

    write_sample_shards(tmp_path, num_shards=1, samples_per_shard=12, seed=3)
    held_out = str(tmp_path / "shard-000000.tar")
    scales = [1, 4, 16, 64]
    overrides = ["matryoshka.tokens.mode=m3", "matryoshka.tokens.scales=[1,4,16,64]"]
    gpu = run_eval(TINY, overrides, held_out, 0, scales, str(tmp_path / "gpu"))
    assert "mtrain eval: 1 rank(s), cuda/bf16" in capsys.readouterr().err
    cpu = run_eval(TINY, [*overrides, "run.device=cpu"], held_out, 0, scales, str(tmp_path / "cpu"))
    assert "mtrain eval: 1 rank(s), cpu/fp32" in capsys.readouterr().err
    assert [r.scale for r in gpu] == [r.scale for r in cpu] == scales
    for on_gpu, on_cpu in zip(gpu, cpu, strict=True):
        assert (on_gpu.tokens, on_gpu.answers) == (on_cpu.tokens, on_cpu.answers) and on_cpu.answers == 12
        assert on_gpu.loss == pytest.approx(on_cpu.loss, rel=LOSS_RTOL), on_gpu.scale
