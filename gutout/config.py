"""Small helpers shared by every config dataclass: strict construction from mappings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None = None, **overrides: Any) -> T:
    """Build dataclass `cls` from `mapping` plus keyword `overrides`; unknown keys fail loudly."""
    values = dict(mapping or {})
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    return cls(**values)


def replace(config: T, **overrides: Any) -> T:
    """`dataclasses.replace` that names unknown keys instead of a bare TypeError."""
    return from_mapping(type(config), dataclasses.asdict(config), **overrides)


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_range(owner: str, name: str, value: float, lo: float, hi: float, *, lo_open=False) -> None:
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{owner}.{name}={value!r} must lie in {bracket}{lo}, {hi}]")
