"""The report's content, independent of its format: the blocks a section holds (tables, images, texts, rates,
completions side by side), the sections themselves, the headline cards and the :class:`Report` they make up.

Every model-written or user-written string stays a plain ``str`` here; the renderers escape it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RateCell:
    """A rate ``{count, n, rate, low, high}`` (low/high: its 95 % interval); ``refusal`` tells which way it points:
    True if a high value means more refusal, False if it means less, None if neither."""

    rate: dict
    refusal: bool | None = None


@dataclass
class Code:
    text: str


@dataclass
class Heat:
    """A number coloured by where it lies in ``[lo, hi]``."""

    value: float | None
    lo: float
    hi: float


@dataclass
class Verdict:
    """One completion under one condition: its text, whether it was judged a refusal, its refusal score."""

    completion: str
    refused: bool | None
    score: float | None


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    kind: str = ""  # a styling hint: "kv", "results", "grid", "completions"
    row_groups: list[int] | None = None  # rows that start a new group (drawn with a rule above)


@dataclass
class Image:
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Text:
    text: str
    kind: str = ""  # "", "note", "warn", "legend" (about colours: HTML only)


@dataclass
class Sub:
    title: str
    level: int = 3


@dataclass
class Completions:
    prompt_set: str
    conditions: list[str]
    rows: list[tuple[str, str | None, list[Verdict | None]]]  # (instruction, category, one verdict per condition)
    descriptions: dict[str, str] = field(default_factory=dict)  # condition → its interventions, in words


@dataclass
class Row:
    """Blocks side by side where there is room (one after the other in Markdown)."""

    parts: list[list]


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


@dataclass
class Card:
    """A headline: ``steps`` are (condition, value) in order, the first being the baseline."""

    title: str
    subtitle: str
    steps: list[tuple[str, Any]]
    refusal: bool | None = None


@dataclass
class Report:
    title: str
    facts: list[tuple[str, str]]
    cards: list[Card]
    sections: list[Section]
    generated: str
