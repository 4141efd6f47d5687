"""Checking plain data against the schema: a value against its field's type, allowed values and range
(:func:`_check_fields`, a :class:`~refusal.errors.RefusalError` naming the setting and the fix), and building a
section's keyword arguments from checked data (:func:`_parsed`)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING
from typing import Any

from ..errors import RefusalError
from .schema import Spec, _default, _hints, _required, help_of, to_plain

_EXAMPLES = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "null",
             dict: "a mapping"}


def _describe(t: Any) -> str:
    if t in _EXAMPLES:
        return _EXAMPLES[t]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list or t is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict or dataclasses.is_dataclass(t):
        return "a mapping"
    return str(t)


def _matches(v: Any, t: Any) -> bool:
    if t is Any:
        return True
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in args)
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is str:
        return isinstance(v, str)
    if origin is list or t is list:
        return isinstance(v, list) and (not args or all(_matches(x, args[0]) for x in v))
    if origin is dict or t is dict:
        return isinstance(v, Mapping) and (not args or all(_matches(x, args[1]) for x in v.values()))
    if dataclasses.is_dataclass(t) and isinstance(t, type):
        return isinstance(v, (Mapping, t))
    return True


def _or(values: tuple) -> str:
    names = [json.dumps(v).strip('"') for v in values]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _check_fields(d: Mapping[str, Any], cls: type, where: str = "") -> None:
    """Every value of ``d`` (a section as a mapping) against its field in ``cls``: type, allowed values, range. A
    wrong one is a :class:`RefusalError` naming the setting, what it must be and an example, before anything runs.
    Nested sections are checked in turn; a field with its own parser (judges, option sections) is checked there."""
    hints = _hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls)}
    for key, v in d.items():
        t, f = hints.get(key), flds.get(key)
        if t is None or f is None:
            continue
        name = f"{where}{key}"
        if dataclasses.is_dataclass(t) and isinstance(t, type) and not issubclass(t, Spec) and not isinstance(v, t):
            if not isinstance(v, Mapping):
                raise RefusalError(f"{name} must be a mapping of settings (got {v!r}).",
                                   f"Write it as key: value pairs under {key}: (see `refusal config`).")
            _check_fields(v, t, f"{name}.")
            continue
        args = typing.get_args(t)
        if typing.get_origin(t) is list and args and dataclasses.is_dataclass(args[0]):  # checked when built
            if not isinstance(v, list):
                raise RefusalError(f"{name} must be a list (got {v!r}).", "See `refusal config` for the layout.")
            continue
        if not _matches(v, t):
            if isinstance(v, str) and (typing.get_origin(t) is list or list in args
                                       or any(typing.get_origin(a) is list for a in args)):
                fix = f"Write it as a list: {key}: [{v}]."
            elif f.default not in (MISSING, None):
                fix = f"For example {key}: {json.dumps(f.default).replace(chr(34), '')} (the default)."
            else:
                fix = "See `refusal config` for every setting and its default."
            if isinstance(v, str) and _matches(1.0, t) and _yaml_float(v):
                mantissa, _, exponent = f"{float(v):.1e}".partition("e")
                fix = (f"YAML reads {v} as text (an exponent needs a dot and a sign): write {key}: "
                       f"{mantissa}e{int(exponent):+d}.")
            got = "" if f.metadata.get("secret") else f" (got {v!r})"
            raise RefusalError(f"{name} must be {_describe(t)}{got}.", fix)
        choices = f.metadata.get("choices")
        if choices is not None and v not in choices:
            raise RefusalError(f"{name} must be {_or(choices)} (got {v!r}).", _fix(f))
        check = f.metadata.get("check")
        complaint = check(v) if check is not None and v is not None else None
        if complaint:
            got = "" if f.metadata.get("secret") else f" (got {v!r})"
            raise RefusalError(f"{name} {complaint}{got}.", _fix(f))


def _yaml_float(v: str) -> bool:
    """Whether text that YAML 1.1 left a string (``1e9``, ``1.0e9``) is a number to Python."""
    try:
        float(v)
    except ValueError:
        return False
    return True


def _fix(f: dataclasses.Field) -> str:
    h = help_of(f)
    default = "" if _required(f) or isinstance(_default(f), (list, dict)) else \
        f" The default is {json.dumps(to_plain(_default(f)))}."
    return (f"{h[0].upper()}{h[1:]}." if h else "See `refusal config`.") + default


check_types = _check_fields  # the earlier name


def _type_names(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_names(a) for a in args)
    if t is type(None):
        return "null"
    return getattr(origin or t, "__name__", str(t))


def _parsed(d: Mapping[str, Any], cls: type, where: str) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from ``d`` (checked): nested sections built, parsers applied."""
    hints = _hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, v in d.items():
        f, t = flds[key], hints[key]
        parse = f.metadata.get("parse")
        if parse is not None:
            v = parse(v, f"{where}{key}")
        elif dataclasses.is_dataclass(t) and isinstance(t, type) and isinstance(v, Mapping):
            v = t(**_parsed(v, t, f"{where}{key}."))
        out[key] = v
    return out
