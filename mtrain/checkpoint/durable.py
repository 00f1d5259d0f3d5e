"""Checkpoint files made durable while they are written: hashed as written, pushed to disk as written, fsynced in parallel.

A save used to write every file, then fsync and hash them one by one, reading each back; later a
thread hashed each file (SHA-256) from the page cache a step behind the writer. SHA-256 ran at
about 1.1 GB/s, slower than the disk, and the kernel kept the dirty pages until the fsync, so the
disk idled through the serialisation and then worked alone (0.52x then 0.59x of the fsync write
bandwidth). Now every file a rank writes, DeepSpeed's included, goes through a `HashingFile`:

- each write is hashed on the spot, from the writer's own buffer (no copy, no read back), with
  the manifest's checksum, XXH3-128 (about 7 GB/s on one core: 14 ms per 100 MB);
- every `STEP_BYTES` the writer starts the disk's writeback of what it wrote (`sync_file_range`,
  Linux; it does not wait for the write to finish, only for room in the disk's queue), so the disk
  writes while torch.save still serialises and the closing fsync has only the tail left. Without
  it the kernel held the dirty pages until the fsync: serialisation, then the disk, one after the
  other;
- closing the file queues its fsync on a thread of its own and returns at once: the files of a
  rank are fsynced in parallel (fsync releases the GIL), and the writer never waits for the disk.

The torch.save files skip torch's CRC32 of every record (the manifest's checksum covers them, and
the CRC cost as much CPU as the rest of torch.save); torch.load reads them as usual.

The checksum covers the bytes the file holds, as a later reader sees them. Files written by code
that mtrain cannot route through a `HashingFile` (DeepSpeed's copy of its recovery script, the
adapter folder) are fsynced and hashed the old way, in parallel threads; they are small.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.serialization import get_crc32_options, set_crc32_options

from mtrain.checkpoint.manifest import CHECKSUM, describe_files, new_digest

STEP_BYTES = 4 << 20  # writeback starts every step of this size: early for the disk, few syscalls for the writer
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
_PARALLEL_FSYNCS = 8  # threads for the files that were not written through a HashingFile


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """glibc's sync_file_range (Python's os module has none); None where the C library lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `length` bytes at `offset` to disk; durability still comes from fsync."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start


@dataclass(frozen=True)
class FileRecord:
    """What a HashingFile knew about its file once it was durable."""

    bytes: int  # the file's size
    checksum: str  # hex digest of its content, with the manifest's algorithm (CHECKSUM)
    mtime_ns: int  # modification time after the last write: a later rewrite by other code shows here

    def entry(self) -> dict[str, Any]:
        """The manifest's entry for the file."""
        return {"bytes": self.bytes, CHECKSUM: self.checksum}


class HashingFile:
    """A write-only binary file whose bytes are hashed as they are written and pushed to disk in steps.

    `write` and `flush` are all a writer needs (torch.save takes it as a buffer). `close` returns a
    future of the file's `FileRecord`, set once the file is fsynced.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "wb")  # noqa: SIM115 -- closed by the fsync's thread once durable
        self._fd = self._handle.fileno()
        self._digest = new_digest()
        self._written = 0  # bytes the writer has given
        self._pushed = 0  # bytes whose writeback has been started

    def write(self, data: Any) -> int:
        # torch.save hands over each tensor in one write: cut it into steps, or a 1 GB tensor's
        # writeback would only start once all of it sat in the page cache.
        view = memoryview(data).cast("B")
        for start in range(0, len(view), STEP_BYTES):
            step = view[start : start + STEP_BYTES]
            self._handle.write(step)
            self._digest.update(step)  # the caller's buffer, while it is still valid: no copy
            self._written += len(step)
            if self._written - self._pushed >= STEP_BYTES:
                self._handle.flush()  # the buffered tail must reach the kernel before its writeback can start
                start_writeback(self._fd, self._pushed, self._written - self._pushed)
                self._pushed = self._written
        return len(view)

    def flush(self) -> None:
        self._handle.flush()

    def _finish(self) -> FileRecord:
        try:
            os.fsync(self._fd)
            return FileRecord(self._written, self._digest.hexdigest(), os.fstat(self._fd).st_mtime_ns)
        finally:
            self._handle.close()

    def close(self) -> Future[FileRecord]:
        """Queue the file's fsync on a thread of its own; returns at once."""
        try:
            self._handle.flush()
        except BaseException:
            self.abandon()
            raise
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtrain-checkpoint")
        record = thread.submit(self._finish)
        thread.shutdown(wait=False)  # the thread ends once the fsync is done
        return record

    def abandon(self) -> None:
        """After a failed write: close the file, leaving it unrecorded."""
        with contextlib.suppress(OSError):
            self._handle.close()


class DurableFiles:
    """The files one rank writes into a save's staging folder, and their manifest entries."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._records: dict[Path, Future[FileRecord]] = {}

    def write(self, path: Path, fill: Callable[[HashingFile], None]) -> None:
        """Create `path` and let `fill` write it (hashed as written); its fsync then runs in the background."""
        output = HashingFile(Path(path))
        try:
            fill(output)
        except BaseException:
            output.abandon()
            raise
        self._records[Path(path)] = output.close()

    def torch_save(self, obj: Any, path: Path, zipfile: bool = True) -> None:
        """torch.save into `path`, without torch's CRC32 of every record: the manifest's checksum
        covers the whole file, and the CRC cost as much CPU as the rest of the serialisation.
        torch.load reads such files as usual (zip tools report the records' CRCs as wrong)."""
        crc32 = get_crc32_options()
        set_crc32_options(False)  # process-wide, read when torch.save opens its writer
        try:
            self.write(path, lambda output: torch.save(obj, output, _use_new_zipfile_serialization=zipfile))
        finally:
            set_crc32_options(crc32)

    def write_text(self, path: Path, text: str) -> None:
        self.write(path, lambda output: output.write(text.encode()))

    @contextlib.contextmanager
    def recording(self, engine: Any) -> Iterator[None]:
        """Within the block, DeepSpeed's engine writes its files through this recorder.

        Only DeepSpeed's plain torch.save engine is replaced; another checkpoint engine (fast,
        decoupled, Nebula) keeps its own writes, and its files are hashed after the save instead.
        """
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine  # noqa: PLC0415

        original = getattr(engine, "checkpoint_engine", None)
        if type(original) is not TorchCheckpointEngine:
            yield
            return
        engine.checkpoint_engine = RecordingCheckpointEngine(original, self)
        try:
            yield
        finally:
            engine.checkpoint_engine = original

    def entries(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """Manifest entries for `names` (relative to the folder), once every one of them is durable.

        A recorded file is taken as recorded, unless other code rewrote it since (its size or
        modification time changed); every other file is fsynced and hashed here, in parallel.
        """
        recorded: dict[str, dict[str, Any]] = {}
        to_hash = []
        for name in names:
            future = self._records.get(self.folder / name)
            record = future.result() if future is not None else None
            stat = (self.folder / name).stat()
            if record is not None and (stat.st_size, stat.st_mtime_ns) == (record.bytes, record.mtime_ns):
                recorded[name] = record.entry()
            else:
                to_hash.append(name)
        with ThreadPoolExecutor(max_workers=_PARALLEL_FSYNCS, thread_name_prefix="mtrain-checkpoint") as pool:
            for hashed in pool.map(lambda name: describe_files(self.folder, [name]), to_hash):
                recorded.update(hashed)
        return {name: recorded[name] for name in names}


class RecordingCheckpointEngine:
    """DeepSpeed's TorchCheckpointEngine, saving through a `DurableFiles`; everything else is the original's."""

    def __init__(self, original: Any, files: DurableFiles) -> None:
        self._original = original
        self._files = files

    def save(self, state_dict: Any, path: str) -> None:
        self._files.torch_save(state_dict, Path(path), zipfile=self._original.zipfile_serialization)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)
