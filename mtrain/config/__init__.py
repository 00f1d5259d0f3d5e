"""Typed configuration: strict YAML loading, dotted overrides, DeepSpeed JSON generation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from mtrain.config.core import (
    ConfigError,
    apply_override,
    build,
    check_distinct_overrides,
    field_docs,
    load_raw,
    to_dict,
)
from mtrain.config.schema import TrainConfig

__all__ = ["ConfigError", "TrainConfig", "load_config", "config_hash", "dump_yaml", "field_docs"]


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a YAML config strictly, apply `a.b=c` overrides, and validate every value."""
    check_distinct_overrides(overrides)
    raw = load_raw(path) if path is not None else {}
    for override in overrides:
        apply_override(raw, override, TrainConfig)
    return build(TrainConfig, raw)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: TrainConfig) -> str:
    """Short stable hash of the resolved config, used to check ranks and resumes agree."""
    canonical = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]
