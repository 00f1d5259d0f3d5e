"""Checkpoints under real 2-rank ZeRO-3 runs: bit-exact resume after SIGKILL (with the in-loop evaluation
on, and each checkpoint's budget curve), kills inside a save, another world size, and DeepSpeed's own
zero_to_fp32 on mtrain's folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import launch_env, mtrain_train, read_metrics, run, torchrun

pytestmark = pytest.mark.timeout(600)

STEPS, SAVE_EVERY = 6, 3
EVAL_EVERY, EVAL_SCALES = 2, [1, 4, 16, 64]  # M3 budgets of a model trained at the full grid (shared LoRA)
GENERATED = 5  # held-out samples answered by generation: 3 on rank 0, 2 on rank 1


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
    return {m["step"]: (m["loss"], m["grad_norm"]) for m in read_metrics(run_dir) if "loss" in m}


def eval_lines(run_dir: Path) -> dict[int, dict[str, float]]:
    return {m["step"]: m for m in read_metrics(run_dir) if any(k.startswith("eval/") for k in m)}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, sample_shards):
    """An uninterrupted 2-rank run, and the same command SIGKILLed after its step-3 save then re-run."""
    from data_pipeline.sample_data import write_sample_shards

    shards = str(sample_shards / "shard-{000000..000003}.tar")
    base = tmp_path_factory.mktemp("resume")
    # 17 held-out samples: 9 (2 batches) and 8 (1 batch) per rank, so rank 1 runs a round again, uncounted.
    write_sample_shards(base / "heldout", num_shards=1, samples_per_shard=17, seed=5)
    # Generation too: the first GENERATED samples answered greedily at every scale, both ranks stepping together.
    evaluation = (f"eval.shards={base / 'heldout' / 'shard-000000.tar'}", f"eval.every={EVAL_EVERY}",
                  f"eval.scales={EVAL_SCALES}".replace(" ", ""), f"eval.generate_samples={GENERATED}",
                  "eval.max_new_tokens=3")  # fmt: skip
    straight, killed = base / "straight", base / "killed"
    assert run(train_cmd(2, straight, shards, *evaluation), cwd=base).returncode == 0
    crashed = run(train_cmd(2, killed, shards, *evaluation), cwd=base, env=with_fault(f"saved@{SAVE_EVERY}"))
    outputs = {"crashed": crashed}
    outputs["resumed"] = run(train_cmd(2, killed, shards, *evaluation), cwd=base)  # the very same command again
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


def test_in_loop_eval_logs_every_scale_resumes_exactly_and_equals_mtrain_eval(two_rank_runs):
    base, _, straight, killed, _ = two_rank_runs
    straight_evals, killed_evals = eval_lines(straight), eval_lines(killed)
    # Steps 2, 4 and 6 by eval.every, and step 3 too: it saves a checkpoint, and each checkpoint holds its curve.
    assert sorted(straight_evals) == sorted({*range(EVAL_EVERY, STEPS + 1, EVAL_EVERY), SAVE_EVERY})
    for metric in ("loss", "token_accuracy", "answer_accuracy", "tokens", "answers", "generated_accuracy"):
        assert all(f"eval/{metric}/scale_{s}" in straight_evals[STEPS] for s in EVAL_SCALES), metric
    assert all(straight_evals[STEPS][f"eval/answers/scale_{s}"] == 17 for s in EVAL_SCALES)  # every sample once
    assert all(straight_evals[STEPS][f"eval/generated_answers/scale_{s}"] == GENERATED for s in EVAL_SCALES)
    # The run that was killed after its step-3 save and resumed: the same eval lines, bit for bit, none twice.
    assert killed_evals == straight_evals
    assert (
        straight_evals[STEPS][f"eval/loss/scale_{EVAL_SCALES[-1]}"]
        < straight_evals[EVAL_EVERY][f"eval/loss/scale_{EVAL_SCALES[-1]}"]
    )  # the held-out loss falls as the model trains

    # Each checkpoint's budget curve: every metric per budget of its step's eval line, in the manifest (the
    # killed run resumed from its step-3 folder, curve and all), and the same bytes after the resume.
    from mtrain.checkpoint.manifest import manifest_problems
    from mtrain.eval.curves import CURVE_JSON, CURVE_PNG, budget_curve, read_curve

    for step in (SAVE_EVERY, STEPS):
        folders = [run_dir / "checkpoints" / f"step_{step:08d}" for run_dir in (straight, killed)]
        for folder in folders:
            assert read_curve(folder) == budget_curve(step, straight_evals[step]), folder
            assert {CURVE_JSON, CURVE_PNG} <= set(json.loads((folder / "manifest.json").read_text())["files"])
            assert manifest_problems(folder, checksums=True) == []
        assert [p["scale"] for p in read_curve(folders[0]).points] == EVAL_SCALES
        assert (folders[0] / CURVE_JSON).read_bytes() == (folders[1] / CURVE_JSON).read_bytes()

    # `mtrain eval` on the final checkpoint and the same shards, on 2 ranks of torchrun (each loads the weights and
    # scores its share; fp32): the same figures. The M3 scales are budgets this full-grid model never trained at.
    out = base / "mtrain-eval"
    heldout = str(base / "heldout" / "shard-000000.tar")
    scales = ",".join(map(str, EVAL_SCALES))
    cmd = [*torchrun("-m", "mtrain"), "eval", str(straight / "checkpoints"), "--shards", heldout,
           "--scales", scales, "--untrained-budgets", "--out", str(out)]  # fmt: skip
    proc = run(cmd, cwd=base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval:" in proc.stderr and proc.stdout.count("wrote ") == 1  # rank 0's progress bar and report
    # The weights partitioned over the 2 ranks as in training (ZeRO-3, threshold 0), in the run's precision.
    held = re.search(r"2 rank\(s\), cpu/fp32, ZeRO-3, rank 0 holds ([\d,]+) of ([\d,]+) parameter", proc.stderr)
    assert held, proc.stderr[-2000:]
    local, total = (int(value.replace(",", "")) for value in held.groups())
    assert abs(local / total - 0.5) < 0.01, (local, total)
    offline = {r["scale"]: r for r in json.loads((out / "budget.json").read_text())["results"]}
    in_loop = straight_evals[STEPS]
    for scale in EVAL_SCALES:
        row = offline[scale]
        assert row["tokens"] == in_loop[f"eval/tokens/scale_{scale}"]  # counts exact
        assert row["answers"] == in_loop[f"eval/answers/scale_{scale}"]
        assert row["trained"] == (scale == 64)
        assert row["loss"] == pytest.approx(in_loop[f"eval/loss/scale_{scale}"], rel=1e-5)  # fp32 tolerance
        one_token = 1 / row["tokens"]  # an fp32 tie may flip one argmax
        assert abs(row["token_accuracy"] - in_loop[f"eval/token_accuracy/scale_{scale}"]) <= one_token
        # The checkpoint's eval.generate_samples: `mtrain eval` answers the same samples, with the same result.
        assert row["generated_answers"] == in_loop[f"eval/generated_answers/scale_{scale}"] == GENERATED
        assert row["generated_accuracy"] == in_loop[f"eval/generated_accuracy/scale_{scale}"]


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
