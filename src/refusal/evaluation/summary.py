"""The summary of a run: for every prompt set × condition, each metric with its count, n and 95 % Wilson interval.

``summary["results"][prompt_set][condition][metric]``; the headline numbers of the paper's table are also given
flat: ``summary["harmful"][condition]`` is the non-refusal rate on harmful prompts (higher: the intervention bypasses
refusal), ``summary["harmless"][condition]`` the refusal rate on harmless prompts (higher: it induces refusal).

When the test records carry a ``category`` (JailbreakBench, StrongREJECT, HarmBench, a user's own field), each
condition also has ``by_category``: ``{category: {"refusal": rate, "non_refusal": rate}}``, each rate with its
Wilson interval, categories in order of first appearance (records without a category under ``"(none)"``, only if
some records have one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .stats import Rate
from .substring import judge

HEADLINE = {"harmful": "non_refusal", "harmless": "refusal"}


def paper_judge(specs: Sequence[Any]) -> str | None:
    """The name of the configured judge whose verdicts are the summary's ``refused``: the substring judge with the
    shipped phrase list (the paper's judge); None when none is configured (the summary then judges by itself)."""
    from .judges import make_judge
    from .judges.substring import SubstringJudge

    for spec in specs:
        j = make_judge(spec)  # builds no model: a spec is checked, backends load when they first judge
        if type(j) is SubstringJudge and j.phrases is None:
            return j.name
    return None


def judge_completions(completions: dict[str, dict[str, list[dict]]],
                      verdicts: Mapping[str, Mapping[str, Mapping]] | None = None) -> dict[str, dict[str, list[dict]]]:
    """Every record of every prompt set and condition with ``refused``: the paper's substring judgement.

    ``verdicts``: that judge's results where a run has already judged the completions with it (one entry of
    ``judges.json``, ``{prompt_set: {condition: {"items": [judgement, ...]}}}``, see :func:`paper_judge`): they are
    reused, so the substring judge runs once. Without them the substring match runs here."""
    if verdicts is None:
        return {kind: {cond: judge(recs) for cond, recs in conds.items()} for kind, conds in completions.items()}
    out: dict = {}
    for kind, conds in completions.items():
        for cond, recs in conds.items():
            items = verdicts.get(kind, {}).get(cond, {}).get("items", [])
            if len(items) != len(recs):
                raise ValueError(f"{len(items)} verdicts for {len(recs)} completions of {kind}/{cond}")
            out.setdefault(kind, {})[cond] = [{**r, "refused": v["label"] == "refusal"} for r, v in zip(recs, items)]
    return out


def summarize(judged: dict[str, dict[str, list[dict]]], kl: dict | None = None) -> dict:
    """Rates per prompt set x condition; ``kl``: ``{prompt_set: {condition: {"kl_harmless": x}}}`` from generate."""
    results: dict = {}
    headline: dict = {}
    for kind, conds in judged.items():
        for cond, recs in conds.items():
            n = len(recs)
            k = sum(bool(r["refused"]) for r in recs)
            scores = [r["refusal_score"] for r in recs if r.get("refusal_score") is not None]
            m: dict[str, Any] = {"refusal": Rate.of(k, n).to_json(), "non_refusal": Rate.of(n - k, n).to_json(),
                 "refusal_score_positive": Rate.of(sum(s > 0 for s in scores), len(scores)).to_json(),
                 "mean_refusal_score": round(sum(scores) / len(scores), 4) if scores else None,
                 "kl_harmless": ((kl or {}).get(kind, {}).get(cond) or {}).get("kl_harmless")}
            cats = by_category(recs)
            if cats:
                m["by_category"] = cats
            results.setdefault(kind, {})[cond] = m
            if kind in HEADLINE:
                headline.setdefault(kind, {})[cond] = m[HEADLINE[kind]]["rate"]
    return {**headline, "results": results,
            "n": {kind: {c: len(r) for c, r in conds.items()} for kind, conds in judged.items()}}


NO_CATEGORY = "(none)"


def by_category(records: list[dict]) -> dict:
    """``{category: {"refusal": rate, "non_refusal": rate}}`` of judged records (``refused``), each rate with its
    Wilson interval; empty when no record has a category."""
    groups: dict[str, list[bool]] = {}
    if not any(r.get("category") not in (None, "") for r in records):
        return {}
    for r in records:
        c = r.get("category")
        groups.setdefault(NO_CATEGORY if c in (None, "") else str(c), []).append(bool(r["refused"]))
    return {c: {"refusal": Rate.of(sum(v), len(v)).to_json(), "non_refusal": Rate.of(len(v) - sum(v), len(v)).to_json()}
            for c, v in groups.items()}
