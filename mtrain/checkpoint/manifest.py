"""Durable files and the manifest that marks a checkpoint folder complete.

A checkpoint folder counts as complete only when its `manifest.json` exists and every file it
lists has the recorded size (and, when asked, the recorded SHA-256). The manifest is written
last, after every rank has fsynced its files, so a crash at any earlier point leaves a folder
without one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    """fsync each file, then record its size and SHA-256 (each rank does this for the files it wrote)."""
    entries = {}
    for name in names:
        path = folder / name
        fsync_file(path)
        entries[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
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
        elif checksums and sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} does not match its SHA-256")
    return problems
