"""The documented YAML of ``refusal config``: every setting under its description, reading back as the same
config."""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from typing import Any

import yaml

from .judges import JUDGE_SCHEMAS
from .run import RunConfig
from .schema import Spec, _default, _hints, _required, help_of, to_plain


def _comment(text: str, indent: str, hang: str = "") -> list[str]:
    lines = textwrap.wrap(text, 118 - len(indent), initial_indent=hang, subsequent_indent=hang + "  " if hang else "")
    return [f"{indent}# {line}" for line in lines]


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**9, sort_keys=False).strip().removesuffix("\n...")


def _documented(obj: Any, indent: str = "") -> list[str]:
    lines: list[str] = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        v, t = getattr(obj, f.name), hints[f.name]
        lines += _comment(help_of(f), indent)
        if dataclasses.is_dataclass(v) and not isinstance(v, Spec):
            lines.append(f"{indent}{f.name}:")
            lines += _documented(v, indent + "  ")
            continue
        inner = typing.get_args(t)[0] if typing.get_origin(t) is list and typing.get_args(t) else None
        spec_cls = type(v) if isinstance(v, Spec) else (inner if isinstance(inner, type) and issubclass(inner, Spec)
                                                       else None)
        if spec_cls is not None:
            lines += _spec_fields(spec_cls, indent, "  ")
        if f.name == "judges":
            for schema in dict.fromkeys(s for s in JUDGE_SCHEMAS.values() if s is not None):
                kind = next(g.default for g in dataclasses.fields(schema) if g.name == "type")
                lines += _comment(f"{{type: {kind}}}: {(schema.__doc__ or '').strip()}", indent, "  ")
                lines += _spec_fields(schema, indent, "    ", skip=("type", "name"))
        plain = to_plain(v)
        if isinstance(plain, list) and plain:
            lines.append(f"{indent}{f.name}:")
            lines += [f"{indent}  - {_yaml_value(x)}" for x in plain]
        else:
            lines.append(f"{indent}{f.name}: {_yaml_value(plain)}")
    return lines


def _spec_fields(cls: type, indent: str, hang: str, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for g in dataclasses.fields(cls):  # type: ignore[arg-type]
        if g.name in skip:
            continue
        d = "required" if _required(g) else f"default {_yaml_value(to_plain(_default(g)))}"
        out += _comment(f"{g.name} ({d}): {help_of(g)}", indent, hang)
    return out


def documented_yaml(cfg: RunConfig | None = None) -> str:
    """``cfg`` (default: the built-in defaults) as YAML, every setting under its description: what ``refusal
    config`` prints, a starting point for ``--config`` that reads back as the same config."""
    head = ["# refusal: every setting with its description and value. Give a file like this one with --config;",
            "# keys left out keep their defaults, flags override the file."]
    return "\n".join(head + _documented(cfg if cfg is not None else RunConfig())) + "\n"
