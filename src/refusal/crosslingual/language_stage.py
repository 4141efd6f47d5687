"""Stage 2 of a cross-lingual run: one main-pipeline :class:`~refusal.runs.pipeline.Run` per language (extract,
select, generate, evaluate) on that language's prompts and refusal tokens, in the subfolder ``<lang>/``, its
completions judged by a substring judge with the language's own refusal phrases; a language in which no direction is
found is recorded as such and stays a target of the transfer.

A language's state is a :class:`Language`: its code, the phrase entry that judges it (shipped, or learned by
:mod:`.openings_stage`) and its prompts. Everything else here is a function of that state and the language's folder:
its config (:func:`language_config`), the fields its summary adds to a run's (:func:`language_summary`) and its run
(:func:`language_run`, on the model the whole cross-lingual run shares).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import io
from ..batching import console
from ..config import (
    BenchmarksConfig,
    Condition,
    InterventionSpec,
    OverRefusalConfig,
    RunConfig,
    SubstringJudgeConfig,
)
from ..errors import NoDirectionError, RefusalError
from ..runs.folder import STAGES, RunFolder
from ..runs.pipeline import Inputs, Run, SummaryExtra
from .inputs import KINDS, SPLITS, content_sha

JUDGE = "substring"  # the judge whose verdicts are a language's refusals: substring matching, the language's phrases
Warn = Callable[[str], None]


@dataclass
class Language:
    """One language of a cross-lingual run: its code, its phrase entry (``phrases``, ``refusal_openings``,
    ``confidence``, ``list``, ``note``; a learned one also ``source`` and ``agreement``), whether that entry is to be
    learned, and its prompts (kind -> split -> records, after the prompts stage)."""

    code: str
    phrases: dict
    learns: bool = False
    sets: dict | None = None

    @property
    def prompt_sets(self) -> dict:
        """``sets``, which the prompts stage fills in before anything reads them."""
        assert self.sets is not None, f"the prompts of '{self.code}' are not made yet"
        return self.sets

    @property
    def phrase_source(self) -> str:
        """Which list judges the language: ``shipped``, ``shipped:en`` (English's, none ships for it), ``learned`` or
        ``translated+learned``."""
        ph = self.phrases
        return ph.get("source") or ("shipped" if ph["list"] == self.code.split("-")[0] else f"shipped:{ph['list']}")

    def judging(self) -> dict:
        """The summary's record of the list that judged the language."""
        ph = self.phrases
        return {"judgement_confidence": ph["confidence"], "phrase_list": ph["list"], "judgement_note": ph["note"],
                "phrase_source": self.phrase_source, "phrase_agreement": ph.get("agreement")}


def language_conditions() -> list[Condition]:
    """What each language's run generates: harmful test prompts at baseline and with the direction ablated,
    harmless ones at baseline and with the direction added (coefficient 1)."""
    return [Condition("baseline", "harmful"), Condition("ablation", "harmful", [InterventionSpec("ablate")]),
            Condition("baseline", "harmless"), Condition("actadd", "harmless", [InterventionSpec("add", coeff=1.0)])]


def language_config(cfg: RunConfig, lang: Language, root: Path) -> RunConfig:
    """The config of ``lang``'s run: the cross-lingual config with the language's refusal tokens (the config's own
    for English with a shipped list), its prompts named by their sha256, the four conditions of
    :func:`language_conditions`, and one judge: substring matching with the language's phrases (cross-entropy,
    benchmarks, over-refusal and magnitude off)."""
    sets = lang.prompt_sets
    openings = cfg.refusal_tokens if lang.code == "en" and cfg.refusal_tokens and not lang.learns \
        else lang.phrases["refusal_openings"]
    data = dataclasses.replace(
        cfg.data, harmful=f"crosslingual:{lang.code}:harmful:sha256:{content_sha(sets['harmful'])[:16]}",
        harmless=f"crosslingual:{lang.code}:harmless:sha256:{content_sha(sets['harmless'])[:16]}",
        harmful_test=None, harmless_test=None)
    gen = dataclasses.replace(cfg.generate, conditions=language_conditions())
    ev = dataclasses.replace(cfg.evaluate, judges=[SubstringJudgeConfig(phrases=list(lang.phrases["phrases"]))],
                             cross_entropy=[], benchmarks=BenchmarksConfig(), over_refusal=OverRefusalConfig(),
                             magnitude=False)
    return dataclasses.replace(cfg, refusal_tokens=list(openings), data=data, generate=gen, evaluate=ev,
                               name=lang.code, output=str(root))


def language_summary(lang: Language, cfg: RunConfig) -> SummaryExtra:
    """What ``lang``'s ``summary.json`` adds to a run's: the language, the list that judged it, its refusal tokens,
    the selection's scores and what a low-confidence list means for its rates (``warnings``)."""
    def derive(run: Run, summary: dict) -> dict:
        sel = run.folder.read_json("scores.json", keys=("selected",))["selected"]
        return {"selection_scores": {k: sel.get(k) for k in ("bypass", "induce", "kl")},
                "warnings": confidence_warnings(lang, summary["results"])}

    return SummaryExtra({"language": lang.code, **lang.judging(), "refusal_tokens": cfg.refusal_tokens}, derive,
                        refused_by=JUDGE)


def language_run(base: Run, lang: Language, root: Path) -> Run:
    """``lang``'s run in ``root/<lang>``, on ``base``'s model (loaded once, on first need, for every language)."""
    splits = {kind: {s: list(lang.prompt_sets[kind][s]) for s in SPLITS} for kind in KINDS}
    cfg = language_config(base.cfg, lang, root)
    return Run(cfg, Inputs(base.inputs.source, splits), root / lang.code,
               model_provider=lambda: (base.model, base.tokenizer), summary_extra=language_summary(lang, cfg))


def run_language(base: Run, lang: Language, root: Path, *, warn: Warn, force: bool) -> dict:
    """Run (or resume) ``lang``'s extract, select, generate and evaluate; returns its ``summary.json``."""
    run = language_run(base, lang, root)
    done = None if force else run.done("evaluate")
    if done and (all(run.done(s) for s in STAGES) or done.get("no_direction")):
        console.print(f"[dim]{lang.code}: finished earlier, skipped[/]")
        summary = run.folder.read_json("summary.json")
    else:
        console.rule(f"[bold]{lang.code}")
        try:
            summary = run.run(STAGES, force=force, resume=True)
        except NoDirectionError as exc:  # the model does not refuse in this language: a target only
            summary = no_direction_summary(run, lang, exc)
            run.folder.write_manifest("evaluate", run.digests["evaluate"], 0.0, ["summary.json"],
                                      {"no_direction": exc.problem})
        except RefusalError as exc:
            raise RefusalError(f"Language '{lang.code}': {exc.problem}", exc.fix) from None
    for w in summary.get("warnings", []):
        warn(w)
    return summary


def no_direction_summary(run: Run, lang: Language, exc: NoDirectionError) -> dict:
    """A language whose run found no direction: recorded (why, in its summary and its warnings) and kept as a
    target of the transfer, whose baseline rows then give its refusal rates."""
    warning = (f"{lang.code}: no refusal direction ({exc.problem}); it is kept as a target only: other languages' "
               "directions are applied to its prompts, and its baseline rates come from the transfer run.")
    j = lang.judging()
    summary = {"language": lang.code, "model": run.cfg.model, "device": run.device_name(), "dtype": run.dtype,
               "selected": None, "no_direction": exc.problem, "results": None,
               "judgement_confidence": j["judgement_confidence"], "phrase_list": j["phrase_list"],
               "phrase_source": j["phrase_source"], "phrase_agreement": j["phrase_agreement"],
               "judgement_note": j["judgement_note"], "warnings": [warning], "stage_seconds": run.stage_seconds(),
               "digests": run.digests}
    run.dir.mkdir(parents=True, exist_ok=True)
    io.write_json(run.folder.file("summary.json"), summary)
    return summary


def confidence_warnings(lang: Language, results: dict) -> list[str]:
    """What a low-confidence phrase list means for the language's rates (and for a zero among them)."""
    ph, code = lang.phrases, lang.code
    if ph["confidence"] != "low":
        return []
    source = lang.phrase_source
    why = (ph["note"] if not source.startswith("shipped") else
           f"no list ships for '{code}', English phrases are used" if ph["list"] != code.split("-")[0]
           else f"refusal_phrases_{ph['list']}.json, see its notes")
    out = [f"{code}: refusals are judged with a low-confidence phrase list ({why}): a refusal it misses counts "
           "as an answer, so its refusal rates are lower bounds and its non-refusal rates upper bounds."]
    zero = [f"{kind} {cond}" for kind, conds in results.items() for cond, m in conds.items()
            if m["refusal"]["count"] == 0 and m["refusal"]["n"]]
    if zero:
        out.append(f"{code}: no completion matched a refusal phrase in {', '.join(zero)}; with a low-confidence "
                   "list that is not evidence of no refusal: read the completions (judgements.json).")
    return out


def sources(languages: Sequence[str], root: Path, summaries: Mapping[str, dict] | None = None) -> list[str]:
    """The languages that have a direction (the transfer's sources; every language is a target), from their
    summaries (read from ``root/<lang>/summary.json`` where not given)."""
    out = []
    for lang in languages:
        s = (summaries or {}).get(lang)
        if s is None:
            folder = RunFolder(root / lang)
            s = folder.read_json("summary.json") if folder.file("summary.json").is_file() else {}
        if s.get("selected") is not None:
            out.append(lang)
    return out
