"""Loading a configuration: YAML files that extend others (``base:``), dotted ``section.key=value`` overrides, the
schema check with one-line errors, and the plain dict a run records."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from flora_ray.config.schema import BASE_KEY, DATASET_NAMES, REQUIRED_KEYS, Config
from flora_ray.errors import InputError, MissingInput


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML experiment file (with the files it extends, ``base:``) or the defaults, and apply
    ``section.key=value`` overrides. A file (with its bases and the overrides) must set ``REQUIRED_KEYS``."""
    data: dict[str, Any] = {} if path is None else read_config_file(path)
    for item in overrides:
        apply_override(data, item)
    if path is not None:
        missing = [key for key in REQUIRED_KEYS if dotted_value(data, key) is None]
        if missing:
            raise InputError(
                f"config file {str(path)!r} does not set {' and '.join(missing)}: name the timm model to compress "
                f"(model.name, e.g. deit_small_patch16_224) and the data (data.name: {', '.join(DATASET_NAMES)}), "
                "in the file, a base file or as overrides (see experiments/)"
            )
    return build_dataclass(Config, data, "")


def read_config_file(path: str | os.PathLike, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its ``base:`` files merged under it (``merge_configs``), recursively; a base
    path is relative to the file that names it. ``chain``: the files that led here (a cycle is an error)."""
    p = Path(path)
    named_by = f" (the base of {str(chain[-1])!r})" if chain else ""
    if p.resolve() in chain:
        cycle = " -> ".join(str(c) for c in (*chain, p.resolve()))
        raise InputError(f"config files extend each other in a cycle: {cycle}; remove one of these base: keys")
    if not p.is_file():
        raise MissingInput(f"config file {str(p)!r}{named_by} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"config file {str(p)!r} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise InputError(f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise InputError(f"config file {str(p)!r}: base={bases!r} must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for base in bases:  # later bases override earlier ones, the file itself overrides them all
        merged = merge_configs(merged, read_config_file(p.parent / base, (*chain, p.resolve())))
    return merge_configs(merged, data)


def merge_configs(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge key by key (sections, ``model.kwargs``), any other value
    (lists included) replaces the base's; an explicit ``null`` sets the key to null."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict, in place."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise InputError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types; errors name the dotted key."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else f"; valid: {names}"
            raise InputError(f"unknown config key '{dotted}'{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from exc


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, dotted)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, dotted)
            except ValueError as exc:
                errors.append(str(exc))
        raise InputError(errors[-1] if len(errors) == 1 else f"{dotted}={value!r} has the wrong type ({hint})")
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise InputError(f"{dotted}={value!r} must be a list")
        return tuple(_coerce(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise InputError(f"{dotted}={value!r} must be a mapping")
        return {str(k): _coerce(args[1], v, f"{dotted}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{dotted}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{dotted}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise InputError(f"{dotted}={value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{dotted}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"{dotted}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config type {hint} for {dotted}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-safe dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# --- comparing ----------------------------------------------------------------------------------------------------


def dotted_value(data: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key (``train.lr``) of a nested mapping, ``None`` where it is absent."""
    value: Any = data
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value
