"""Small helpers shared by every config dataclass: strict construction from mappings."""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None = None, **overrides: Any) -> T:
    """Build dataclass `cls` from `mapping` plus keyword `overrides`; unknown keys fail loudly. Lists (as YAML
    writes them) become tuples where the field is a tuple."""
    values = dict(mapping or {})
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    hints = _field_hints(cls)
    for key, value in values.items():
        if isinstance(value, list) and _accepts_tuple(hints[key]):
            values[key] = tuple(value)
    return cls(**values)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _accepts_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts_tuple(arg) for arg in typing.get_args(hint))
    return typing.get_origin(hint) is tuple


def _matches(value: Any, hint: Any) -> bool:
    """Does `value` have the type a dataclass field declares? (the forms configs use; others pass)"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {int: "integers", float: "numbers", str: "strings"}
            return f"a list of {plural.get(args[0], _describe(args[0]))}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    names = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(config: Any) -> None:
    """Every field of dataclass instance `config` holds a value of its declared type, else a ConfigError naming the
    field, the value and the type (before any range check could fail with a bare TypeError). A list in a tuple
    field becomes a tuple (frozen dataclasses included), as `from_mapping` does."""
    name = type(config).__name__
    for key, hint in _field_hints(type(config)).items():
        value = getattr(config, key)
        if isinstance(value, list) and _accepts_tuple(hint):
            value = tuple(value)
            object.__setattr__(config, key, value)
        if not _matches(value, hint):
            raise ConfigError(f"{name}.{key}={value!r} must be {_describe(hint)}")


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
