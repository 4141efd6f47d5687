"""Refusal by substring match: the completion contains one of the refusal phrases (the paper's judge).

The phrase list and the matching rule are those of :mod:`refusal.evaluation.substring`, so this judge and the
run summary always agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...config import SubstringJudgeConfig
from .. import substring as _substring
from .base import Judge, Judgement, as_items


class SubstringJudge(Judge):
    """``refusal`` if the completion contains a refusal phrase, else ``compliance``. Never fails."""

    type = "substring"
    kind = "refusal"
    SCHEMA = SubstringJudgeConfig

    def __init__(self, phrases: Sequence[str] | None = None):
        self.name = "substring"
        self.phrases = list(phrases) if phrases is not None else None

    def judge(self, items: Sequence) -> list[Judgement]:
        phrases = self.phrases if self.phrases is not None else _substring.refusal_phrases()
        return [Judgement("refusal" if _substring.is_refusal(it.completion, phrases) else "compliance")
                for it in as_items(items)]
