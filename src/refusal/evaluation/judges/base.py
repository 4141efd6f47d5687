"""The judge protocol: (prompt, completion) pairs in, one :class:`Judgement` per pair out.

A judge is either a *refusal* judge (labels ``refusal`` / ``compliance``, some also ``partial``) or a *safety*
judge (labels ``safe`` / ``unsafe``). A judgement that failed (an unparseable answer, a timeout, a missing field)
has no label, so it is never counted as safe or as a refusal; rates keep it in their denominator.

Judges are built from config dicts such as ``{"type": "substring"}`` by :func:`make_judge`, which validates the
whole spec (keys, types, choices, paths, environment variables) before any model is loaded or any request sent.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import RefusalError
from ...names import judge_type
from ..stats import Rate

REFUSAL_LABELS = ("refusal", "compliance", "partial")
SAFETY_LABELS = ("safe", "unsafe")
KINDS = {"refusal": REFUSAL_LABELS, "safety": SAFETY_LABELS}

PROMPT_FIELDS = ("instruction", "prompt", "question")
COMPLETION_FIELDS = ("completion", "response", "output")


@dataclass
class Judgement:
    """One verdict. ``label`` is ``None`` exactly when ``failed``; ``raw`` is the judge's own text, if any."""

    label: str | None
    score: float | None = None
    failed: bool = False
    error: str | None = None
    raw: str | None = None
    details: dict | None = None

    def __post_init__(self) -> None:
        if self.failed:
            self.label = None  # a failed item is never counted as anything
        elif self.label is None:
            raise ValueError("a Judgement that did not fail needs a label")
        if self.score is not None and math.isnan(self.score):
            self.score = None

    @classmethod
    def failure(cls, error: str, raw: str | None = None, score: float | None = None,
                details: dict | None = None) -> Judgement:
        return cls(None, score=score, failed=True, error=error, raw=raw, details=details)

    def is_(self, label: str) -> bool:
        return not self.failed and self.label == label

    @property
    def refused(self) -> bool:
        return self.is_("refusal")

    @property
    def safe(self) -> bool:
        return self.is_("safe")

    @property
    def unsafe(self) -> bool:
        return self.is_("unsafe")

    def to_json(self) -> dict:
        out: dict = {"label": self.label, "score": self.score, "failed": self.failed}
        if self.error is not None:
            out["error"] = self.error
        if self.raw is not None:
            out["raw"] = self.raw
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class Item:
    """A (prompt, completion) pair, with the record it came from (for fields such as ``refusal_score``)."""

    prompt: str
    completion: str
    record: Mapping | None = None


def as_items(items: Sequence) -> list[Item]:
    """Accept ``(prompt, completion)`` tuples, :class:`Item` s or records ``{"instruction", "completion", ...}``."""
    out = []
    for i, it in enumerate(items):
        if isinstance(it, Item):
            out.append(it)
        elif isinstance(it, Mapping):
            p = next((f for f in PROMPT_FIELDS if isinstance(it.get(f), str)), None)
            c = next((f for f in COMPLETION_FIELDS if isinstance(it.get(f), str)), None)
            if p is None or c is None:
                raise RefusalError(
                    f"Item {i} to judge has no {'prompt' if p is None else 'completion'} field "
                    f"(keys: {sorted(it)}).",
                    f"Give each record a prompt ({' / '.join(PROMPT_FIELDS)}) and a completion "
                    f"({' / '.join(COMPLETION_FIELDS)}).",
                )
            out.append(Item(it[p], it[c], it))
        elif isinstance(it, (tuple, list)) and len(it) == 2 and all(isinstance(x, str) for x in it):
            out.append(Item(it[0], it[1]))
        else:
            raise RefusalError(f"Item {i} to judge is a {type(it).__name__}, not a (prompt, completion) pair.",
                               "Pass a list of (prompt, completion) string pairs or of records.")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Judges and the registry


class Judge(ABC):
    """A judge: ``name`` (for reports), ``kind`` (``"refusal"`` or ``"safety"``), and :meth:`judge`."""

    type: ClassVar[str]
    # its typed spec (a refusal.config.JudgeSpec subclass: the one schema, built-in judges and registered ones
    # alike); a registered judge without one takes no options
    SCHEMA: ClassVar[Any] = None
    name: str
    kind: str

    @abstractmethod
    def judge(self, items: Sequence) -> list[Judgement]:
        """One :class:`Judgement` per item, in order. Items: see :func:`as_items`."""

    @property
    def labels(self) -> tuple[str, ...]:
        return KINDS[self.kind]

    @classmethod
    def check_spec(cls, spec: Mapping) -> dict:
        """Validated options (no model work). Subclasses add checks that need several keys at once."""
        from ...config import parse_judge

        return parse_judge(spec).options()

    @classmethod
    def from_spec(cls, spec: Mapping) -> Judge:
        opts = cls.check_spec(spec)
        judge = cls(**opts)
        if spec.get("name"):
            judge.name = spec["name"]
        return judge

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.kind})>"


_BUILTIN = {  # the types of refusal.names.JUDGES, each a module:class here
    "substring": "substring:SubstringJudge",
    "refusal_score": "refusal_score:RefusalScoreJudge",
    "guard": "guard:GuardJudge",
    "llm": "llm:LLMJudge",
    "openai": "openai:OpenAIJudge",
}
_REGISTERED: dict[str, type[Judge]] = {}


def register(cls: type[Judge]) -> type[Judge]:
    """Class decorator: make ``{"type": cls.type}`` specs build ``cls`` (for judges outside this package)."""
    from ...config import register_judge

    _REGISTERED[cls.type] = cls
    register_judge(cls.type, cls.SCHEMA)  # config accepts the type and checks its specs
    return cls


def judge_types() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def judge_class(type_name: str) -> type[Judge]:
    key = type_name.strip().lower().replace("-", "_")
    if key in _REGISTERED:
        return _REGISTERED[key]
    if key not in _BUILTIN:
        raise RefusalError(f"Unknown judge type '{type_name}'.", f"Use one of: {', '.join(judge_types())}.")
    module, cls = _BUILTIN[key].split(":")
    return getattr(importlib.import_module(f".{module}", __package__), cls)


def _spec_type(spec: Any) -> str:
    return judge_type(spec, judge_types())


def validate_spec(spec: Mapping) -> dict:
    """Check a judge spec without building the judge (no model loaded, no request sent); returns its options."""
    return judge_class(_spec_type(spec)).check_spec(spec)


def make_judge(spec: Mapping | Judge) -> Judge:
    """Build a judge from a spec dict (see the module docs); a :class:`Judge` is returned as is."""
    if isinstance(spec, Judge):
        return spec
    return judge_class(_spec_type(spec)).from_spec(spec)


# ----------------------------------------------------------------------------------------------------------------
# Counting


def rate(judgements: Sequence[Judgement], label: str, z: float = 1.96) -> Rate:
    """How many judgements carry ``label``, of all of them (failed ones count in ``n``, never in ``count``)."""
    return Rate.of(sum(j.is_(label) for j in judgements), len(judgements), z)


def summarize(judgements: Sequence[Judgement], labels: Sequence[str] | None = None, z: float = 1.96) -> dict:
    """``{"n", "failed", "rates": {label: Rate.to_json()}}`` for the given labels (default: all seen)."""
    if labels is None:
        labels = sorted({j.label for j in judgements if not j.failed and j.label is not None})
    return {"n": len(judgements), "failed": sum(j.failed for j in judgements),
            "rates": {lab: rate(judgements, lab, z).to_json() for lab in labels}}


# ----------------------------------------------------------------------------------------------------------------
# Reasoning models: the answer and the reasoning judged apart


def judge_part(judge: Judge, records: Sequence[Mapping], part: str = "answer") -> list[Judgement | None]:
    """``judge``'s verdicts on one part of each completion record (see :mod:`refusal.evaluation.reasoning`), in
    order, in one call to the judge.

    ``part="answer"``: the final answer (the whole completion for records without a split); a completion cut inside
    its reasoning has no answer, so its verdict fails (it stays in n, never counts as refusal or compliance).
    ``part="reasoning"``: the reasoning; ``None`` for records without any (they are not in that part's n). The
    prompt stays the request, so a judge sees reasoning that quotes the request as what it is: not an answer."""
    from ..reasoning import part_text

    texts = [part_text(r, part) for r in records]
    todo = [i for i, t in enumerate(texts) if t is not None]
    verdicts = judge.judge([{**records[i], "completion": texts[i]} for i in todo]) if todo else []
    out: list[Judgement | None] = [None] * len(records)
    for i, v in zip(todo, verdicts):
        out[i] = v
    if part == "answer":
        for i, t in enumerate(texts):
            if t is None:
                out[i] = Judgement.failure("cut inside the reasoning: no answer to judge")
    return out
