"""Durable files and the manifest that marks a checkpoint folder complete.

A checkpoint folder counts as complete only when its `manifest.json` exists and every file it
lists has the recorded size (and, when asked, the recorded checksum). The manifest is written
last, after every rank has fsynced its files, so a crash at any earlier point leaves a folder
without one.

Each file's entry names its checksum's algorithm as the key of its digest: `{"bytes": N,
"xxh3_128": HEX}`. New saves record XXH3-128 (about 7 GB/s on one core, where SHA-256 runs at
1.1 GB/s and would pace the save); it guards against torn and rotten files, not against tampering.
Manifests written before hold `sha256` and still verify.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

MANIFEST_FILE = "manifest.json"
CHECKSUM = "xxh3_128"  # the algorithm new manifests record for every file
CHECKSUMS: dict[str, tuple[str, Callable[[], Any]]] = {  # algorithm -> (name in messages, new digest)
    "xxh3_128": ("XXH3-128", xxhash.xxh3_128),
    "sha256": ("SHA-256", hashlib.sha256),  # manifests written before XXH3-128
}
_CHUNK = 8 << 20


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX needs the directory fsynced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_digest(algorithm: str = CHECKSUM) -> Any:
    """A fresh hash object of `algorithm` (`update(bytes)`, `hexdigest()`)."""
    return CHECKSUMS[algorithm][1]()


def file_checksum(path: Path, algorithm: str = CHECKSUM) -> str:
    """The hex digest of a file's content, read from disk."""
    digest = new_digest(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_checksum(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(algorithm, hex digest) a manifest entry records; None when it holds none mtrain knows."""
    return next(((algorithm, entry[algorithm]) for algorithm in CHECKSUMS if algorithm in entry), None)


def write_text_durably(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic replace, both fsynced."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)


def relative_files(folder: Path) -> list[str]:
    """Every file below `folder` as a sorted list of relative paths, the manifest excluded."""
    return sorted(
        str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST_FILE
    )


def describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """fsync each file, then record its size and checksum, read back from disk (for files that were not
    written through `durable.HashingFile`)."""
    entries = {}
    for name in names:
        path = folder / name
        fsync_file(path)
        entries[name] = {"bytes": path.stat().st_size, CHECKSUM: file_checksum(path)}
    return entries


def write_manifest(folder: Path, files: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    """Make the files' directory entries durable, then write the manifest durably (the folder's own
    entries, the manifest's among them, become durable with the manifest's directory fsync)."""
    # Every folder between a file and `folder`: a nested folder's entry lives in its parent.
    directories = {parent for name in files for parent in (folder / name).parents if folder in parent.parents}
    for directory in directories:
        fsync_dir(directory)
    manifest = {"meta": meta, "files": files}
    write_text_durably(folder / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_FILE).read_text())


def manifest_problems(folder: Path, checksums: bool = False) -> list[str]:
    """Why `folder` is not a complete checkpoint; empty when it is."""
    if not (folder / MANIFEST_FILE).is_file():
        return [f"no {MANIFEST_FILE} (the save did not finish)"]
    try:
        files = read_manifest(folder)["files"]
    except (ValueError, KeyError) as exc:
        return [f"unreadable {MANIFEST_FILE}: {exc}"]
    problems = []
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif checksums:
            problems.extend(checksum_problems(name, path, entry))
    return problems


def checksum_problems(name: str, path: Path, entry: dict[str, Any]) -> list[str]:
    """Why the file at `path` does not match its manifest entry's checksum; empty when it does."""
    recorded = recorded_checksum(entry)
    if recorded is None:
        return [f"{name} has no checksum this mtrain knows (expected one of {', '.join(CHECKSUMS)})"]
    algorithm, digest = recorded
    if file_checksum(path, algorithm) != digest:
        return [f"{name} does not match its {CHECKSUMS[algorithm][0]}"]
    return []
