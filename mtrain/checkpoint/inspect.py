"""`mtrain inspect CKPT`: what a checkpoint (or a checkpoints folder) holds, without loading any pickle."""

from __future__ import annotations

import json
from pathlib import Path

from mtrain.checkpoint.manifest import manifest_problems, read_manifest
from mtrain.checkpoint.resume import scan_checkpoints
from mtrain.checkpoint.save import LATEST_FILE, TAG_PATTERN, rank_data_file


def describe_structure(folder: Path) -> list[str]:
    """The Matryoshka scales, adapter strategy and adapters the checkpoint was trained with."""
    from mtrain.config import load_config  # noqa: PLC0415

    cfg = load_config(folder / "config.yaml")
    tokens = cfg.matryoshka.tokens
    lines = []
    if tokens.mode != "none":
        lines.append(f"  visual scales ({tokens.mode}, policy {tokens.policy}): {tokens.scales}")
    if cfg.model.lora.enabled:
        adapters = (
            sorted(p.name for p in (folder / "adapter").iterdir() if p.is_dir())
            if (folder / "adapter").is_dir()
            else []
        )
        lines.append(
            f"  LoRA rank {cfg.model.lora.rank}, strategy {cfg.model.lora.strategy}: adapters {adapters or ['default']}"
        )
    return lines


def config_diff(folder: Path, config: str, overrides: list[str]) -> list[str]:
    """What differs between the checkpoint's config and `config` (+ overrides), and whether it could resume."""
    import yaml  # noqa: PLC0415

    from mtrain.checkpoint.resume import config_changes  # noqa: PLC0415
    from mtrain.config import load_config  # noqa: PLC0415
    from mtrain.config.core import to_dict  # noqa: PLC0415

    saved = yaml.safe_load((folder / "config.yaml").read_text())
    incompatible, benign = config_changes(saved, to_dict(load_config(config, overrides)))
    if not incompatible and not benign:
        return [f"  config: identical to {config}"]
    lines = [f"  config vs {config}:"]
    lines += [f"    {change}  (blocks a resume)" for change in incompatible]
    lines += [f"    {change}" for change in benign]
    return lines


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
    if (folder / "adapter").is_dir():
        lines.append("  adapter/: a stock PEFT adapter folder")
    return lines + describe_structure(folder)


def inspect_path(
    path: str | Path, checksums: bool = False, config: str | None = None, overrides: list[str] | None = None
) -> str:
    """A human summary of a checkpoint folder, or of every checkpoint under a checkpoints root;
    with `config`, also what differs from it."""
    path = Path(path)
    if TAG_PATTERN.match(path.name):
        lines = describe_checkpoint(path, checksums)
        if config:
            lines += config_diff(path, config, overrides or [])
        return "\n".join(lines)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a checkpoints folder")
    if (path / "checkpoints").is_dir() and not (path / LATEST_FILE).exists():
        path = path / "checkpoints"  # a run folder: its checkpoints live in checkpoints/
    complete, partial = scan_checkpoints(path)
    latest = (path / LATEST_FILE).read_text().strip() if (path / LATEST_FILE).is_file() else None
    lines = [f"{path}: {len(complete)} complete checkpoint(s), latest -> {latest}"]
    if not complete and not partial:
        lines.append("  (no step_XXXXXXXX folders here: give a run folder, its checkpoints/ or one checkpoint)")
    for checkpoint in complete:
        lines += describe_checkpoint(checkpoint.folder, checksums)
        if config:
            lines += config_diff(checkpoint.folder, config, overrides or [])
    lines += [f"{folder}: PARTIAL ({reason}); the next run removes it" for folder, reason in partial]
    return "\n".join(lines)
