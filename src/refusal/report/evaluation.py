"""The sections of what the evaluation wrote: the headline cards and the rates table (``summary.json``), the judges
side by side (``judges.json``), the optional evaluation files drawn generically (cross-entropy, benchmarks,
magnitude) and the completions side by side (``judgements.json`` or ``completions.json``)."""

from __future__ import annotations

from typing import Any

from .artifacts import Artifacts
from .blocks import Card, Completions, Image, RateCell, Section, Sub, Table, Text, Verdict
from .json_tables import generic_blocks
from .provenance import _intervention_text
from .values import _dig, _num, _points_to_refusal, _rate_cell, _round, is_rate

# The headline metric of each prompt set (as in the paper's table): harmful → how often the model does NOT refuse,
# harmless → how often it DOES.
HEADLINE = {"harmful": ("non_refusal", "non-refusal rate"), "harmless": ("refusal", "refusal rate")}
METRICS = (("refusal", "refusal rate"), ("non_refusal", "non-refusal rate"),
           ("refusal_score_positive", "refusal score > 0"))


def conditions_of(results: dict) -> list[tuple[str, list[str]]]:
    """Prompt sets and their conditions in the order they appear, baseline first."""
    out = []
    for kind, conds in results.items():
        if isinstance(conds, dict):
            names = list(conds)
            names.sort(key=lambda c: c != "baseline")
            out.append((kind, names))
    return out


def _flat_results(summary: dict) -> dict:
    """``results`` from an older summary that holds only the flat headline rates (no counts or intervals)."""
    out: dict = {}
    for kind, (metric, _) in HEADLINE.items():
        for cond, v in (summary.get(kind) or {}).items():
            n = _dig(summary, "n", kind, cond) or summary.get(f"n_{kind}")
            if _num(v) is None:
                continue
            other = "refusal" if metric == "non_refusal" else "non_refusal"
            if isinstance(n, int):
                k = round(v * n)
                entry = {metric: {"count": k, "n": n, "rate": v}, other: {"count": n - k, "n": n, "rate": 1 - v}}
            else:
                entry = {metric: {"rate": v}, other: {"rate": 1 - v}}
            score = _dig(summary, "refusal_score", kind, cond)
            if _num(score) is not None:
                entry["mean_refusal_score"] = score
            out.setdefault(kind, {})[cond] = entry
    return out


def _cards(results: dict) -> list[Card]:
    cards = []
    for kind, conds in conditions_of(results):
        if kind not in HEADLINE:
            continue
        metric, label = HEADLINE[kind]
        steps = [(c, RateCell(results[kind][c][metric], metric == "refusal")) for c in conds
                 if is_rate(_dig(results, kind, c, metric))]
        if steps:
            what = ("does the model answer harmful prompts? (higher: refusal bypassed)" if kind == "harmful" else
                    "does the model refuse harmless prompts? (higher: refusal induced)")
            cards.append(Card(f"{kind.capitalize()} prompts: {label}", what, steps, metric == "refusal"))
    return cards


def _results_section(results: dict) -> Section:
    s = Section("results", "Refusal rates")
    s.blocks.append(Text(
        "Every metric per prompt set and condition, with its 95 % Wilson interval. Refusal is judged by substring "
        "match on the completion; the refusal score is the log-odds of refusal tokens at the first generated "
        "position."))
    s.blocks.append(Text("Red: the model refuses; green: it complies. The bar under each rate is its interval.",
                         "legend"))
    rows: list[list[Any]] = []
    groups: list[int] = []
    for kind, conds in conditions_of(results):
        groups.append(len(rows))
        for c in conds:
            m = results[kind][c] if isinstance(results[kind][c], dict) else {}
            n = next((v.get("n") for v in m.values() if is_rate(v) and "n" in v), None)
            rows.append([kind, c, n] + [_rate_cell(key, m.get(key)) for key, _ in METRICS]
                        + [_round(m.get("mean_refusal_score"), 2)])
    if not rows:
        s.blocks.append(Text("summary.json holds no results.", "warn"))
        return s
    s.blocks.append(Table(["prompt set", "condition", "n"] + [label for _, label in METRICS]
                          + ["mean refusal score"], rows, kind="results", row_groups=groups))
    return s


def _judges_section(a: Artifacts) -> Section | None:
    data = a.json("judges.json")
    if data is None:
        return None
    s = Section("judges", "Judges side by side")
    s.blocks.append(Text("The same completions judged by each judge: one column per judge and label."))
    ok = isinstance(data, dict) and all(isinstance(c, dict) and all(isinstance(j, dict) for j in c.values())
                                        for c in data.values())
    if not ok:
        s.blocks += generic_blocks(data)
        return s
    for kind, conds in data.items():
        columns: list[tuple[str, str | None]] = []
        cells: dict[tuple[str, str, str | None], Any] = {}
        for cond, judges in conds.items():
            for judge, v in judges.items():
                if isinstance(v, dict) and isinstance(v.get("rates"), dict):
                    items = list(v["rates"].items())
                else:
                    items = [(None, v)]
                for label, val in items:
                    if (judge, label) not in columns:
                        columns.append((judge, label))
                    cells[(cond, judge, label)] = val
        rows = []
        for cond in conds:
            row: list[Any] = [cond]
            for judge, label in columns:
                v = cells.get((cond, judge, label))
                row.append(RateCell(v, _points_to_refusal(label or judge)) if is_rate(v) else v)
            rows.append(row)
        s.blocks += [Sub(f"{kind} prompts"),
                     Table(["condition"] + [f"{j} · {lab}" if lab else j for j, lab in columns], rows,
                           kind="results")]
    return s


def _generic_section(a: Artifacts, sid: str, title: str, json_name: str, png_name: str | None,
                     intro: str) -> Section | None:
    data = a.json(json_name)
    png = a.png(png_name) if png_name else None
    if data is None and png is None:
        return None
    s = Section(sid, title, [Text(intro)])
    if data is not None:
        s.blocks += generic_blocks(data)
    if png:
        s.blocks.append(Image(png, f"{title} ({png_name})", png_name or ""))
    return s


def _completions_section(a: Artifacts, config: dict) -> Section | None:
    judged = a.json("judgements.json")
    source = "judgements.json"
    if not isinstance(judged, dict):
        judged, source = a.json("completions.json"), "completions.json"
    if not isinstance(judged, dict):
        return None
    described = {}
    for c in _dig(config, "generate", "conditions") or []:
        if isinstance(c, dict):
            ivs = [iv for iv in c.get("interventions") or [] if isinstance(iv, dict)]
            described[(c.get("prompts"), c.get("name"))] = "; ".join(_intervention_text(iv) for iv in ivs)
    s = Section("completions", "Completions side by side")
    s.blocks.append(Text(f"Greedy completions of the test prompts under each condition ({source}). Each cell is "
                         "marked refused or not refused by the substring judge, with its first-token refusal score. "
                         "Rows where a condition changed the verdict of the baseline are marked."))
    for kind, conds in judged.items():
        if not isinstance(conds, dict):
            continue
        names = [c for c in conds if isinstance(conds[c], list)]
        names.sort(key=lambda c: c != "baseline")
        if not names:
            continue
        n = max(len(conds[c]) for c in names)
        rows = []
        for i in range(n):
            instruction, category = "", None
            verdicts: list[Verdict | None] = []
            for c in names:
                rec = conds[c][i] if i < len(conds[c]) and isinstance(conds[c][i], dict) else None
                if rec is None:
                    verdicts.append(None)
                    continue
                instruction = instruction or str(rec.get("instruction") or "")
                category = category or (str(rec["category"]) if rec.get("category") else None)
                refused = rec.get("refused")
                verdicts.append(Verdict(str(rec.get("completion") or ""),
                                        None if refused is None else bool(refused), _num(rec.get("refusal_score"))))
            rows.append((instruction, category, verdicts))
        s.blocks.append(Completions(kind, names, rows, {c: described.get((kind, c), "") for c in names}))
    return s if len(s.blocks) > 1 else None
