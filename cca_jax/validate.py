"""Config fields checked against their declared types and ranges: a bad value is one line
naming the field, raised while the (frozen) dataclass is built, before any work.

Each config dataclass calls ``check_fields(self, section, RULES)`` in ``__post_init__``
with its own rules, next to the code it configures."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Callable

from cca_jax.errors import CCAError


@dataclasses.dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    text: str  # what a valid value is, after "must be"


def at_least(n) -> Rule:
    return Rule(lambda v: v >= n, f">= {n}")


def above(n) -> Rule:
    return Rule(lambda v: v > n, f"> {n}")


def at_most(n) -> Rule:
    return Rule(lambda v: v <= n, f"<= {n}")


def below(n) -> Rule:
    return Rule(lambda v: v < n, f"< {n}")


def one_of(*names) -> Rule:
    return Rule(lambda v: v in names, f"one of {', '.join(map(str, names))}")


NONEMPTY = Rule(lambda v: v != "", "non-empty")
COUNT = at_least(1)  # steps, sizes, batch sizes, token budgets
SEED = at_least(0)  # numpy's generators refuse negative seeds

class _Mismatch(Exception):
    """A value does not have the declared type (caught and reported with the field's name)."""


def _describe(tp) -> str:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_describe(a) for a in arms)
        return text + (" or null" if len(arms) < len(typing.get_args(tp)) else "")
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(tp):
        return "a mapping of its keys"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _conform(value, tp):
    """``value`` as type ``tp`` (lists -> tuples, ints -> floats where a float is declared),
    or _Mismatch. No other conversion: 8.0 is not an integer, 1 is not true."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _conform(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_conform(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_conform(v, a) for v, a in zip(value, args))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Mismatch
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if isinstance(tp, type):  # bool, str, a section's dataclass
        if not isinstance(value, tp):
            raise _Mismatch
        return value
    return value


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_fields(obj, section: str, rules: dict | None = None) -> None:
    """Check every field of the dataclass ``obj`` against its annotation and ``rules``
    (field -> Rule or tuple of Rules; a rule applies to the value, to each element of a
    tuple, and never to None), normalizing in place (lists to tuples, ints to floats).
    CCAError names the first bad field as ``section.field``."""
    rules = rules or {}
    for f in dataclasses.fields(obj):
        name = f"{section}.{f.name}" if section else f.name
        value = getattr(obj, f.name)
        tp = _hints(type(obj))[f.name]
        try:
            conformed = _conform(value, tp)
        except _Mismatch:
            hint = " (quote it in YAML)" if typing.get_origin(tp) is None and tp is str else ""
            raise CCAError(f"{name} must be {_describe(tp)}{hint}, got {value!r}") from None
        rule = rules.get(f.name, ())
        for r in (rule,) if isinstance(rule, Rule) else rule:
            values = conformed if isinstance(conformed, tuple) else (conformed,)
            bad = [v for v in values if v is not None and not r.ok(v)]
            if bad:
                what = f"every value of {name}" if isinstance(conformed, tuple) else name
                raise CCAError(f"{what} must be {r.text}, got {bad[0]!r}")
        if conformed is not value:
            object.__setattr__(obj, f.name, conformed)
