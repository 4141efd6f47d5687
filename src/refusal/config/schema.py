"""The schema's building blocks: :func:`setting` (a documented field: default, description, allowed values, range),
the range checks it takes, :class:`Spec` (a section written as a mapping of options) and :func:`to_plain` (a config
as the plain data ``config.yaml`` holds)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, field
from typing import Any, TypeVar


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            choices: tuple | None = None, check: Callable[[Any], str | None] | None = None, digest: bool = True,
            parse: Callable[[Any, str], Any] | None = None, secret: bool = False) -> Any:
    """A documented config field. ``choices``: the allowed values; ``check``: returns a complaint (``"must be at
    least 1"``) or None; ``digest=False``: a setting that does not change results (left out of the stage digests,
    and out of ``config.yaml`` while unset); ``parse``: builds the typed value from what YAML gave (after the type
    check); ``secret``: a complaint never echoes the value."""
    meta = {"help": help, "choices": choices, "check": check, "digest": digest, "parse": parse, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v >= low else f"must be at least {low}"
    return check


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def fraction(*, closed_high: bool) -> Callable[[Any], str | None]:
    """In (0, 1] (``closed_high``) or (0, 1)."""
    def check(v: Any) -> str | None:
        ok = 0 < v <= 1 if closed_high else 0 < v < 1
        return None if ok else f"must be in (0, 1{']' if closed_high else ')'}"
    return check


def help_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def _required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


S = TypeVar("S", bound="Spec")


class Spec(Mapping[str, Any]):
    """A section written as a mapping of options. Its fields are typed and read as attributes (an option not
    given reads as its default in the schema); as a mapping it holds exactly the options that were given, which is
    what is saved and digested, so a run's digest does not depend on defaults it never named. A ``Spec`` made in
    Python holds, as given, its required fields and every field that differs from its default."""

    _given: tuple[str, ...]

    def __post_init__(self) -> None:
        given = [f.name for f in dataclasses.fields(self)  # type: ignore[arg-type]
                 if _required(f) or getattr(self, f.name) != _default(f) or f.name == "type"]
        object.__setattr__(self, "_given", tuple(given))

    def given(self: S, keys: typing.Iterable[str]) -> S:
        """This spec, holding ``keys`` as given (the keys a YAML mapping had)."""
        object.__setattr__(self, "_given", tuple(k for k in (f.name for f in dataclasses.fields(self))  # type: ignore
                                                 if k in set(keys) or k == "type"))
        return self

    def __getitem__(self, key: str) -> Any:
        if key not in self._given:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._given)

    def __len__(self) -> int:
        return len(self._given)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"

    def options(self) -> dict[str, Any]:
        """Every option (given or default) but ``type`` and ``name``: what builds the thing the spec names."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name not in ("type", "name")}


def to_plain(obj: Any) -> Any:
    """``obj`` as plain data (dicts, lists, scalars): a :class:`Spec` as the keys it holds, a dataclass as all its
    fields but an unset setting that changes no result (``digest=False``, value None)."""
    if isinstance(obj, Spec):
        return {k: to_plain(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("digest", True) or getattr(obj, f.name) is not None}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
