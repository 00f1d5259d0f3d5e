"""ZeRO-Offload under real 2-rank ZeRO-3: each offload mode trains, checkpoints and resumes bit-exactly.

The optimizer offloaded to CPU steps with DeepSpeed's CPU Adam (a C++ op built once per machine and
cached in the torch extensions folder); parameter offload keeps the ZeRO-3 partitions on the CPU too.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run
from tests.integration.test_checkpoint_resume import SAVE_EVERY, STEPS, consolidated, losses, train_cmd

pytestmark = pytest.mark.timeout(900)

MODES = {
    "optimizer": ["zero.offload_optimizer=cpu"],
    "optimizer_and_params": ["zero.offload_optimizer=cpu", "zero.offload_param=cpu"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_offload_trains_checkpoints_and_resumes_bit_exactly(tmp_path, shards_pattern, mode):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # The first offload run on a machine may build the CPU Adam op (about a minute; scripts/install.sh prebuilds it).
    proc = run(train_cmd(2, straight, shards_pattern, *MODES[mode]), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0
    zero = json.loads((straight / "ds_config.json").read_text())["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in zero) == (mode == "optimizer_and_params")

    # A second run continues from the straight run's mid-way checkpoint: the same losses, bitwise.
    saved = straight / "checkpoints" / f"step_{SAVE_EVERY:08d}"
    proc = run(train_cmd(2, resumed, shards_pattern, *MODES[mode], f"checkpoint.resume={saved}"), cwd=tmp_path)
    assert proc.returncode == 0
    assert f"at step {SAVE_EVERY} (exact load, RNG restored)" in proc.stderr
    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(SAVE_EVERY + 1, STEPS + 1))
    for step in got:
        assert got[step] == expected[step], step

    # It trained, and the resumed run ends on the very same weights.
    final = f"step_{STEPS:08d}"
    a, b, at_save = consolidated(straight, final), consolidated(resumed, final), consolidated(straight, saved.name)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], at_save[k]) for k in a)
