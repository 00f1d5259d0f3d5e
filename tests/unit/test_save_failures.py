"""Why a checkpoint write failed, and the one message every rank raises (mtrain/checkpoint/disk.py)."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from mtrain.checkpoint.disk import CheckpointSaveError, SaveFailures, SpaceCheck, check_free_space, write_failure_cause
from mtrain.launch.outcome import NoRetryError


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.ENOSPC, "no space left on the device"),
        (errno.EDQUOT, "the disk quota is exceeded"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "the file system is read-only"),
    ],
)
def test_disk_errnos_are_named_and_other_errors_are_not_ours(tmp_path, code, cause):
    assert write_failure_cause(OSError(code, "x"), tmp_path) == cause
    assert write_failure_cause(OSError(errno.ENOENT, "x"), tmp_path) is None
    assert write_failure_cause(ValueError("x"), tmp_path) is None
    # torch.save's errno-less error on a disk with room: not a disk problem; a lost peer never is.
    assert write_failure_cause(RuntimeError("basic_ios::clear: iostream error"), tmp_path / "new") is None
    assert write_failure_cause(RuntimeError("Connection closed by peer"), tmp_path) is None


def test_an_errno_less_write_error_on_a_read_only_or_full_disk_is_named(tmp_path):
    folders = {"ro": tmp_path / "ro", "full": tmp_path / "full"}
    for folder in folders.values():
        folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folders["ro"])],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folders["full"])], check=True)
        with pytest.raises(OSError, match="No space left"):
            (folders["full"] / "filler").write_bytes(b"\0" * 128 * 1024)
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2688 vs 2580")
        assert write_failure_cause(error, folders["ro"] / ".staging-step_00000002") == "the file system is read-only"
        assert write_failure_cause(error, folders["full"] / ".staging-step_00000002") == "no space left on the device"
    finally:
        for folder in folders.values():
            subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_recorded_failure_raises_at_the_next_agreement_with_folder_space_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    staging = root / ".staging-step_00000004"
    staging.mkdir(parents=True)
    (root / "latest").write_text("step_00000002")
    failures = SaveFailures(root, staging, rank=0, world_size=1)
    failures.space = SpaceCheck(needed=3 * 2**20, basis="the size of step_00000002", free=512 * 1024)
    failures.agree()  # nothing failed: passes
    with failures.writing():
        raise OSError(errno.ENOSPC, "No space left on device")
    with failures.writing():
        pass  # later writes still run; the first failure is the one reported
    assert staging.is_dir()
    with pytest.raises(CheckpointSaveError) as caught:
        failures.agree()
    assert isinstance(caught.value, NoRetryError)  # the CLI exits 2 on it
    assert str(caught.value) == (
        f"checkpoint save into {root} failed: no space left on the device (rank 0: OSError: [Errno 28] No space "
        "left on device). This save needs about 3.0 MiB (the size of step_00000002); 512.0 KiB were free when it "
        "began. `latest` still names step_00000002 (step 2), complete and untouched; the partial save was "
        "removed. To continue: free space there, lower checkpoint.keep_last, or put run.dir on a larger disk, "
        "then run the same command to resume."
    )
    assert not staging.exists() and (root / "latest").read_text() == "step_00000002"
    # Any other error is not swallowed.
    with pytest.raises(KeyError), failures.writing():
        raise KeyError("x")


def test_free_space_is_checked_against_the_newest_checkpoint_before_a_save(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    newest = root / "step_00000003"
    newest.mkdir(parents=True)
    huge = 2**43  # a sparse file: 8 TiB recorded, nothing written; more than this disk has free
    (newest / "a.pt").write_bytes(b"0123456789")
    with open(newest / "b.pt", "wb") as sparse:
        sparse.truncate(huge)
    files = {"a.pt": {"bytes": 10, "sha256": ""}, "b.pt": {"bytes": huge, "sha256": ""}}
    (newest / "manifest.json").write_text(json.dumps({"meta": {"world_size": 1}, "files": files}))
    check = check_free_space(root, engine=None)  # a checkpoint exists: the engine is not asked
    assert check.needed == 10 + huge and check.basis == "the size of step_00000003" and 0 < check.free < huge
    assert f"warning: checkpoint: {root} has " in capsys.readouterr().err


def test_a_failed_deepspeed_write_raises_alone_and_only_rank_0_removes_the_partial_save(tmp_path):
    root = tmp_path / "checkpoints"
    staging = root / ".staging-step_00000002"
    staging.mkdir(parents=True)
    failures = SaveFailures(root, staging, rank=1, world_size=2)  # no process group: joins no collective
    failures.raise_alone()  # nothing failed
    with failures.writing():
        raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(CheckpointSaveError, match="the file system is read-only .rank 1: OSError") as caught:
        failures.raise_alone()
    assert "no earlier checkpoint exists" in str(caught.value) and "is removed at the next start" in str(caught.value)
    assert "put run.dir on a writable file system" in str(caught.value) and staging.is_dir()
