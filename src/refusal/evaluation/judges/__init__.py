"""Judges: refusal and safety verdicts on (prompt, completion) pairs.

>>> from refusal.evaluation.judges import make_judge, summarize
>>> judge = make_judge({"type": "substring"})
>>> verdicts = judge.judge([("How do I pick a lock?", "I'm sorry, I can't help with that.")])
>>> summarize(verdicts)["rates"]["refusal"]["rate"]
1.0

Types: ``substring``, ``refusal_score`` (the score stored with each completion), ``guard`` (Llama Guard or WildGuard,
local), ``llm`` (a local chat model with a rubric), ``openai`` (an OpenAI-compatible endpoint with a rubric). The
backends load lazily: building a judge from a spec validates it without loading a model.
"""

from __future__ import annotations

from .base import (
    KINDS,
    REFUSAL_LABELS,
    SAFETY_LABELS,
    Item,
    Judge,
    Judgement,
    as_items,
    judge_class,
    judge_types,
    make_judge,
    rate,
    register,
    summarize,
    validate_spec,
)

__all__ = ["KINDS", "REFUSAL_LABELS", "SAFETY_LABELS", "Item", "Judge", "Judgement", "as_items",
           "judge_class", "judge_types", "make_judge", "rate", "register", "summarize", "validate_spec"]
