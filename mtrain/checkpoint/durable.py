"""Checkpoint files made durable while they are written: hashed a step behind the writer, fsynced in parallel.

A save used to write every file, then fsync and SHA-256 them one by one, reading each back: the
hashing alone took as long as DeepSpeed's write (SHA-256 runs at about 600 MB/s here), and the
disk sat idle until the writer had finished. Now every file a rank writes, DeepSpeed's included,
goes through a `HashingFile`:

- the writer hands each step of `STEP_BYTES` to the file's own thread, which hashes the step from
  the page cache (a memory copy, not a disk read) while the writer goes on with the next one;
  `hashlib` releases the GIL, so the hash runs on another core;
- the thread then starts the disk's writeback of that step (`sync_file_range`, Linux), so the
  disk works while the writer still serialises, and the closing fsync has only the tail left;
- closing the file queues its fsync on the same thread and returns at once: the files of a rank
  are fsynced in parallel, and the writer never waits for the disk.

The torch.save files skip torch's CRC32 of every record (the SHA-256 covers them, and the CRC cost
as much CPU as the rest of torch.save); torch.load reads them as usual.

The hash covers the bytes the file holds, as a later reader sees them. Files written by code that
mtrain cannot route through a `HashingFile` (DeepSpeed's copy of its recovery script, the adapter
folder) are fsynced and hashed the old way, in parallel threads; they are small.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.serialization import get_crc32_options, set_crc32_options

from mtrain.checkpoint.manifest import describe_files

STEP_BYTES = 16 << 20  # the writer hands bytes to the hashing thread in steps of this size
_READ_BYTES = 4 << 20  # one page-cache read of the hashing thread
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
    sha256: str  # hex SHA-256 of its content
    mtime_ns: int  # modification time after the last write: a later rewrite by other code shows here

    def entry(self) -> dict[str, Any]:
        """The manifest's entry for the file."""
        return {"bytes": self.bytes, "sha256": self.sha256}


class HashingFile:
    """A write-only binary file whose bytes are hashed and pushed to disk a step behind the writer.

    `write` and `flush` are all a writer needs (torch.save takes it as a buffer). `close` returns a
    future of the file's `FileRecord`, set once the file is fsynced.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "w+b")  # noqa: SIM115 -- closed by the file's thread once durable
        self._fd = self._handle.fileno()
        self._digest = hashlib.sha256()
        self._written = 0  # bytes the writer has given
        self._handed = 0  # bytes handed to the thread (flushed to the kernel)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtrain-checkpoint")
        self._steps: list[Future[None]] = []  # the hashing of each step, in order on the file's thread

    def write(self, data: Any) -> int:
        count = self._handle.write(data)
        self._written += count
        if self._written - self._handed >= STEP_BYTES:
            self._hand_over()
        return count

    def flush(self) -> None:
        self._handle.flush()

    def _hand_over(self) -> None:
        """Flush what was written since the last step to the kernel and queue it for hashing."""
        self._handle.flush()
        start, self._handed = self._handed, self._written
        if self._handed > start:
            self._steps.append(self._thread.submit(self._digest_step, start, self._handed))

    def _digest_step(self, start: int, end: int) -> None:
        position = start
        while position < end:
            chunk = os.pread(self._fd, min(_READ_BYTES, end - position), position)
            if not chunk:
                raise OSError(f"{self.path} ended at {position} bytes while {end} were written")
            self._digest.update(chunk)
            position += len(chunk)
        start_writeback(self._fd, start, end - start)

    def _finish(self) -> FileRecord:
        try:
            for step in self._steps:  # all done (the thread runs in order): raise a failed read here
                step.result()
            os.fsync(self._fd)
            return FileRecord(self._written, self._digest.hexdigest(), os.fstat(self._fd).st_mtime_ns)
        finally:
            self._handle.close()

    def close(self) -> Future[FileRecord]:
        """Queue the last step and the fsync; returns at once."""
        try:
            self._hand_over()
        except BaseException:
            self.abandon()
            raise
        record = self._thread.submit(self._finish)
        self._thread.shutdown(wait=False)
        return record

    def abandon(self) -> None:
        """After a failed write: stop the thread and close the file, leaving it unrecorded."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError):
            self._handle.close()


class DurableFiles:
    """The files one rank writes into a save's staging folder, and their manifest entries."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._records: dict[Path, Future[FileRecord]] = {}

    def write(self, path: Path, fill: Callable[[HashingFile], None]) -> None:
        """Create `path` and let `fill` write it; its hash and fsync then run in the background."""
        output = HashingFile(Path(path))
        try:
            fill(output)
        except BaseException:
            output.abandon()
            raise
        self._records[Path(path)] = output.close()

    def torch_save(self, obj: Any, path: Path, zipfile: bool = True) -> None:
        """torch.save into `path`, without torch's CRC32 of every record: the manifest's SHA-256
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
