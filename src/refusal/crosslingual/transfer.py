"""Transfer of refusal directions across languages: the direction of language A (row, "source") applied to the
prompts of language B (column, "target").

* ``ablation_non_refusal[A][B]``: share of B's harmful test prompts answered without refusal while A's direction is
  ablated (projected out at every layer and site), judged with B's refusal phrases;
* ``addition_refusal[A][B]``: share of B's harmless test prompts refused while A's direction is added (coefficient 1,
  at its own layer), judged with B's phrases;
* ``ablation_kl[A][B]``: mean first-token KL(baseline || ablated) on B's harmless test prompts (how much ablating A's
  direction disturbs ordinary answers in B), and ``ablation_refusal_score`` / ``addition_refusal_score``: mean
  first-token refusal score (with B's refusal tokens) on B's harmful / harmless prompts under each intervention.

The completions of every pair come from one :func:`~refusal.generation.batched.generate` call: each row of the
batch carries its own intervention through a per-row :class:`~refusal.interventions.Plan`, so rows of all pairs share
batches. The first-token scores come from :func:`~refusal.scoring.plans.score_interventions`, every source's
direction's ablation and addition the candidates, once per target language.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from ..evaluation.stats import Rate
from ..evaluation.substring import is_refusal
from ..generation.batched import generate
from ..interventions import Intervention, Plan, ablation, addition

Row = tuple[str, str, str, int]  # (kind, source, target, prompt index)
BASELINE = "-"  # the source of a row without intervention (a target language that has no direction of its own)
# what each matrix of transfer.json holds (written into it)
TRANSFER_METRICS = {
    "ablation_non_refusal": "share of the target's harmful test prompts answered without refusal, the source's "
                            "direction ablated at every layer (substring judge, target's phrases; Wilson 95 % "
                            "interval)",
    "addition_refusal": "share of the target's harmless test prompts refused, the source's direction added at its "
                        "layer with coefficient 1",
    "ablation_kl": "mean KL(baseline || ablated) of the first generated token's distribution on the target's harmless "
                   "test prompts",
    "ablation_refusal_score": "mean first-token refusal score (target's refusal tokens) on the target's harmful "
                              "prompts, direction ablated",
    "addition_refusal_score": "mean first-token refusal score on the target's harmless prompts, direction added"}


def transfer_rows(languages: Sequence[str], directions: Mapping, harmful: Mapping[str, Sequence[str]],
                  harmless: Mapping[str, Sequence[str]], skip: Collection[tuple[str, str]] = ()
                  ) -> tuple[list[Row], list[str], list[list[Intervention]]]:
    """Every (source, target) pair's rows: ``(rows, prompts, per_row_interventions)``. Sources are the languages
    with a direction in ``directions``; every language is a target. Harmful rows of target B carry the ablation of
    A's direction, harmless rows its addition; pairs in ``skip`` are left out. A language without a direction also
    gets baseline rows (source ``BASELINE``, no intervention): it has no run of its own to take them from. One
    intervention object per source and operator, so the plan lowers each once."""
    sources = [s for s in languages if s in directions]
    ab = {s: [ablation(directions[s])] for s in sources}
    ad = {s: [addition(directions[s], 1.0)] for s in sources}
    rows: list[Row] = []
    prompts: list[str] = []
    per_row: list[list[Intervention]] = []
    pairs = [(s, t, ab[s], ad[s]) for s in sources for t in languages if (s, t) not in skip]
    pairs += [(BASELINE, t, [], []) for t in languages if t not in directions]
    for s, t, ab_s, ad_s in pairs:
        for kind, texts, ivs in (("harmful", harmful[t], ab_s), ("harmless", harmless[t], ad_s)):
            for i, p in enumerate(texts):
                rows.append((kind, s, t, i))
                prompts.append(p)
                per_row.append(ivs)
    return rows, prompts, per_row


def generate_transfer(model: Any, tokenizer: Any, languages: Sequence[str], directions: Mapping,
                      harmful: Mapping[str, Sequence[str]], harmless: Mapping[str, Sequence[str]], *,
                      max_new_tokens: int, batch_size: int, static_cache: bool | str = False,
                      skip: Collection[tuple[str, str]] = (), done: Mapping[int, str] | None = None,
                      on_batch: Callable[[list[int], list[str]], None] | None = None) -> dict[Row, str]:
    """Greedy completions of every pair's rows in one batched generation (rows already in ``done``, by index into
    :func:`transfer_rows`' list, are not generated again; ``on_batch(rows, texts)`` after every batch)."""
    rows, prompts, per_row = transfer_rows(languages, directions, harmful, harmless, skip)
    out = dict(done or {})
    todo = [i for i in range(len(rows)) if i not in out]
    if todo:
        def save(batch_rows: list[int], texts: list[str], _scores: list[float | None]) -> None:
            for i, t in zip(batch_rows, texts):
                out[i] = t
            if on_batch is not None:
                on_batch(list(batch_rows), list(texts))

        generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                 static_cache=static_cache, fallback=True, plan=Plan.rows(model, per_row), rows=todo, on_batch=save,
                 description=f"Transfer: {len([x for x in languages if x in directions])} directions x "
                             f"{len(languages)} languages")
    return {row: out[i] for i, row in enumerate(rows)}


def score_transfer(model: Any, tokenizer: Any, languages: Sequence[str], directions: Mapping,
                   harmful: Mapping[str, Sequence[str]], harmless: Mapping[str, Sequence[str]],
                   refusal_ids: Mapping[str, Sequence[int]], *, batch_size: int = 64) -> dict:
    """First-token matrices ``[source][target]``: ``ablation_kl`` (mean KL on the target's harmless prompts, with the
    n), ``ablation_refusal_score`` (mean on its harmful prompts) and ``addition_refusal_score`` (mean on its
    harmless prompts); and the targets' baseline mean refusal scores.

    One :func:`~refusal.scoring.plans.score_interventions` call per target language (its refusal tokens differ):
    its harmful and harmless prompts together, every source's ablation and addition as candidates."""
    from ..scoring.plans import score_interventions

    n = len(languages)
    sources = [i for i, s in enumerate(languages) if s in directions]  # matrix rows of the others stay None
    candidates = ([[ablation(directions[languages[i]])] for i in sources]
                  + [[addition(directions[languages[i]], 1.0)] for i in sources])
    m = len(sources)
    kl: list[list[dict | None]] = [[None] * n for _ in range(n)]
    bypass: list[list[dict | None]] = [[None] * n for _ in range(n)]
    induce: list[list[dict | None]] = [[None] * n for _ in range(n)]
    baseline: dict[str, dict] = {}
    for j, t in enumerate(languages):
        ful, less = list(harmful[t]), list(harmless[t])
        res = score_interventions(model, tokenizer, ful + less, candidates, list(refusal_ids[t]),
                                  batch_size=batch_size, description=f"Transfer scores on {t}")
        h, b = slice(0, len(ful)), slice(len(ful), len(ful) + len(less))
        for c, i in enumerate(sources):
            kl[i][j] = {"mean": round(float(res.kl[c, b].mean()), 6), "n": len(less)}
            bypass[i][j] = {"mean": round(float(res.refusal[c, h].mean()), 4), "n": len(ful)}
            induce[i][j] = {"mean": round(float(res.refusal[m + c, b].mean()), 4), "n": len(less)}
        baseline[t] = {"harmful_refusal_score": round(float(res.baseline[h].mean()), 4),
                       "harmless_refusal_score": round(float(res.baseline[b].mean()), 4)}
    return {"ablation_kl": kl, "ablation_refusal_score": bypass, "addition_refusal_score": induce,
            "baseline_scores": baseline}


def saved_completions(judged: Mapping[str, Mapping[str, Sequence[Mapping]]]) -> dict[Row, str]:
    """The completions of a finished transfer, read back from ``transfer_completions.json`` (``judged`` of
    :func:`transfer_matrices`), keyed as :func:`generate_transfer` returns them, to be judged again."""
    comps: dict[Row, str] = {}
    for pair, kinds in judged.items():
        s, t = pair.split(">")
        for kind, rows in kinds.items():
            for r in rows:
                comps[(kind, s or BASELINE, t, r["index"])] = r["completion"]
    return comps


def transfer_matrices(languages: Sequence[str], completions: Mapping[Row, str], phrases: Mapping[str, Sequence[str]],
                      confidence: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """Judge every completion with its target language's phrases; returns ``(matrices, judged)``.

    ``matrices`` holds ``ablation_non_refusal`` and ``addition_refusal``, each ``[source][target]`` →
    ``{"count", "n", "rate", "low", "high", "judgement_confidence"}`` (Wilson 95 % interval); ``judged`` maps each
    ``"source>target"`` pair to its kinds' completions with ``refused``."""
    confidence = confidence or {}
    counts: dict[tuple[str, str, str], list[int]] = {}
    judged: dict[str, dict[str, list[dict]]] = {}
    for (kind, s, t, i), text in sorted(completions.items(), key=lambda kv: kv[0]):
        refused = is_refusal(text, phrases[t])
        c = counts.setdefault((kind, s, t), [0, 0])
        c[0] += int(refused if kind == "harmless" else not refused)
        c[1] += 1
        judged.setdefault(f"{s}>{t}", {}).setdefault(kind, []).append(
            {"index": i, "completion": text, "refused": refused})

    sources = {s for (_, s, _) in counts}

    def cell(kind: str, s: str, t: str) -> dict | None:
        if s not in sources:  # a language without a direction is a target only
            return None
        k, n = counts.get((kind, s, t), (0, 0))
        return {**Rate.of(k, n).to_json(), "judgement_confidence": confidence.get(t, "unknown")}

    mats = {"ablation_non_refusal": [[cell("harmful", s, t) for t in languages] for s in languages],
            "addition_refusal": [[cell("harmless", s, t) for t in languages] for s in languages],
            "baseline_rows": {t: {"harmful_non_refusal": cell("harmful", BASELINE, t),
                                  "harmless_refusal": cell("harmless", BASELINE, t)}
                              for t in languages if BASELINE in sources and (("harmful", BASELINE, t) in counts)}}
    return mats, judged
