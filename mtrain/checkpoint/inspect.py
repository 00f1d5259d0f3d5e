"""`mtrain inspect CKPT`: what a checkpoint (or a checkpoints folder) holds, without loading any pickle."""

from __future__ import annotations

import json
from pathlib import Path

from mtrain.checkpoint.manifest import manifest_problems, read_manifest
from mtrain.checkpoint.resume import scan_checkpoints
from mtrain.checkpoint.save import LATEST_FILE, TAG_PATTERN, rank_data_file


def describe_checkpoint(folder: Path, checksums: bool) -> list[str]:
    problems = manifest_problems(folder, checksums=checksums)
    if problems:
        return [f"{folder}: INCOMPLETE: {'; '.join(problems)}"]
    manifest = read_manifest(folder)
    meta, files = manifest["meta"], manifest["files"]
    trainer = meta.get("trainer", {})
    lines = [
        f"{folder}: complete{' (checksums verified)' if checksums else ''}",
        f"  step {meta['step']}, tokens seen {trainer.get('tokens_seen')}, samples seen {trainer.get('samples_seen')}",
        f"  saved by {meta['world_size']} rank(s), ZeRO-{meta.get('zero_stage')}, mtrain {meta.get('mtrain_version')}, "
        f"config hash {meta.get('config_hash')}",
        f"  {len(files)} files, {sum(f['bytes'] for f in files.values()) / 2**20:.1f} MiB",
    ]
    for rank in range(meta["world_size"]):
        data = folder / rank_data_file(rank)
        if data.is_file():
            lines.append(f"  rank {rank} data position: {json.loads(data.read_text())}")
    if (folder / "adapter" / "adapter_model.safetensors").is_file():
        lines.append("  adapter/: a stock PEFT adapter folder")
    return lines


def inspect_path(path: str | Path, checksums: bool = False) -> str:
    """A human summary of a checkpoint folder, or of every checkpoint under a checkpoints root."""
    path = Path(path)
    if TAG_PATTERN.match(path.name):
        return "\n".join(describe_checkpoint(path, checksums))
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a checkpoints folder")
    complete, partial = scan_checkpoints(path)
    latest = (path / LATEST_FILE).read_text().strip() if (path / LATEST_FILE).is_file() else None
    lines = [f"{path}: {len(complete)} complete checkpoint(s), latest -> {latest}"]
    for checkpoint in complete:
        lines += describe_checkpoint(checkpoint.folder, checksums)
    lines += [f"{folder}: PARTIAL ({reason}); the next run removes it" for folder, reason in partial]
    return "\n".join(lines)
