"""Stage 1 of a cross-lingual run: every language's train/val/test prompts per kind, drawn from the pools of a
:class:`~refusal.crosslingual.pools.PromptPlan`, translated where a pool needs it (and the translations checked),
with the alignment across languages; ``prompts.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from .. import io
from ..batching import console
from ..config import digest
from ..errors import RefusalError
from ..runs.folder import RunFolder
from .inputs import KINDS, SPLITS, content_sha, original_text
from .pools import PromptPlan

Warn = Callable[[str], None]


def prompts_digest(plan: PromptPlan, translator: Any, quality: Mapping[str, Any]) -> str:
    """What the prompts stage reads: the draw, what is translated and by what (``translator``: its identity), and
    the quality gate (``quality``: ``max_flagged``, ``allow_flagged``) where anything is translated."""
    content = {f"{lang}/{kind}": content_sha(plan.chosen[(lang, kind)]) for lang, kind in plan.pools}
    translated = sorted(f"{lang}/{kind}" for (lang, kind), p in plan.pools.items() if p.translate)
    return digest({"stage": "prompts", "languages": plan.languages, "sizes": plan.sizes, "seed": plan.seed,
                   "content": content, "translated": translated, "translator": translator,
                   "quality": dict(quality) if translated else None})


def prompt_stage(folder: RunFolder, plan: PromptPlan, dig: str, *, backend: Callable[[], Any],
                 quality: Mapping[str, Any], judgement: Mapping[str, dict], warn: Warn, force: bool) -> dict:
    """Every language's train/val/test prompts per kind (translating with ``backend()`` and checking what needs
    it); writes ``prompts.json`` (and ``translations.json``, ``translation_checks.json``). Returns ``prompts.json``.
    ``judgement``: each language's phrase entry, whose confidence, list and note are recorded."""
    if not force and folder.manifest("prompts", dig):
        console.print("[dim]prompts: finished earlier, skipped[/]")
        data = folder.read_json("prompts.json", keys=("prompts",))
        for w in data.get("warnings", []):
            warn(w)
        return data
    started = time.perf_counter()
    seen: list[str] = []

    def note(text: str) -> None:
        seen.append(text)
        warn(text)

    sets: dict[str, dict[str, dict[str, list[dict]]]] = {lang: {} for lang in plan.languages}
    sources: dict[str, dict[str, str]] = {lang: {} for lang in plan.languages}
    todo: dict[str, list[str]] = {}
    for (lang, kind), pool in plan.pools.items():
        if pool.translate:
            todo.setdefault(lang, []).append(kind)
            continue
        sets[lang][kind] = {s: [{"instruction": r["instruction"], "category": r.get("category"),
                                 **({"source_instruction": r["source_instruction"]}
                                    if r.get("source_instruction") is not None else {})} for r in rows]
                            for s, rows in plan.chosen[(lang, kind)].items()}
        sources[lang][kind] = plan.pools[(lang, kind)].origin
    translation = translate(folder, plan, todo, sets, sources, backend, quality, note) if todo else None
    alignment = align(plan, sets, note)
    data = {"languages": plan.languages, "sizes": plan.sizes, "seed": plan.seed, "sources": sources,
            "alignment": alignment, "translation": translation, "warnings": list(dict.fromkeys(seen)),
            "judgement": {lang: {k: v for k, v in ph.items() if k in ("confidence", "list", "note")}
                          for lang, ph in judgement.items()},
            "prompts": sets}
    io.write_json(folder.file("prompts.json"), data)
    folder.write_manifest("prompts", dig, time.perf_counter() - started, ["prompts.json"],
                          {"prompts_sha256": content_sha(sets)})
    return data


def translate(folder: RunFolder, plan: PromptPlan, todo: dict[str, list[str]], sets: dict, sources: dict,
              backend: Callable[[], Any], quality: Mapping[str, Any], warn: Warn) -> dict:
    """Translate the drawn English rows of every (language, kind) in ``todo`` through the folder's cache, check
    every language's translations and stop (after writing the checks) where too many are flagged."""
    from ..translate import TranslationCache, check_translations, require_quality

    max_flagged, allow_flagged = quality["max_flagged"], quality["allow_flagged"]
    cache = TranslationCache(folder.file("translations.json"))
    made = None
    reports, per_language, failures = {}, {}, []
    for lang, kinds in todo.items():
        texts: list[str] = []
        spans = []
        for kind in kinds:
            for s in SPLITS:
                rows = plan.chosen[(lang, kind)][s]
                spans.append((kind, s, rows, len(texts)))
                texts += [r["instruction"] for r in rows]
        made = made or backend()
        console.print(f"Translating {len(texts)} prompts into {lang} with {made.name} (cache {cache.path})")
        got = cache.translate(made, texts, lang)
        for kind, s, rows, start in spans:
            sets[lang].setdefault(kind, {})[s] = [
                {"instruction": t, "category": r.get("category"), "source_instruction": r["instruction"]}
                for r, t in zip(rows, got[start:start + len(rows)])]
            sources[lang][kind] = f"{plan.pools[(lang, kind)].origin} translated by {made.name}"
        report = reports[lang] = check_translations(texts, got, lang)
        per_language[lang] = {"cache_digest": cache.digest(target=lang, backend=made.name, texts=texts),
                              "n": len(texts), "flagged": len(report.flagged),
                              "flagged_share": round(report.flagged_share, 4), "counts": report.counts(),
                              "language_id": report.language_id}
        console.print(report.summary())
        try:
            require_quality(report, max_flagged, allow_flagged)
        except RefusalError as exc:
            failures.append(exc)
        if report.flagged_share > max_flagged and allow_flagged:
            warn(f"{lang}: {report.flagged_share:.1%} of the translations are flagged (above {max_flagged:.1%}); "
                 "going on because flagged translations are allowed.")
    checks = folder.file("translation_checks.json")
    io.write_json(checks, {lang: r.to_dict() for lang, r in reports.items()})
    if failures:
        raise RefusalError(
            f"{' '.join(e.problem for e in failures)} The per-item flags are in {checks}.",
            f"{failures[0].fix} (--max-flagged SHARE raises the allowed share; --allow-flagged goes on anyway; "
            f"fixed entries in {cache.path} are used as they are.)")
    assert made is not None  # made for the first language of todo (never empty here)
    return {"backend": made.name, "cache": "translations.json", "cache_digest": cache.digest(backend=made.name),
            "languages": per_language, "checks": "translation_checks.json"}


def align(plan: PromptPlan, sets: dict, warn: Warn) -> dict[str, str]:
    """Per kind/split: ``verified`` (every language's English original known and equal row by row), ``by index``
    (the same draw from pools of the same size; originals not all known) or ``not aligned: why``."""
    out = {}
    for kind in KINDS:
        for s in SPLITS:
            sizes = {lang: {k: len(v) for k, v in plan.pools[(lang, kind)].rows.items()} for lang in plan.languages}
            origs = {lang: [original_text(r, lang) for r in sets[lang][kind][s]] for lang in plan.languages}
            known = {lang: o for lang, o in origs.items() if all(x is not None for x in o)}
            ref = next(iter(known.values()), None)
            differs = [lang for lang, o in known.items() if o != ref]
            if differs:
                status = f"not aligned: the English originals differ ({', '.join(differs)} vs {next(iter(known))})"
            elif len(set(json.dumps(v, sort_keys=True) for v in sizes.values())) > 1:
                status = "not aligned: the languages' prompt sets differ in size"
            elif len(known) == len(plan.languages):
                status = "verified"
            else:
                status = "by index"
            out[f"{kind}/{s}"] = status
            if status.startswith("not aligned"):
                warn(f"{kind} {s} prompts: {status}. Rates are compared across languages, not items, so the "
                     "transfer matrices still hold; item-level comparisons do not.")
    return out
