"""Config fields that carry their own type, default, one-line doc and allowed values, and the one
check that reads them.

Every group of the config (the top level, ``trainer``, ``task``, ``model``, ``tracking`` and each
variant) is a dataclass of ``knob`` fields. Hydra composes the YAML files onto these dataclasses
(``schema.store``), so a value of the wrong type fails while the config is composed; ``problems``
then checks what a type cannot say (a range, a set of choices, a rule between keys), and
``schema.door`` turns either kind of failure into one line naming the key, the value and what is
allowed.

    rank: int = knob(8, "r, the inner dimension of B·A", within=">= 1")
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any

_INTERVAL = re.compile(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])")
_BOUND = re.compile(r"(>=|>|<=|<)\s*(\S+)")


@dataclasses.dataclass(frozen=True)
class Allowed:
    """What a field accepts beyond its type: ``choices``, an interval (``within``), or a rule
    (``rule``: value -> ok, described by ``text``)."""

    choices: tuple[Any, ...] = ()
    within: str = ""
    rule: Callable[[Any], bool] | None = None
    text: str = ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True  # a None the type allows (Optional) means "off" or "not set"
        if self.choices and value not in self.choices:
            return False
        if self.within and not _in_interval(value, self.within):
            return False
        return self.rule is None or bool(self.rule(value))

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.choices:
            return ", ".join(str(c) for c in self.choices)
        return self.within


def knob(default: Any, doc: str, *, choices: tuple[Any, ...] = (), within: str = "",
         rule: Callable[[Any], bool] | None = None, allowed: str = "") -> Any:
    """A config field: its ``default``, its one-line ``doc`` and what it accepts beyond its type:
    ``choices``, an interval ``within`` (``"> 0"``, ``">= 1"``, ``"[0, 1)"``), or a ``rule`` whose
    ``allowed`` text names what passes. A list, dict or dataclass default is copied for each
    instance."""
    if within:
        _in_interval(0.0, within)  # a malformed interval fails where it is written
    meta = {"doc": doc, "allowed": Allowed(tuple(choices), within, rule, allowed)}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _in_interval(value: Any, interval: str) -> bool:
    if (m := _BOUND.fullmatch(interval.strip())) is not None:
        op, bound = m.group(1), float(m.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    if (m := _INTERVAL.fullmatch(interval.strip())) is not None:
        low, high = float(m.group(2)), float(m.group(3))
        above = value >= low if m.group(1) == "[" else value > low
        below = value <= high if m.group(4) == "]" else value < high
        return above and below
    raise ValueError(f"not an interval: {interval!r} (e.g. '> 0', '>= 1', '[0, 1)')")


def type_text(hint: Any) -> str:
    """How a type reads in an error and in the docs: ``an integer``, ``null or a number`` …"""
    inner, optional = _unwrap_optional(hint)
    text = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            dict: "a mapping", list: "a list", Any: "any value"}.get(inner)
    if text is None:
        origin = typing.get_origin(inner)
        text = {list: "a list", dict: "a mapping"}.get(origin, getattr(inner, "__name__", str(inner)))
        if origin is list and typing.get_args(inner) and typing.get_args(inner)[0] is str:
            text = "a list of strings"
    return f"null or {text}" if optional else text


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def type_accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` is of the field type ``hint`` (bool is not an int; NaN and infinity are
    not numbers: no rate, ratio or weight of this project means them)."""
    inner, optional = _unwrap_optional(hint)
    if value is None:
        return optional or inner is Any
    if inner is Any:
        return True
    if inner is bool:
        return isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if inner is str:
        return isinstance(value, str)
    origin = typing.get_origin(inner)
    if origin is list:
        (item,) = typing.get_args(inner) or (Any,)
        return isinstance(value, (list, tuple)) and all(type_accepts(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(inner):
        return dataclasses.is_dataclass(value)
    return isinstance(value, inner)


def problems(settings: Any, prefix: str) -> list[str]:
    """Every field of the dataclass instance ``settings`` (and of the dataclasses inside it) whose
    value its type or its ``Allowed`` refuses, as ``prefix.key=value must be ...``; then the
    instance's own rules between keys (its ``rules()`` method, when it has one)."""
    found = []
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        key, value = f"{prefix}.{field.name}" if prefix else field.name, getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            found += problems(value, key)
            continue
        allowed = field.metadata.get("allowed", Allowed())
        if not (type_accepts(hints[field.name], value) and allowed.accepts(value)):
            found.append(refusal(key, value, hints[field.name], allowed))
    rules = getattr(settings, "rules", None)
    return found + (rules(prefix) if callable(rules) else [])


def refusal(key: str, value: Any, hint: Any, allowed: Allowed) -> str:
    """``key=value must be <what the field accepts>``, the one line every config error ends in."""
    if allowed.choices:
        return f"{key}={value!r} is not supported; allowed: {allowed.describe()}"
    return f"{key}={value!r} must be {accepted(hint, allowed)}"


def accepted(hint: Any, allowed: Allowed) -> str:
    """What a field accepts, in words: ``a finite number > 0``, ``null or an integer >= 1``,
    ``a finite number in [0, 1)``, ``one of a, b``."""
    if allowed.choices:
        return f"one of {allowed.describe()}"
    if allowed.text:  # a rule's own words say the whole of it
        return allowed.text
    text = type_text(hint)
    if allowed.within:
        return f"{text} {'in ' if allowed.within[0] in '[(' else ''}{allowed.within}"
    return text
