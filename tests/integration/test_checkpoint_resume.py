"""Checkpoints under real 2-rank ZeRO-3 runs: bit-exact resume after SIGKILL, kills inside a save,
another world size, and DeepSpeed's own zero_to_fp32 on mtrain's folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import launch_env, mtrain_train, read_metrics, run

pytestmark = pytest.mark.timeout(600)

STEPS, SAVE_EVERY = 6, 3


def train_cmd(ranks: int, run_dir: Path, shards: str, *extra: str) -> list[str]:
    # A key may be given once (config/core.py): `extra` may set its own run.max_steps.
    steps = [] if any(e.startswith("run.max_steps=") for e in extra) else [f"run.max_steps={STEPS}"]
    return mtrain_train(
        run_dir,
        shards,
        *steps,
        f"checkpoint.save_every={SAVE_EVERY}",
        "checkpoint.export_at_end=false",
        "zero.param_persistence_threshold=0",  # really sharded: each rank holds half of every tensor
        *extra,
        ranks=ranks,
    )


def with_fault(stage: str) -> dict[str, str]:
    return {**launch_env(), "MTRAIN_FAULT_INJECT": stage}


def consolidated(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's own zero_to_fp32 on an mtrain checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss"], m["grad_norm"]) for m in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, sample_shards):
    """An uninterrupted 2-rank run, and the same command SIGKILLed after its step-3 save then re-run."""
    shards = str(sample_shards / "shard-{000000..000003}.tar")
    base = tmp_path_factory.mktemp("resume")
    straight, killed = base / "straight", base / "killed"
    assert run(train_cmd(2, straight, shards), cwd=base).returncode == 0
    crashed = run(train_cmd(2, killed, shards), cwd=base, env=with_fault(f"saved@{SAVE_EVERY}"))
    outputs = {"crashed": crashed}
    outputs["resumed"] = run(train_cmd(2, killed, shards), cwd=base)  # the very same command again
    return base, shards, straight, killed, outputs


def test_sigkill_then_same_command_resumes_bit_exactly(two_rank_runs):
    _, _, straight, killed, outputs = two_rank_runs
    crashed, resumed = outputs["crashed"], outputs["resumed"]
    assert crashed.returncode != 0  # SIGKILLed right after the step-3 save
    assert resumed.returncode == 0
    assert f"at step {SAVE_EVERY} (exact load, RNG restored)" in resumed.stderr

    # Per-step losses (and gradient norms) after the save are bitwise identical; LoRA dropout is on,
    # so this holds only because every rank's RNG and data position came back.
    expected, got = losses(straight), losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))  # lines past the checkpoint were not duplicated
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        assert got[step] == expected[step], step

    # Final parameters, consolidated by DeepSpeed's own zero_to_fp32, are bitwise identical.
    final = f"step_{STEPS:08d}"
    a, b = consolidated(straight, final), consolidated(killed, final)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    at_save = consolidated(straight, f"step_{SAVE_EVERY:08d}")
    assert any(not torch.equal(a[k], at_save[k]) for k in a)  # the steps after the save did train

    # The checkpoint holds what the issue lists.
    folder = straight / "checkpoints" / final
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["meta"]["trainer"]["step"] == STEPS and manifest["meta"]["world_size"] == 2
    assert manifest["meta"]["trainer"]["tokens_seen"] > 0 and manifest["meta"]["config_hash"]
    for rank in range(2):
        data = json.loads((folder / f"rank{rank:05d}_data.json").read_text())
        assert data["batches_taken"] == STEPS and data["rank"] == rank
        state = torch.load(folder / f"rank{rank:05d}_state.pt", weights_only=True)
        assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert set(manifest["files"]) >= {"config.yaml", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert (straight / "checkpoints" / "latest").read_text() == final

    # The checkpoint's adapter/ (gathered from the trainable parameters of both ranks' shards) is
    # exactly what DeepSpeed consolidates.
    from safetensors.torch import load_file

    adapter = load_file(folder / "adapter" / "adapter_model.safetensors")
    lora = {k: v for k, v in adapter.items() if ".lora_" in k}
    assert len(lora) == 8  # q_proj and v_proj, A and B, 2 layers
    for name, tensor in lora.items():
        full = "model." + name.replace(".weight", ".default.weight")
        assert torch.equal(tensor, a[full]), name


def test_world_size_two_to_one_and_back_continues(two_rank_runs):
    base, shards, straight, _, _ = two_rank_runs
    one = base / "one-rank"
    source = straight / "checkpoints" / f"step_{STEPS:08d}"
    proc = run(train_cmd(1, one, shards, f"checkpoint.resume={source}", f"run.max_steps={STEPS + 2}"), cwd=base)
    assert "converting to DeepSpeed's universal format" in proc.stderr
    assert (straight / "checkpoints" / "universal" / source.name / "zero").is_dir()
    assert proc.returncode == 0
    assert f"at step {STEPS} (universal load" in proc.stderr
    assert sorted(losses(one)) == [STEPS + 1, STEPS + 2]
    assert (
        json.loads((one / "checkpoints" / f"step_{STEPS + 2:08d}" / "manifest.json").read_text())["meta"]["trainer"][
            "step"
        ]
        == STEPS + 2
    )

    two = base / "two-ranks-again"
    source = one / "checkpoints" / f"step_{STEPS + 2:08d}"
    proc = run(train_cmd(2, two, shards, f"checkpoint.resume={source}", f"run.max_steps={STEPS + 4}"), cwd=base)
    assert proc.returncode == 0
    assert f"at step {STEPS + 2} (universal load" in proc.stderr
    assert sorted(losses(two)) == [STEPS + 3, STEPS + 4]
    # The trained weights carried over: the loss continues from where the 1-rank run left off.
    assert losses(two)[STEPS + 3][0] < losses(straight)[1][0] - 0.5
