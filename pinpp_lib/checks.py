"""Settings that check themselves: a bad value stops with one line before any data is read.

Every config dataclass of the kit inherits `Checked`. When it is built — by a profile, by `--set key=value`
(`config.apply_overrides`), by `dataclasses.replace` in a notebook — each field is checked against its type
annotation (an int field refuses "abc" and 2.5, a float field takes 2, a tuple field takes a list) and
against the class's `LIMITS` (ranges and choices), and the message names the setting, the value and what
is allowed. A leaf module: it imports only `fileio`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar

from .fileio import PinppError

Rule = Callable[[Any], str | None]  # a value → None if allowed, else what is allowed (words)


def at_least(lo: float) -> Rule:
    return lambda v: None if v >= lo else f"a value ≥ {lo:g}"


def above(lo: float) -> Rule:
    return lambda v: None if v > lo else f"a value > {lo:g}"


def between(lo: float, hi: float) -> Rule:
    return lambda v: None if lo <= v <= hi else f"a value between {lo:g} and {hi:g}"


def one_of(*choices: Any) -> Rule:
    return lambda v: None if v in choices else "one of " + ", ".join(map(repr, choices))


def each(rule: Rule) -> Rule:
    """A rule for every element of a tuple."""
    def check(v: Any) -> str | None:
        bad = [why for x in v if (why := rule(x))]
        return f"elements that are each {bad[0]}" if bad else None
    return check


def all_of(*rules: Rule) -> Rule:
    def check(v: Any) -> str | None:
        return next((why for r in rules if (why := r(v))), None)
    return check


def ordered(v: Any) -> str | None:
    return None if list(v) == sorted(v) else "values in increasing order"


def device_name(v: str) -> str | None:
    return None if v in ("cpu", "mps") or v == "cuda" or v.startswith("cuda:") else "'cpu', 'cuda' or 'cuda:N'"


def sums_to(total: float, tol: float = 1e-6) -> Rule:
    return lambda v: None if abs(sum(v) - total) <= tol else f"values that sum to {total:g}"


class SettingError(PinppError):
    """A setting with a wrong type or out of range. `where` is the key path it was given under, if known."""
    where: str | None = None


class Checked:
    """Mixin for config dataclasses: types from the annotations, ranges and choices from `LIMITS`."""
    LIMITS: ClassVar[dict[str, Rule]] = {}

    def __post_init__(self) -> None:
        check(self)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check(obj: Any) -> None:
    """Check (and normalise: int → float, list → tuple) every field of a dataclass instance in place."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, coerced = _conform(value, hints.get(f.name, Any))
        if not ok:
            raise SettingError(f"{cls.__name__}.{f.name} = {value!r}: expected {_describe(hints[f.name])}; set a valid value")
        rule = cls.LIMITS.get(f.name)
        why = rule(coerced) if rule is not None and coerced is not None else None
        if why:
            raise SettingError(f"{cls.__name__}.{f.name} = {value!r}: expected {why}; set a valid value")
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)


def _conform(v: Any, tp: Any) -> tuple[bool, Any]:
    """(does v fit tp, v normalised to it)."""
    if tp is Any:
        return True, v
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, c = _conform(v, arg)
            if ok:
                return True, c
        return False, v
    if tp is type(None):
        return v is None, v
    if tp is bool:
        return isinstance(v, bool), v
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool), v
    if tp is float:
        return (isinstance(v, (int, float)) and not isinstance(v, bool)), (float(v) if isinstance(v, (int, float)) else v)
    if tp is str:
        return isinstance(v, str), v
    if tp is Path:
        return isinstance(v, (str, os.PathLike)), v
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, (tuple, list)):
            return False, v
        kinds = [args[0]] * len(v) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(v):
            return False, v
        out = [_conform(x, k) for x, k in zip(v, kinds)]
        return all(ok for ok, _ in out), tuple(c for _, c in out)
    if origin in (dict, list):
        return isinstance(v, origin), v
    if dataclasses.is_dataclass(tp):
        return isinstance(v, tp), v
    return True, v


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    return {int: "an integer", float: "a number", str: "text", bool: "True or False", type(None): "None",
            Path: "a path"}.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "names"}.get(tp, _describe(tp))
