"""Checkpoint files hashed while written and fsynced in the background (mtrain/checkpoint/durable.py)."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from torch.serialization import get_crc32_options

from mtrain.checkpoint import durable
from mtrain.checkpoint.disk import SaveFailures
from mtrain.checkpoint.durable import DurableFiles, RecordingCheckpointEngine
from mtrain.checkpoint.inspect import describe_checkpoint
from mtrain.checkpoint.manifest import CHECKSUM, file_checksum, manifest_problems, relative_files, write_manifest

OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture
def small_steps(monkeypatch):
    """Steps of 64 KiB, so a 1 MiB tensor crosses many of them (each starts its writeback)."""
    monkeypatch.setattr(durable, "STEP_BYTES", 64 << 10)


def checkpoint_threads_end() -> bool:
    """Whether every hashing thread has ended (each ends right after its file's record is set)."""
    threads = [t for t in threading.enumerate() if t.name.startswith("mtrain-checkpoint")]
    for thread in threads:
        thread.join(timeout=10)
    return not any(thread.is_alive() for thread in threads)


def state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"fp32": torch.randn(256, 1024, generator=generator), "step": torch.tensor(3)}


def test_deepspeeds_writes_are_hashed_while_written_and_load_back(tmp_path, small_steps):
    files = DurableFiles(tmp_path)
    deepspeed_engine = TorchCheckpointEngine()  # DeepSpeed's own engine; its zip serialisation is kept
    RecordingCheckpointEngine(deepspeed_engine, files).save(state(), str(tmp_path / OPTIM_FILE))
    files.write_text(tmp_path / "rank00000_data.json", '{"batches_taken": 2}')

    entries = files.entries([OPTIM_FILE, "rank00000_data.json"])
    for name, entry in entries.items():
        path = tmp_path / name
        assert entry == {"bytes": path.stat().st_size, CHECKSUM: file_checksum(path)}, name
    assert entries[OPTIM_FILE]["bytes"] > 16 * durable.STEP_BYTES
    assert get_crc32_options()  # torch's CRC32 is off only within mtrain's own saves
    loaded = deepspeed_engine.load(str(tmp_path / OPTIM_FILE))
    assert all(torch.equal(loaded[key], value) for key, value in state().items())
    assert checkpoint_threads_end()


def test_files_written_by_other_code_or_rewritten_are_hashed_from_disk(tmp_path, small_steps):
    files = DurableFiles(tmp_path)
    files.torch_save(state(), tmp_path / "rank00000_state.pt")
    files.write_text(tmp_path / "config.yaml", "run: {}\n")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"\1" * 5000)  # not through DurableFiles
    entries = files.entries(["config.yaml"])  # waits for that file's record
    (tmp_path / "config.yaml").write_text("run: {seed: 7}\n")  # rewritten after it was recorded

    names = relative_files(tmp_path)
    entries = files.entries(names)
    assert sorted(entries) == ["adapter/adapter_model.safetensors", "config.yaml", "rank00000_state.pt"]
    for name, entry in entries.items():
        assert entry == {"bytes": (tmp_path / name).stat().st_size, CHECKSUM: file_checksum(tmp_path / name)}, name


def test_a_corrupted_file_is_still_detected_on_resume_and_inspect(tmp_path, small_steps):
    folder = tmp_path / "step_00000002"
    folder.mkdir()
    files = DurableFiles(folder)
    files.torch_save(state(), folder / OPTIM_FILE)
    write_manifest(folder, files.entries([OPTIM_FILE]), {"world_size": 1, "trainer": {"step": 2}})
    assert manifest_problems(folder, checksums=True) == []

    with open(folder / OPTIM_FILE, "r+b") as handle:  # one flipped byte, same size (bit rot)
        handle.seek(300_000)
        byte = handle.read(1)
        handle.seek(300_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert manifest_problems(folder, checksums=False) == []  # sizes alone cannot see it
    assert manifest_problems(folder, checksums=True) == [f"{OPTIM_FILE} does not match its XXH3-128"]
    assert describe_checkpoint(folder, checksums=True) == [
        f"{folder}: INCOMPLETE: {OPTIM_FILE} does not match its XXH3-128"
    ]


def test_a_failed_write_leaves_no_record_and_no_thread(tmp_path, small_steps):
    files = DurableFiles(tmp_path)

    def half_then_fail(output) -> None:
        output.write(b"\0" * (300 << 10))  # several steps handed to the hashing thread
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.write(tmp_path / OPTIM_FILE, half_then_fail)
    assert checkpoint_threads_end()
    # Not recorded: were the save to go on, the partial file would be hashed as it is.
    assert files.entries([OPTIM_FILE])[OPTIM_FILE]["bytes"] == 300 << 10


def test_one_agreement_carries_every_ranks_payload(tmp_path):
    failures = SaveFailures(tmp_path, tmp_path / ".staging-step_00000001", rank=0, world_size=1)
    assert failures.agree({"a.pt": {"bytes": 1}}) == [{"a.pt": {"bytes": 1}}]


def test_a_manifest_of_sha256_checksums_still_verifies(tmp_path):
    """Checkpoints saved before XXH3-128 record SHA-256: they still resume with verify_checksums."""
    folder = tmp_path / "step_00000002"
    folder.mkdir()
    torch.save(state(), folder / OPTIM_FILE)
    (folder / "config.yaml").write_text("run: {}\n")
    old_entries = {
        name: {
            "bytes": (folder / name).stat().st_size,
            "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
        }
        for name in (OPTIM_FILE, "config.yaml")
    }
    write_manifest(folder, old_entries, {"world_size": 1, "trainer": {"step": 2}})
    assert manifest_problems(folder, checksums=True) == []

    (folder / "config.yaml").write_text("run: {}\n".upper())  # same size, other bytes
    assert manifest_problems(folder, checksums=True) == ["config.yaml does not match its SHA-256"]
    write_manifest(folder, {"config.yaml": {"bytes": 8, "md5": "0" * 32}}, {"world_size": 1})
    assert manifest_problems(folder, checksums=True) == [
        "config.yaml has no checksum this mtrain knows (expected one of xxh3_128, sha256)"
    ]


def test_written_files_are_pushed_to_disk_in_steps_and_never_read_back(tmp_path, small_steps, monkeypatch):
    pushed: list[tuple[int, int]] = []
    start_writeback = durable.start_writeback
    monkeypatch.setattr(
        durable, "start_writeback", lambda fd, at, size: (pushed.append((at, size)), start_writeback(fd, at, size))
    )
    files = DurableFiles(tmp_path)
    files.torch_save(state(), tmp_path / OPTIM_FILE)
    monkeypatch.setattr(durable, "describe_files", lambda *args: pytest.fail("a recorded file was read back"))

    entry = files.entries([OPTIM_FILE])[OPTIM_FILE]
    assert entry == {"bytes": (tmp_path / OPTIM_FILE).stat().st_size, CHECKSUM: file_checksum(tmp_path / OPTIM_FILE)}
    # Consecutive steps of at least STEP_BYTES from the start: the disk writes while torch.save serialises.
    assert len(pushed) >= 16 and pushed[0][0] == 0
    assert all(at + size == following for (at, size), (following, _) in zip(pushed, pushed[1:], strict=False))
    assert all(size >= durable.STEP_BYTES for _, size in pushed)
