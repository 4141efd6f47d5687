"""Stage 2 of a cross-lingual run: one main-pipeline run per language (extract, select, generate) on that language's
prompts and refusal tokens, then its evaluate stage, which judges the completions with the language's own refusal
phrases; a language in which no direction is found is recorded as such and stays a target of the transfer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

from .. import io
from ..batching import console
from ..config import Condition, InterventionSpec, RunConfig, digest
from ..errors import NoDirectionError, RefusalError
from ..runs.pipeline import Inputs, Run
from .inputs import KINDS, SPLITS, content_sha
from .openings_stage import OpeningsStage

PER_LANGUAGE_STAGES = ("extract", "select", "generate")


def language_conditions() -> list[Condition]:
    """What each language's run generates: harmful test prompts at baseline and with the direction ablated,
    harmless ones at baseline and with the direction added (coefficient 1)."""
    return [Condition("baseline", "harmful"), Condition("ablation", "harmful", [InterventionSpec("ablate")]),
            Condition("baseline", "harmless"), Condition("actadd", "harmless", [InterventionSpec("add", coeff=1.0)])]


class _LanguageRun(Run):
    """A main-pipeline run on one language's prompts, sharing the cross-lingual run's model."""

    def __init__(self, base: Run, cfg: RunConfig, inputs: Inputs, folder: Path):
        super().__init__(cfg, inputs, folder)
        self.base = base

    @property
    def model(self):
        return self.base.model

    @property
    def tokenizer(self):
        return self.base.tokenizer


class LanguageStage(OpeningsStage):
    """The per-language runs: :meth:`language` for one language, :meth:`sources` for the languages with a direction."""

    def language_config(self, lang: str) -> RunConfig:
        """The config of ``lang``'s run: the cross-lingual config with the language's refusal tokens, its prompts
        named by their sha256, and the four conditions of :func:`language_conditions`."""
        self.openings()  # learned refusal openings replace the language's tokens and phrases first
        sets = self.prompt_sets[lang]
        openings = self.cfg.refusal_tokens if lang == "en" and self.cfg.refusal_tokens and \
            not self.needs_learning(lang) else self.phrases[lang]["refusal_openings"]
        data = dataclasses.replace(
            self.cfg.data, harmful=f"crosslingual:{lang}:harmful:sha256:{content_sha(sets['harmful'])[:16]}",
            harmless=f"crosslingual:{lang}:harmless:sha256:{content_sha(sets['harmless'])[:16]}", harmful_test=None,
            harmless_test=None)
        gen = dataclasses.replace(self.cfg.generate, conditions=language_conditions())
        return dataclasses.replace(self.cfg, refusal_tokens=list(openings), data=data, generate=gen, name=lang,
                                   output=str(self.dir))

    def language_run(self, lang: str) -> _LanguageRun:
        sets = self.prompt_sets[lang]
        splits = {kind: {s: list(sets[kind][s]) for s in SPLITS} for kind in KINDS}
        return _LanguageRun(self.base, self.language_config(lang), Inputs(self.source, splits), self.dir / lang)

    def _evaluate_digest(self, run: _LanguageRun, lang: str) -> str:
        ph = self.phrases[lang]
        return digest({"stage": "evaluate", "after": run.digests["evaluate"], "phrases": ph["phrases"],
                       "confidence": ph["confidence"]})

    def language(self, lang: str) -> dict:
        """Run (or resume) ``lang``'s extract, select, generate and evaluate; returns its ``summary.json``."""
        run = self.language_run(lang)
        ev_done, ev_dig = run.dir / "evaluate.done.json", self._evaluate_digest(run, lang)
        if not self.force and self._done(ev_done, ev_dig) and (
                all(run.done(s) for s in PER_LANGUAGE_STAGES) or io.read_json(ev_done).get("no_direction")):
            console.print(f"[dim]{lang}: finished earlier, skipped[/]")
            summary = io.read_json(run.dir / "summary.json")
            for w in summary.get("warnings", []):
                self._warn(w)
            return summary
        console.rule(f"[bold]{lang}")
        try:
            run.run(PER_LANGUAGE_STAGES, force=self.force, resume=True)
        except NoDirectionError as exc:  # the model does not refuse in this language: a target only
            return self._no_direction(run, lang, exc, ev_done, ev_dig)
        except RefusalError as exc:
            raise RefusalError(f"Language '{lang}': {exc.problem}", exc.fix) from None
        started = time.perf_counter()
        summary = self._evaluate(run, lang)
        self._finish(ev_done, "evaluate", ev_dig, time.perf_counter() - started, ["judgements.json", "summary.json"])
        return summary

    def _no_direction(self, run: _LanguageRun, lang: str, exc: NoDirectionError, done: Path, dig: str) -> dict:
        """A language whose run found no direction: recorded (why, in its summary and the run's warnings) and kept
        as a target of the transfer, whose baseline rows then give its refusal rates."""
        ph = self.phrases[lang]
        warning = (f"{lang}: no refusal direction ({exc.problem}); it is kept as a target only: other languages' "
                   "directions are applied to its prompts, and its baseline rates come from the transfer run.")
        self._warn(warning)
        summary = {"language": lang, "model": self.cfg.model, "device": run.device_name(), "dtype": run.dtype,
                   "selected": None, "no_direction": exc.problem, "results": None,
                   "judgement_confidence": ph["confidence"], "phrase_list": ph["list"],
                   "phrase_source": self.phrase_source(lang), "phrase_agreement": ph.get("agreement"),
                   "judgement_note": ph["note"], "warnings": [warning], "stage_seconds": run.stage_seconds(),
                   "digests": run.digests}
        run.dir.mkdir(parents=True, exist_ok=True)
        io.write_json(run.dir / "summary.json", summary)
        self._finish(done, "evaluate", dig, 0.0, ["summary.json"], {"no_direction": exc.problem})
        return summary

    def sources(self, summaries: Mapping[str, dict] | None = None) -> list[str]:
        """The languages that have a direction (the transfer's sources; every language is a target)."""
        out = []
        for lang in self.languages:
            s = (summaries or {}).get(lang)
            if s is None:
                p = self.dir / lang / "summary.json"
                s = io.read_json(p) if p.is_file() else {}
            if s.get("selected") is not None:
                out.append(lang)
        return out

    def phrase_source(self, lang: str) -> str:
        """Which list judges ``lang``: ``shipped``, ``shipped:en`` (English's, none ships for it), ``learned`` or
        ``translated+learned``."""
        ph = self.phrases[lang]
        return ph.get("source") or ("shipped" if ph["list"] == lang.split("-")[0] else f"shipped:{ph['list']}")

    def _confidence_warnings(self, lang: str, results: dict) -> list[str]:
        ph = self.phrases[lang]
        if ph["confidence"] != "low":
            return []
        source = self.phrase_source(lang)
        why = (ph["note"] if not source.startswith("shipped") else
               f"no list ships for '{lang}', English phrases are used" if ph["list"] != lang.split("-")[0]
               else f"refusal_phrases_{ph['list']}.json, see its notes")
        out = [f"{lang}: refusals are judged with a low-confidence phrase list ({why}): a refusal it misses counts "
               "as an answer, so its refusal rates are lower bounds and its non-refusal rates upper bounds."]
        zero = [f"{kind} {cond}" for kind, conds in results.items() for cond, m in conds.items()
                if m["refusal"]["count"] == 0 and m["refusal"]["n"]]
        if zero:
            out.append(f"{lang}: no completion matched a refusal phrase in {', '.join(zero)}; with a low-confidence "
                       "list that is not evidence of no refusal: read the completions (judgements.json).")
        return out

    def _evaluate(self, run: _LanguageRun, lang: str) -> dict:
        from ..evaluation.substring import judge
        from ..evaluation.summary import summarize

        ph = self.phrases[lang]
        comps = io.read_json(run.dir / "completions.json")
        judged = {kind: {cond: judge(recs, ph["phrases"]) for cond, recs in conds.items()}
                  for kind, conds in comps.items()}
        io.write_json(run.dir / "judgements.json", judged)
        kl_path = run.dir / "kl.json"  # each condition's first-token KL on the harmless prompts (generate)
        s = summarize(judged, io.read_json(kl_path) if kl_path.is_file() else None)
        scores = io.read_json(run.dir / "scores.json")
        sel = scores["selected"]
        warnings = self._confidence_warnings(lang, s["results"])
        for w in warnings:
            self._warn(w)
        summary = {
            "language": lang, "model": self.cfg.model, "device": run.device_name(), "dtype": run.dtype,
            "selected": {"pos": sel["pos"], "layer": sel["layer"]},
            "selection_scores": {k: sel.get(k) for k in ("bypass", "induce", "kl")}, **s,
            "judgement_confidence": ph["confidence"], "phrase_list": ph["list"], "judgement_note": ph["note"],
            "phrase_source": self.phrase_source(lang), "phrase_agreement": ph.get("agreement"),
            "refusal_tokens": run.cfg.refusal_tokens, "warnings": warnings,
            "max_new_tokens": self.cfg.generate.max_new_tokens, "stage_seconds": run.stage_seconds(),
            "digests": run.digests}
        io.write_json(run.dir / "summary.json", summary)
        return summary
