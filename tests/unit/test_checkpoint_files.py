"""Checkpoint bookkeeping without training: manifests, partial folders, retention, RNG, mismatch."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mtrain.checkpoint.layout import scan_checkpoints
from mtrain.checkpoint.manifest import describe_files, manifest_problems, relative_files, write_manifest
from mtrain.checkpoint.resume import check_config_matches, config_changes, find_resume_checkpoint
from mtrain.checkpoint.save import Retention, checkpoints_to_delete, file_owner, rng_state, set_rng_state
from mtrain.config import dump_yaml, load_config
from mtrain.config.core import to_dict


def fake_checkpoint(root, step: int, complete: bool = True):
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    (folder / "config.yaml").write_text(dump_yaml(load_config(None)))
    if complete:
        files = describe_files(folder, relative_files(folder))
        write_manifest(folder, files, {"world_size": 1, "trainer": {"step": step}})
    return folder


def test_only_complete_checkpoints_count_and_partials_are_named(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)  # killed before its manifest
    (tmp_path / ".staging-step_00000008").mkdir()  # killed inside DeepSpeed's save
    truncated = fake_checkpoint(tmp_path, 10)
    (truncated / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")  # lost bytes
    corrupt = fake_checkpoint(tmp_path, 12)
    (corrupt / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"y" * 12)  # same size, other bytes

    complete, partial = scan_checkpoints(tmp_path)
    assert [c.step for c in complete] == [2, 4, 12]
    reasons = {folder.name: reason for folder, reason in partial}
    assert set(reasons) == {"step_00000006", ".staging-step_00000008", "step_00000010"}
    assert "no manifest.json" in reasons["step_00000006"]
    assert "has 1 bytes, the manifest says 10" in reasons["step_00000010"]
    assert manifest_problems(corrupt, checksums=True) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt does not match its XXH3-128"
    ]

    assert find_resume_checkpoint("auto", tmp_path, remove_partials=True).step == 12
    assert not (tmp_path / "step_00000006").exists() and not (tmp_path / ".staging-step_00000008").exists()
    assert find_resume_checkpoint("never", tmp_path, remove_partials=False) is None
    assert find_resume_checkpoint(str(tmp_path / "step_00000004"), tmp_path, remove_partials=False).step == 4
    assert find_resume_checkpoint("auto", tmp_path / "empty", remove_partials=False) is None
    with pytest.raises(ValueError, match="not a complete mtrain checkpoint: no manifest.json"):
        fake_checkpoint(tmp_path, 14, complete=False)
        find_resume_checkpoint(str(tmp_path / "step_00000014"), tmp_path, remove_partials=False)


def test_retention_keeps_last_every_and_latest():
    steps = [10, 20, 30, 40, 50, 60]
    assert checkpoints_to_delete(steps, 60, Retention(keep_last=2, keep_every=0)) == [10, 20, 30, 40]
    assert checkpoints_to_delete(steps, 60, Retention(keep_last=2, keep_every=20)) == [10, 30]
    assert checkpoints_to_delete(steps, 30, Retention(keep_last=1, keep_every=0)) == [10, 20, 40, 50]
    assert checkpoints_to_delete(steps, 60, Retention(keep_last=0, keep_every=0)) == []


def test_file_owner_follows_deepspeed_and_mtrain_names():
    assert file_owner("zero_pp_rank_3_mp_rank_00_model_states.pt") == 3
    assert file_owner("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert file_owner("rank00007_state.pt") == 7
    assert file_owner("config.yaml") == 0 and file_owner("mp_rank_00_model_states.pt") == 0


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_config_mismatch_names_what_changed(tmp_path):
    saved = load_config(None)
    folder = fake_checkpoint(tmp_path, 2)
    (folder / "config.yaml").write_text(dump_yaml(saved))

    benign = check_config_matches(
        find_resume_checkpoint("auto", tmp_path, False),
        to_dict(load_config(None, ["run.max_steps=99", "checkpoint.resume=never"])),
    )
    assert benign == ["run.max_steps: 40 -> 99"]  # a warning; the resume setting itself is not a change

    changed = load_config(None, ["model.tiny.hidden_size=128", "model.lora.rank=4", "run.seed=7", "optim.lr=0.01"])
    errors, warnings = config_changes(to_dict(saved), to_dict(changed))
    assert errors == ["model.lora.rank: 8 -> 4", "model.tiny.hidden_size: 64 -> 128", "run.seed: 1234 -> 7"]
    assert warnings == ["optim.lr: 0.001 -> 0.01"]
    with pytest.raises(ValueError, match=r"model.tiny.hidden_size: 64 -> 128.*run.seed: 1234 -> 7.*resume=never"):
        check_config_matches(find_resume_checkpoint("auto", tmp_path, False), to_dict(changed))


def test_manifest_lists_sizes_and_checksums(tmp_path):
    folder = fake_checkpoint(tmp_path, 3)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["files"]["zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert entry["bytes"] == 3 and len(entry["xxh3_128"]) == 32
    assert "config.yaml" in manifest["files"] and manifest["meta"]["trainer"] == {"step": 3}
