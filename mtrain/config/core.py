"""Strict, typed configuration: dataclasses built from YAML and `a.b.c=value` overrides.

Every unknown key, at every depth, is an error that names its full dotted path and suggests
the closest valid key. Values are type-checked on the way in and then checked by each
section's `check()` method, whose complaints are reported with their dotted path as well.

This module imports nothing else from mtrain (and not torch), so `mtrain validate` is fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem, always naming the dotted key and what would be right."""


def setting(default: Any, doc: str) -> Any:
    """Declare a config field with its default and a one-line description."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"doc": doc})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def section(cls: type, doc: str) -> Any:
    """Declare a nested config section."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc})


class Checkable:
    """Mixin: a section lists its value problems as (field, message) pairs."""

    def check(self) -> list[tuple[str, str]]:
        return []


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    return f"{hint}valid keys here: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported config type {tp!r}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a suggestion."""
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; {_suggest(str(key), list(fields), prefix)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    obj = cls(**kwargs)
    if isinstance(obj, Checkable):
        problems = obj.check()
        if problems:
            name, message = problems[0]
            raise ConfigError(f"{prefix}{name}: {message}")
    return obj


def to_dict(obj: Any) -> Any:
    """Plain, YAML-ready dict of a config."""
    return dataclasses.asdict(obj)


def field_docs(cls: type, path: str = "") -> dict[str, str]:
    """Dotted key -> one-line description, for every leaf field."""
    docs: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], key))
        else:
            docs[key] = f.metadata.get("doc", "")
    return docs


def override_key(override: str) -> str:
    """The dotted key of an `a.b.c=value` override."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected the form a.b.c=value")
    return override.split("=", 1)[0].strip()


def check_distinct_overrides(overrides: list[str] | tuple[str, ...]) -> None:
    """A key given twice is an error: the last one would silently win.

    The usual cause is an unquoted brace pattern, which the shell expands into one override per
    match (`data.shards=shard-{0..3}.tar` becomes four `data.shards=...` words).
    """
    seen: dict[str, str] = {}
    for override in overrides:
        key = override_key(override)
        if key in seen:
            raise ConfigError(
                f"{key}: given twice ({seen[key]!r} and {override!r}). Give each key once; if the shell expanded "
                f"an unquoted brace pattern into several overrides, quote it, e.g. '{key}=shard-{{000000..000003}}.tar'"
            )
        seen[key] = override


def apply_override(raw: dict, override: str, root_cls: type) -> None:
    """Apply one `a.b.c=value` override to the raw mapping, checking that the path exists."""
    override_key(override)
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    cls: Any = root_cls
    node = raw
    for depth, key in enumerate(keys):
        prefix = ".".join(keys[:depth])
        prefix = f"{prefix}." if prefix else ""
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            raise ConfigError(f"{dotted}: '{prefix.rstrip('.')}' is a value, not a section")
        names = [f.name for f in dataclasses.fields(cls)]
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; {_suggest(key, names, prefix)}")
        field_type = typing.get_type_hints(cls)[key]
        if depth == len(keys) - 1:
            node[key] = yaml.safe_load(text) if text.strip() else ""
        else:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
            cls = field_type


def load_raw(path: str | Path) -> dict:
    """Read a YAML file, following an optional top-level `base:` (a path relative to it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = load_raw(path.parent / base)
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict, overlay: dict) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value
