"""Shard lists and tar access: brace patterns, header scans with member offsets, safe reads.

A shard is scanned once per process (headers only: the scan seeks past member data), which
gives every tar group of the shard in order with the offset and size of each member. The
loader then reads exactly the members it needs with a seek, so a cursor into a shard costs an
integer, and skipping ahead costs nothing.

Grouping follows webdataset: the key is the member path up to the first dot of its base name,
the extension is the rest. Faults found by the scan (truncated tar, unsafe member path,
duplicate key, empty shard) become placeholder groups that carry their reason, so they are
counted exactly once, by whichever consumer owns that position.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

INDEX_FILE = "index.json"
_KEY_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class TarGroup:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # extension -> (offset, size)
    fault: tuple[str, str] | None = None  # (reason, detail) for placeholder groups


@dataclass
class ShardScan:
    url: str
    groups: list[TarGroup]

    def __len__(self) -> int:
        return len(self.groups)


def expand_shards(pattern: str) -> list[str]:
    """Brace patterns and `::`-separated lists to a flat list of shard paths."""
    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part.strip()) if part.strip()]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    return urls


def unsafe_member_path(name: str) -> bool:
    return name.startswith("/") or os.path.isabs(name) or ".." in Path(name).parts


def scan_shard(url: str) -> ShardScan:
    """Every tar group of one local shard, with member offsets; faults become placeholder groups."""
    groups: list[TarGroup] = []
    seen: set[str] = set()
    current: TarGroup | None = None
    fault_index = 0

    def placeholder(reason: str, detail: str, key: str | None = None) -> None:
        nonlocal fault_index
        groups.append(TarGroup(key or f"<{reason}:{fault_index}>", fault=(reason, detail)))
        fault_index += 1

    def close_current() -> None:
        nonlocal current
        if current is not None and current.members:
            if current.key in seen:
                placeholder(
                    "duplicate_key",
                    f"key {current.key!r} appears again in {url}; the later copy is skipped",
                    current.key,
                )
            else:
                seen.add(current.key)
                groups.append(current)
        current = None

    try:
        size = os.path.getsize(url)
        tar = tarfile.open(url, mode="r:")
    except (OSError, tarfile.TarError) as exc:
        placeholder("unreadable_shard" if size_or_none(url) is None else "truncated_tar", f"{url}: {exc}")
        return ShardScan(url, groups)
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                close_current()
                placeholder("truncated_tar", f"{url}: {exc}")
                break
            if info is None:
                break
            if not info.isfile():
                continue
            if info.offset_data + info.size > size:
                close_current()
                placeholder("truncated_tar", f"{url}: member {info.name} ends past the end of the file", info.name)
                break
            if unsafe_member_path(info.name):
                placeholder(
                    "unsafe_path", f"{url}: member {info.name!r} has an absolute or '..' path; skipped", info.name
                )
                continue
            match = _KEY_EXTENSION.match(info.name)
            if match is None:
                continue  # no extension: not a sample member (webdataset skips these too)
            key, extension = match.group(1), match.group(2).lower()
            if current is None or current.key != key:
                close_current()
                current = TarGroup(key)
            if extension in current.members:
                placeholder(
                    "duplicate_key", f"{url}: member {info.name} appears twice in one group; skipped", info.name
                )
                continue
            current.members[extension] = (info.offset_data, info.size)
        close_current()
    if not groups:
        placeholder("empty_shard", f"{url} holds no samples")
    return ShardScan(url, groups)


def size_or_none(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def read_members(handle, group: TarGroup, extensions: Collection[str] | None = None) -> dict[str, bytes]:
    """The raw bytes of members of a group (all, or those named), read by seek from an open shard file."""
    members = {}
    for extension, (offset, size) in group.members.items():
        if extensions is None or extension in extensions:
            handle.seek(offset)
            members[extension] = handle.read(size)
    return members


class ShardReader:
    """Scans shards on first use and keeps a few file handles open; one per process."""

    def __init__(self, max_open: int = 16) -> None:
        self.scans: dict[str, ShardScan] = {}
        self.handles: dict[str, object] = {}
        self.max_open = max_open

    def scan(self, url: str) -> ShardScan:
        if url not in self.scans:
            self.scans[url] = scan_shard(url)
        return self.scans[url]

    def read(self, url: str, group: TarGroup, extensions: Collection[str] | None = None) -> dict[str, bytes]:
        handle = self.handles.pop(url, None) or open(url, "rb")  # noqa: SIM115 (kept open on purpose)
        self.handles[url] = handle  # most recently used last
        if len(self.handles) > self.max_open:
            oldest = next(iter(self.handles))
            self.handles.pop(oldest).close()
        return read_members(handle, group, extensions)


def read_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
