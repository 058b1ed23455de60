"""Provenance rules: which keys change a run's results, and how two recorded configurations differ by them (what
``claim_run`` and a continued search compare)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from flora_ray.config.loading import config_to_dict, dotted_value
from flora_ray.config.schema import ABSENT_MEANS, AFFECTS_RESULTS, SECTION_DEFAULTS, Config


def speed_only_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted keys (or whole sections) of ``cls`` marked ``SPEED_ONLY``: they never change the results."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get(AFFECTS_RESULTS, True):
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            keys.extend(speed_only_keys(hints[f.name], f"{prefix}{f.name}."))
    return keys


def changed_result_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Sorted dotted keys whose values differ between two configurations (``config_to_dict`` form) and that can
    change the results.

    Sections are compared key by key, any other value of the schema as a whole (``model.kwargs`` is one value); a
    mapping under a key the schema does not know is opened too. A key marked ``SPEED_ONLY`` (or inside a section so
    marked) never counts; a key the schema does not know always does.
    """
    before, after = _leaves(Config, old, ""), _leaves(Config, new, "")
    for key in set(after) - set(before):  # keys added since ``old`` was recorded: what their absence meant
        known, value = _absent_value(key)
        if known:
            before[key] = value
    keys = sorted(set(before) | set(after))
    return [k for k in keys if before.get(k) != after.get(k) and _affects_results(k)]


def _leaves(cls: type | None, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``dotted key -> value`` of a nested config dict, opening sections and unknown non-empty mappings."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
    hints = typing.get_type_hints(cls) if cls is not None else {}
    leaves: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        section = hints.get(key) if dataclasses.is_dataclass(hints.get(key)) else None
        if isinstance(value, Mapping) and value and (section is not None or key not in fields):
            leaves.update(_leaves(section, value, dotted + "."))
        else:
            leaves[dotted] = value
    return leaves


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any], key: str) -> str:
    """``key: old -> new`` for a message; a key ``old`` lacks shows what its absence meant (``changed_result_keys``)."""
    before = dotted_value(old, key)
    known, absent = _absent_value(key)
    if before is None and known and not _present(old, key):
        return (
            f"{key}: not recorded (behaved as {absent!r}) -> {dotted_value(new, key)!r}; {key}={absent!r} continues it"
        )
    return f"{key}: {before!r} -> {dotted_value(new, key)!r}"


def _present(data: Mapping[str, Any], key: str) -> bool:
    *parents, last = key.split(".")
    for part in parents:
        data = data.get(part) if isinstance(data, Mapping) else None
    return isinstance(data, Mapping) and last in data


def _absent_value(key: str) -> tuple[bool, Any]:
    """``(True, value)`` when a configuration recorded without ``key`` behaved as ``value`` (``ABSENT_MEANS`` on
    the key or ``SECTION_DEFAULTS`` on its section), else ``(False, None)``."""
    cls: Any = Config
    section_defaults = False
    for part in key.split("."):
        known = {f.name: f for f in dataclasses.fields(cls)}.get(part) if dataclasses.is_dataclass(cls) else None
        if known is None:
            return False, None
        marker = known.metadata.get(ABSENT_MEANS, _NOT_MARKED)
        if marker == SECTION_DEFAULTS:
            section_defaults = True
        elif marker is not _NOT_MARKED:
            return True, marker
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            if not section_defaults:
                return False, None
            default = known.default_factory() if known.default is dataclasses.MISSING else known.default
            return True, config_to_dict(default) if dataclasses.is_dataclass(default) else default
    return False, None


_NOT_MARKED = object()


def _affects_results(key: str) -> bool:
    cls: Any = Config
    for part in key.split("."):
        known = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if known is None:
            return True
        if not known.metadata.get(AFFECTS_RESULTS, True):
            return False
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            return True
    return True
