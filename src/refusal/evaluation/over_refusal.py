"""Over-refusal on a contrast set: how often a model refuses safe prompts that look unsafe, and how often it
complies with the unsafe prompts of the same shapes, under each condition (baseline, ablation, addition, ...).

>>> from refusal.data.contrast import builtin_contrast
>>> res = over_refusal(model, tok, builtin_contrast(), {"baseline": [], "ablation": [ablation(d)]},
...                    {"type": "substring"}, max_new_tokens=64, batch_size=32)
>>> print(res["ablation"]["over_refusal"], res["ablation"]["compliance"])      # Rates with Wilson intervals

Every condition's completions come from ONE :func:`~refusal.generation.batched.generate` call: the prompts are
repeated once per condition and a per-row :class:`~refusal.interventions.Plan` gives each row its condition's
interventions, so all conditions decode together in the same batches. The completions (with each one's refusal
score at the first generated token) are then judged in one call to the judge, which must be a refusal judge.

Per condition: ``over_refusal`` = refusals (full or partial) among the safe prompts; ``compliance`` = full
compliance among the unsafe prompts; both :class:`~refusal.evaluation.stats.Rate` (count, n, Wilson interval). A
failed judgement counts in ``n`` and in neither count. ``by_type`` gives the refusal rate of every prompt type,
``records`` the prompts, completions and verdicts. :func:`to_json` makes the result JSON-safe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import RefusalError
from .stats import Rate

if TYPE_CHECKING:
    from .judges import Judge

REFUSED = ("refusal", "partial")


def _check(records: object, conditions: object, max_new_tokens: object, batch_size: object
           ) -> tuple[list[dict], dict[str, list]]:
    from ..interventions.scopes import Intervention

    if isinstance(records, (str, Mapping)) or not isinstance(records, Sequence) or not records:
        raise RefusalError("over_refusal needs a non-empty list of contrast records.",
                           "Pass builtin_contrast() or load_xstest(path) from refusal.data.contrast.")
    recs = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or not isinstance(r.get("prompt"), str) or r.get("label") not in ("safe",
                                                                                                       "unsafe"):
            raise RefusalError(f"Contrast record {i} is not {{prompt, label: safe | unsafe, ...}}: {r!r}.",
                               "Load the records with refusal.data.contrast.")
        recs.append(dict(r))
    if not isinstance(conditions, Mapping) or not conditions:
        raise RefusalError("over_refusal needs at least one condition: {name: [interventions]}.",
                           'For the model as it is, pass {"baseline": []}.')
    conds = {}
    for name, ivs in conditions.items():
        if not isinstance(name, str) or not name:
            raise RefusalError(f"Condition names must be non-empty strings, not {name!r}.", "Name each condition.")
        ivs = [] if ivs is None else [ivs] if isinstance(ivs, Intervention) else ivs
        if not isinstance(ivs, Sequence) or not all(isinstance(iv, Intervention) for iv in ivs):
            raise RefusalError(f"Condition '{name}' is not a list of Interventions.",
                               "Build them with refusal.interventions (ablation, addition, reflection, ...).")
        conds[name] = list(ivs)
    for what, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RefusalError(f"{what}={v!r} must be a positive int.", f"Pass {what}= a positive number.")
    return recs, conds


def over_refusal(model: Any, tokenizer: Any, contrast_records: Sequence[Mapping], conditions: Mapping[str, Sequence],
                 judge: Mapping | Judge, *, max_new_tokens: int = 64, batch_size: int = 32,
                 system: str | None = None) -> dict[str, dict]:
    """Generate, judge and count (see the module docs). ``judge`` is a judge spec (``{"type": "substring"}``) or a
    :class:`~refusal.evaluation.judges.Judge`; ``system`` an optional system prompt for the chat template.

    Returns ``{condition: {"over_refusal": Rate, "compliance": Rate, "by_type": {type: Rate}, "failed": int,
    "records": [{"prompt", "type", "label", "focus", "completion", "refusal_score", "judgement"}]}}``."""
    from ..generation.batched import generate
    from ..interventions.hooks import Plan
    from ..scoring.refusal import refusal_token_ids
    from ..templates import format_prompts
    from .judges import make_judge

    recs, conds = _check(contrast_records, conditions, max_new_tokens, batch_size)
    judge = make_judge(judge)
    if judge.kind != "refusal":
        raise RefusalError(f"The judge '{judge.name}' gives {judge.kind} verdicts, not refusal verdicts.",
                           "Use a refusal judge (substring, refusal_score, llm or openai with the refusal rubric).")
    names = list(conds)
    prompts = format_prompts(tokenizer, [r["prompt"] for r in recs], system)
    rows = [conds[c] for c in names for _ in recs]
    plan = Plan.rows(model, rows) if any(rows) else None
    texts, scores = generate(model, tokenizer, prompts * len(names), max_new_tokens=max_new_tokens,
                             batch_size=batch_size, plan=plan, refusal_ids=refusal_token_ids(tokenizer),
                             description="Generating (contrast set)")
    items = [{**r, "instruction": r["prompt"], "completion": texts[j * len(recs) + i],
              "refusal_score": float(scores[j * len(recs) + i]), "condition": c}
             for j, c in enumerate(names) for i, r in enumerate(recs)]
    verdicts = judge.judge(items)
    if len(verdicts) != len(items):
        raise RuntimeError(f"the judge returned {len(verdicts)} verdicts for {len(items)} items")

    out: dict[str, dict] = {}
    for j, c in enumerate(names):
        part = list(zip(items[j * len(recs):(j + 1) * len(recs)], verdicts[j * len(recs):(j + 1) * len(recs)]))
        safe = [v for it, v in part if it["label"] == "safe"]
        unsafe = [v for it, v in part if it["label"] == "unsafe"]
        by_type: dict[str, Rate] = {}
        for t in dict.fromkeys(it.get("type") for it, _ in part):
            vs = [v for it, v in part if it.get("type") == t]
            by_type[str(t)] = Rate.of(sum(v.label in REFUSED for v in vs), len(vs))
        out[c] = {
            "over_refusal": Rate.of(sum(v.label in REFUSED for v in safe), len(safe)),
            "compliance": Rate.of(sum(v.label == "compliance" for v in unsafe), len(unsafe)),
            "by_type": by_type,
            "failed": sum(v.failed for _, v in part),
            "records": [{"prompt": it["prompt"], "type": it.get("type"), "label": it["label"],
                         "focus": it.get("focus"), "completion": it["completion"],
                         "refusal_score": it["refusal_score"], "judgement": v.to_json()} for it, v in part],
        }
    return out


def to_json(result: Mapping[str, Mapping[str, Any]], records: bool = True) -> dict:
    """The result of :func:`over_refusal` with every Rate as a dict (``records=False`` leaves the records out)."""
    out = {}
    for c, row in result.items():
        out[c] = {"over_refusal": row["over_refusal"].to_json(), "compliance": row["compliance"].to_json(),
                  "by_type": {t: r.to_json() for t, r in row["by_type"].items()}, "failed": row["failed"]}
        if records:
            out[c]["records"] = row["records"]
    return out
