"""Stage 1 of a cross-lingual run: every language's train/val/test prompts per kind, drawn from the pools, translated
where a pool needs it (and the translations checked), with the alignment across languages; ``prompts.json``.
"""

from __future__ import annotations

import json
import time

from .. import io
from ..batching import console
from ..config import digest
from ..errors import RefusalError
from ..translate.choice import build_translator, translator_identity
from .inputs import KINDS, SPLITS, content_sha, original_text
from .manifests import Manifests


class PromptStage(Manifests):
    """The prompts stage: :meth:`prompts`, and :attr:`prompt_sets` for the stages after it."""

    @property
    def prompts_digest(self) -> str:
        content = {f"{lang}/{kind}": content_sha(self.chosen[(lang, kind)]) for lang, kind in self.pools}
        translated = sorted(f"{lang}/{kind}" for (lang, kind), p in self.pools.items() if p.translate)
        quality = {"max_flagged": self.max_flagged, "allow_flagged": self.allow_flagged} if translated else None
        translator = translator_identity(self.translator, self.source, self.cfg.trust_remote_code)
        return digest({"stage": "prompts", "languages": self.languages, "sizes": self.sizes, "seed": self.cfg.data.seed,
                       "content": content, "translated": translated, "translator": translator, "quality": quality})

    def prompts(self) -> dict:
        """Every language's train/val/test prompts per kind (translating and checking what needs it); writes
        ``prompts.json`` (and ``translations.json``, ``translation_checks.json``). Returns ``prompts.json``."""
        path, done = self.dir / "prompts.json", self.dir / "prompts.done.json"
        dig = self.prompts_digest
        if self._done(done, dig):
            console.print("[dim]prompts: finished earlier, skipped[/]")
            data = io.read_json(path)
            for w in data.get("warnings", []):
                self._warn(w)
            self._sets = data["prompts"]
            return data
        started = time.perf_counter()
        seen = len(self.warnings)
        sets: dict[str, dict[str, dict[str, list[dict]]]] = {lang: {} for lang in self.languages}
        sources: dict[str, dict[str, str]] = {lang: {} for lang in self.languages}
        todo: dict[str, list[str]] = {}
        for (lang, kind), pool in self.pools.items():
            chosen = self.chosen[(lang, kind)]
            if pool.translate:
                todo.setdefault(lang, []).append(kind)
                continue
            sets[lang][kind] = {s: [{"instruction": r["instruction"], "category": r.get("category"),
                                     **({"source_instruction": r["source_instruction"]}
                                        if r.get("source_instruction") is not None else {})} for r in rows]
                                for s, rows in chosen.items()}
            sources[lang][kind] = pool.origin
        translation = self._translate(todo, sets, sources) if todo else None
        alignment = self._alignment(sets)
        data = {"languages": self.languages, "sizes": self.sizes, "seed": self.cfg.data.seed, "sources": sources,
                "alignment": alignment, "translation": translation, "warnings": self.warnings[seen:],
                "judgement": {lang: {k: v for k, v in ph.items() if k in ("confidence", "list", "note")}
                              for lang, ph in self.phrases.items()},
                "prompts": sets}
        io.write_json(path, data)
        self._finish(done, "prompts", dig, time.perf_counter() - started, ["prompts.json"],
                     {"prompts_sha256": content_sha(sets)})
        self._sets = sets
        return data

    def _translate(self, todo: dict[str, list[str]], sets: dict, sources: dict) -> dict:
        from ..translate import TranslationCache, check_translations, require_quality

        cache = TranslationCache(self.dir / "translations.json")
        backend = None
        name = None
        reports, per_language, failures = {}, {}, []
        for lang, kinds in todo.items():
            texts: list[str] = []
            spans = []
            for kind in kinds:
                for s in SPLITS:
                    rows = self.chosen[(lang, kind)][s]
                    spans.append((kind, s, rows, len(texts)))
                    texts += [r["instruction"] for r in rows]
            if backend is None:
                backend = build_translator(self.translator, lambda: (self.base.model, self.base.tokenizer),
                                           device=self.base.device, dtype=self.cfg.dtype,
                                           trust_remote_code=self.cfg.trust_remote_code,
                                           batch_size=self.base.generate_batch_size)
                name = backend.name
            console.print(f"Translating {len(texts)} prompts into {lang} with {name} (cache {cache.path})")
            got = cache.translate(backend, texts, lang)
            for kind, s, rows, start in spans:
                sets[lang].setdefault(kind, {})[s] = [
                    {"instruction": t, "category": r.get("category"), "source_instruction": r["instruction"]}
                    for r, t in zip(rows, got[start:start + len(rows)])]
                sources[lang][kind] = f"{self.pools[(lang, kind)].origin} translated by {name}"
            report = check_translations(texts, got, lang)
            reports[lang] = report
            per_language[lang] = {"cache_digest": cache.digest(target=lang, backend=name, texts=texts),
                                  "n": len(texts), "flagged": len(report.flagged),
                                  "flagged_share": round(report.flagged_share, 4), "counts": report.counts(),
                                  "language_id": report.language_id}
            console.print(report.summary())
            try:
                require_quality(report, self.max_flagged, self.allow_flagged)
            except RefusalError as exc:
                failures.append(exc)
            if report.flagged_share > self.max_flagged and self.allow_flagged:
                self._warn(f"{lang}: {report.flagged_share:.1%} of the translations are flagged (above "
                           f"{self.max_flagged:.1%}); going on because flagged translations are allowed.")
        checks = self.dir / "translation_checks.json"
        io.write_json(checks, {lang: r.to_dict() for lang, r in reports.items()})
        if failures:
            problem = " ".join(e.problem for e in failures)
            raise RefusalError(
                f"{problem} The per-item flags are in {checks}.",
                f"{failures[0].fix} (--max-flagged SHARE raises the allowed share; --allow-flagged goes on anyway; "
                f"fixed entries in {cache.path} are used as they are.)")
        return {"backend": name, "cache": "translations.json", "cache_digest": cache.digest(backend=name),
                "languages": per_language, "checks": "translation_checks.json"}

    def _alignment(self, sets: dict) -> dict[str, str]:
        """Per kind/split: ``verified`` (every language's English original known and equal row by row), ``by index``
        (the same draw from pools of the same size; originals not all known) or ``not aligned: why``."""
        out = {}
        for kind in KINDS:
            for s in SPLITS:
                sizes = {lang: {k: len(v) for k, v in self.pools[(lang, kind)].rows.items()} for lang in self.languages}
                origs = {lang: [original_text(r, lang) for r in sets[lang][kind][s]] for lang in self.languages}
                known = {lang: o for lang, o in origs.items() if all(x is not None for x in o)}
                ref = next(iter(known.values()), None)
                differs = [lang for lang, o in known.items() if o != ref]
                if differs:
                    status = (f"not aligned: the English originals differ ({', '.join(differs)} vs "
                              f"{next(iter(known))})")
                elif len(set(json.dumps(v, sort_keys=True) for v in sizes.values())) > 1:
                    status = "not aligned: the languages' prompt sets differ in size"
                elif len(known) == len(self.languages):
                    status = "verified"
                else:
                    status = "by index"
                out[f"{kind}/{s}"] = status
                if status.startswith("not aligned"):
                    self._warn(f"{kind} {s} prompts: {status}. Rates are compared across languages, not items, "
                               "so the transfer matrices still hold; item-level comparisons do not.")
        return out

    @property
    def prompt_sets(self) -> dict:
        if self._sets is None:
            self.prompts()
        return self._sets
