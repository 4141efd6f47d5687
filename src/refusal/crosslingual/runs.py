"""The cross-lingual run: prompts per language, one refusal-direction run per language, then transfer, similarity
and plots (see :mod:`refusal.crosslingual` for the stages and the folder layout).

Each language's run is the main pipeline's (:class:`refusal.runs.pipeline.Run` with its extract, select and generate
stages) on that language's prompts, with that language's refusal-opening tokens as the refusal score's tokens and
four conditions: baseline and ablation on the harmful test prompts, baseline and activation addition on the harmless
ones; its evaluate stage judges the completions with the language's own refusal phrases. The model is loaded once,
on first need, and shared by every language and the transfer; a run whose stages have all finished loads nothing.
The run's ``data.harmful`` / ``harmless`` and ``generate.conditions`` settings are not used: the prompts come from the
cross-lingual sources, and the conditions are the four above.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import io
from ..batching import console
from ..config import Condition, InterventionSpec, RunConfig, digest
from ..errors import NoDirectionError, RefusalError
from ..runs.pipeline import Inputs, Run
from ..translate.choice import build_translator, check_translator, translator_identity
from .inputs import (
    DEFAULT_LANGUAGES,
    KINDS,
    LANGUAGE_CODE,
    SPLITS,
    Pool,
    choose_splits,
    content_sha,
    direction_sha,
    file_sha,
    language_phrases,
    original_text,
    own_completions_sha,
    parse_files,
    parse_languages,
)

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


@dataclass
class CrosslingualResult:
    out_dir: Path
    languages: list[str]
    summaries: dict[str, dict]  # per language: its summary.json
    transfer: dict  # transfer.json
    similarity: dict  # similarity.json
    plots: list[Path]
    warnings: list[str] = field(default_factory=list)
    prompts: dict = field(default_factory=dict)  # prompts.json without the prompts: sources, alignment, translation


# ---- the run -------------------------------------------------------------------------------------------------

class Crosslingual:
    """A cross-lingual run: every check on its inputs happens in the constructor, before any model is loaded;
    :meth:`run` runs (or resumes) the stages, which are also methods: :meth:`prompts`, :meth:`language`,
    :meth:`transfer`, :meth:`similarity`, :meth:`plots`."""

    def __init__(self, cfg: RunConfig, languages: str | Sequence[str] | None = None, *,
                 polyrefuse: str | Path | None = None, paper: str | Path | None = None,
                 files: str | Mapping[str, Any] | None = None, translator: Any = None, max_flagged: float = 0.1,
                 allow_flagged: bool = False, out_dir: str | Path | None = None, force: bool = False,
                 echo_warnings: bool = True):
        from ..models.loading import check_hub_config, resolve_source

        if not 0 <= max_flagged <= 1:
            raise RefusalError(f"--max-flagged must be a share between 0 and 1 (got {max_flagged}).",
                               "For at most 10 % flagged translations give 0.1.")
        self.cfg = cfg
        self.source = resolve_source(cfg.model)
        self.polyrefuse = None if polyrefuse is None else str(polyrefuse)
        self.paper = None if paper is None else str(paper)
        self.files = parse_files(files)
        self.max_flagged, self.allow_flagged, self.force = float(max_flagged), bool(allow_flagged), force
        self.languages = self._languages(parse_languages(languages))
        self.phrases = {lang: language_phrases(lang) for lang in self.languages}
        d = cfg.data
        self.sizes = {"train": d.n_train, "val": d.n_val, "test": d.n_test}
        self.pools = self._pools()
        self.chosen = {key: choose_splits(pool, self.sizes, d.seed, f"{key[1]} {key[0]}")
                       for key, pool in self.pools.items()}
        self.translator = check_translator(translator, self.cfg.model) if self._translating else None
        self.dir = Path(out_dir) if out_dir is not None else \
            Path(cfg.output) / (cfg.name or f"{self.source.alias}-crosslingual")
        if self.dir.exists() and not self.dir.is_dir():
            raise RefusalError(f"The output '{self.dir}' is a file, not a folder.", "Give another --output / --name.")
        check_hub_config(self.source, cfg.trust_remote_code)  # last: the only check that may touch the network
        self.base = Run(cfg, Inputs(self.source, {}), folder=self.dir)
        self.warnings: list[str] = []  # also printed as they arise, unless echo_warnings is false
        self.echo_warnings = echo_warnings
        self._sets: dict | None = None

    # ---- input checks -----------------------------------------------------------------------------------------

    def _languages(self, given: list[str] | None) -> list[str]:
        if given is None:
            found = set(self.files)
            if self.polyrefuse is not None:
                found |= self._polyrefuse_languages()
            if found:
                from .plots import resource_order

                given = resource_order(sorted(found))[0]
            else:
                given = list(DEFAULT_LANGUAGES)
        extra = sorted(set(self.files) - set(given))
        if extra:
            raise RefusalError(f"--files gives prompts for {', '.join(extra)}, which --languages leaves out.",
                               "Add those languages to --languages, or drop their files.")
        if len(given) < 2:
            raise RefusalError(f"A cross-lingual run needs at least two languages (got {', '.join(given)}).",
                               "Give two or more, e.g. --languages en,fr.")
        return given

    def _polyrefuse_languages(self) -> set[str]:
        root = Path(self.polyrefuse).expanduser()
        if not root.is_dir():
            raise RefusalError(f"The multilingual prompt folder '{self.polyrefuse}' does not exist.",
                               "Point --polyrefuse to a folder laid out like PolyRefuse (harmful_train_fr.json, ...).")
        found = set()
        for k in KINDS:
            for s in SPLITS:
                found |= {p.stem[len(f"{k}_{s}_"):].lower() for p in root.glob(f"{k}_{s}_*.json")}
        found = {lang for lang in found if LANGUAGE_CODE.fullmatch(lang)}
        if self.paper is not None:
            found.add("en")
        if not found:
            raise RefusalError(f"The folder '{self.polyrefuse}' has no <kind>_<split>_<lang>.json files.",
                               "Lay it out like PolyRefuse (harmful_train_fr.json, harmless_test_de.json, ...).")
        return found

    def _english_pool(self, kind: str) -> Pool:
        """What translations start from: the paper-style folder when one is given, else the built-in set."""
        from ..data.sources import builtin, load_source

        if self.paper is not None and self.polyrefuse is None:
            src = load_source(self.paper, kind)
            if src.is_split and set(src.splits) != set(SPLITS):
                missing = ", ".join(f"{kind}_{s}.json" for s in SPLITS if s not in src.splits)
                raise RefusalError(f"The English folder '{self.paper}' lacks {missing}.",
                                   "Add the file(s), or leave --paper out to start from the built-in sets.")
            return Pool(src.splits, f"{self.paper} ({kind})")
        return Pool({"all": builtin(kind)}, f"builtin:{kind}")

    def _pools(self) -> dict[tuple[str, str], Pool]:
        from ..data.multilingual import load_polyrefuse, load_records

        pools: dict[tuple[str, str], Pool] = {}
        for lang, kinds in self.files.items():
            for kind, path in kinds.items():
                pools[(lang, kind)] = Pool({"all": load_records(path)}, str(path))
        rest = [(lang, kind) for lang in self.languages for kind in KINDS if (lang, kind) not in pools]
        if self.polyrefuse is not None:
            # languages the folder has are read from it; the others are translated from its English rows
            have = self._polyrefuse_languages()
            by_kinds: dict[tuple[str, ...], list[str]] = {}
            for lang in self.languages:
                kinds = tuple(k for k in KINDS if (lang, k) in rest)
                if kinds:
                    by_kinds.setdefault(kinds, []).append(lang if lang in have else f"+{lang}")
            for kinds, langs in by_kinds.items():
                read = [lang for lang in langs if not lang.startswith("+")]
                new = [lang[1:] for lang in langs if lang.startswith("+")]
                ms = load_polyrefuse(self.polyrefuse, sorted(set(read) | ({"en"} if new else set())), kinds=kinds,
                                     english=self.paper)
                for lang in read + ["en"] * bool(new):
                    for kind in kinds:
                        where = ms.origin[f"{lang}/{kind}/test"]
                        pool = Pool({s: ms.get(lang, kind, s) for s in SPLITS},
                                     str(Path(where).parent / f"{kind}_*_{lang}.json"))
                        if lang in read:
                            pools[(lang, kind)] = pool
                        for other in new:  # translated item by item from the folder's English: aligned rows
                            pools[(other, kind)] = dataclasses.replace(pool, translate=True)
        else:
            for lang, kind in rest:
                english = self._english_pool(kind)
                pools[(lang, kind)] = dataclasses.replace(english, translate=lang.split("-")[0] != "en")
        return pools

    @property
    def _translating(self) -> bool:
        return any(p.translate for p in self.pools.values())

    # ---- manifests ----------------------------------------------------------------------------------------------

    def _done(self, path: Path, dig: str) -> bool:
        if self.force or not path.is_file():
            return False
        return io.read_json(path).get("digest") == dig

    @staticmethod
    def _finish(path: Path, stage: str, dig: str, seconds: float, outputs: list[str], extra: dict | None = None):
        io.write_json(path, {"stage": stage, "digest": dig, "seconds": round(seconds, 2),
                             "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "outputs": outputs, **(extra or {})})

    def _warn(self, text: str) -> None:
        if text in self.warnings:
            return
        self.warnings.append(text)
        if self.echo_warnings:
            console.print(f"[yellow]Warning:[/] {text}")

    # ---- stage 1: prompts ------------------------------------------------------------------------------------------

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

    # ---- stage 2: one run per language -----------------------------------------------------------------------------

    def language_config(self, lang: str) -> RunConfig:
        """The config of ``lang``'s run: the cross-lingual config with the language's refusal tokens, its prompts
        named by their sha256, and the four conditions of :func:`language_conditions`."""
        sets = self.prompt_sets[lang]
        openings = self.cfg.refusal_tokens if lang == "en" and self.cfg.refusal_tokens else \
            self.phrases[lang]["refusal_openings"]
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

    def _confidence_warnings(self, lang: str, results: dict) -> list[str]:
        ph = self.phrases[lang]
        if ph["confidence"] != "low":
            return []
        why = (f"no list ships for '{lang}', English phrases are used" if ph["list"] != lang.split("-")[0]
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
            "refusal_tokens": run.cfg.refusal_tokens, "warnings": warnings,
            "max_new_tokens": self.cfg.generate.max_new_tokens, "stage_seconds": run.stage_seconds(),
            "digests": run.digests}
        io.write_json(run.dir / "summary.json", summary)
        return summary

    # ---- stage 3: transfer ---------------------------------------------------------------------------------------

    def _transfer_digest(self, judging: bool = True) -> str:
        """What the transfer reads; ``judging=False`` leaves out the phrase lists, which only the judging reads (a
        changed list re-judges the saved completions instead of generating them again)."""
        def tests(lang):
            return content_sha({k: self.prompt_sets[lang][k]["test"] for k in KINDS})

        sources = self.sources()
        inputs = {lang: {"direction": direction_sha(self.dir / lang / "direction.safetensors") if lang in sources
                         else None,
                         "own_completions": own_completions_sha(self.dir / lang), "test_prompts": tests(lang),
                         "refusal_tokens": self.language_config(lang).refusal_tokens,
                         **({"phrases": content_sha(self.phrases[lang]["phrases"])} if judging else {})}
                  for lang in self.languages}
        g = self.cfg.generate
        return digest({"stage": "transfer" if judging else "transfer-generation", "languages": self.languages,
                       "inputs": inputs, "max_new_tokens": g.max_new_tokens, "system_prompt": self.cfg.system_prompt})

    def transfer(self) -> dict:
        """Every language's direction on every language's test prompts; writes ``transfer.json`` and
        ``transfer_completions.json``. Returns ``transfer.json``. When only the phrase lists changed since it
        finished, the saved completions are judged again (no model, no generation)."""
        from ..directions.base import Direction
        from ..scoring.refusal import refusal_token_ids
        from .transfer import generate_transfer, score_transfer

        path, done_path = self.dir / "transfer.json", self.dir / "transfer.done.json"
        dig, gen_dig = self._transfer_digest(), self._transfer_digest(judging=False)
        if self._done(done_path, dig):
            console.print("[dim]transfer: finished earlier, skipped[/]")
            return io.read_json(path)
        if self._rejudgeable(done_path, gen_dig):
            return self._rejudge(dig, gen_dig)
        console.rule("[bold]transfer")
        started = time.perf_counter()
        langs = self.languages
        sources = self.sources()
        if not sources:
            raise NoDirectionError("No language has a refusal direction, so there is nothing to transfer.",
                                   "Check each language's summary.json (no_direction) and the selection filters.")
        dirs = {lang: Direction.load(self.dir / lang / "direction.safetensors") for lang in sources}
        tests = {lang: {k: self.prompt_sets[lang][k]["test"] for k in KINDS} for lang in langs}  # = splits.json's
        harmful = {lang: self.base.prompts(tests[lang]["harmful"]) for lang in langs}
        harmless = {lang: self.base.prompts(tests[lang]["harmless"]) for lang in langs}

        partial_path = self.dir / "transfer.partial.json"
        partial = io.read_json(partial_path) if partial_path.exists() else {}
        saved = {int(k): v for k, v in partial.get("rows", {}).items()} if partial.get("digest") == gen_dig else {}
        if saved:
            console.print(f"Resuming the transfer generation: {len(saved)} completions were saved earlier")

        def save(rows, texts):
            saved.update(zip(rows, texts))
            io.write_json(partial_path, {"digest": gen_dig, "rows": {str(k): v for k, v in saved.items()}})

        g = self.cfg.generate
        comps = generate_transfer(self.base.model, self.base.tokenizer, langs, dirs, harmful, harmless,
                                  max_new_tokens=g.max_new_tokens, batch_size=self.base.generate_batch_size,
                                  static_cache=g.static_cache, skip={(lang, lang) for lang in langs}, done=saved,
                                  on_batch=save)
        n_generated = len(comps)
        rids = {lang: refusal_token_ids(self.base.tokenizer, self.language_config(lang).refusal_tokens)
                for lang in langs}
        scores = score_transfer(self.base.model, self.base.tokenizer, langs, dirs, harmful, harmless, rids,
                                batch_size=self.base.score_batch_size)
        out = self._judge_transfer(comps, scores, {
            "languages": langs, "sources": sources,
            "no_direction": [lang for lang in langs if lang not in sources],
            "rows": "source language (whose direction is applied; null rows: no direction)",
            "columns": "target language (whose test prompts are used)",
            "n_test": {lang: {"harmful": len(harmful[lang]), "harmless": len(harmless[lang])} for lang in langs},
            "directions": {lang: {"layer": d.layer, "pos": d.pos} for lang, d in dirs.items()},
            "generation": {"rows_generated": n_generated, "generate_calls": 1 if n_generated else 0,
                           "max_new_tokens": g.max_new_tokens,
                           "diagonal": "each language's own run (<lang>/completions.json: ablation, actadd)"}})
        partial_path.unlink(missing_ok=True)
        self._finish(done_path, "transfer", dig, time.perf_counter() - started,
                     ["transfer.json", "transfer_completions.json"], {"generation_digest": gen_dig})
        return out

    def _rejudgeable(self, done_path: Path, gen_dig: str) -> bool:
        return (not self.force and done_path.is_file() and (self.dir / "transfer.json").is_file()
                and (self.dir / "transfer_completions.json").is_file()
                and io.read_json(done_path).get("generation_digest") == gen_dig)

    def _rejudge(self, dig: str, gen_dig: str) -> dict:
        """The finished transfer's completions judged with the current phrase lists; its first-token scores kept."""
        from .transfer import saved_completions

        started = time.perf_counter()
        old = io.read_json(self.dir / "transfer.json")
        comps = saved_completions(io.read_json(self.dir / "transfer_completions.json"))
        scores = {k: old[k] for k in ("ablation_kl", "ablation_refusal_score", "addition_refusal_score")}
        scores["baseline_scores"] = {lang: {k: v for k, v in b.items() if k.endswith("_refusal_score")}
                                     for lang, b in old["baseline"].items()}
        keep = ("languages", "sources", "no_direction", "rows", "columns", "n_test", "directions", "generation")
        out = self._judge_transfer(comps, scores, {k: old[k] for k in keep})
        console.print("[dim]transfer: phrase lists changed since it finished; its completions judged again[/]")
        self._finish(self.dir / "transfer.done.json", "transfer", dig, time.perf_counter() - started,
                     ["transfer.json", "transfer_completions.json"], {"generation_digest": gen_dig, "rejudged": True})
        return out

    def _judge_transfer(self, comps: dict, scores: dict, head: dict) -> dict:
        """``transfer.json`` from the generated completions (plus each language's own run as the diagonal) and the
        first-token scores; writes it and ``transfer_completions.json``."""
        from .transfer import TRANSFER_METRICS, transfer_matrices

        langs = self.languages
        for lang in head["sources"]:  # the diagonal: each language's own run
            own = io.read_json(self.dir / lang / "completions.json")
            for kind, cond in (("harmful", "ablation"), ("harmless", "actadd")):
                for i, r in enumerate(own[kind][cond]):
                    comps[(kind, lang, lang, i)] = r["completion"]
        confidence = {lang: self.phrases[lang]["confidence"] for lang in langs}
        mats, judged = transfer_matrices(langs, comps, {lang: self.phrases[lang]["phrases"] for lang in langs},
                                         confidence)
        baseline = {}
        own_baseline = mats.pop("baseline_rows")  # languages without a direction: baseline rows of this generation
        for lang in langs:
            if lang in own_baseline:
                baseline[lang] = {**own_baseline[lang], **scores["baseline_scores"][lang]}
                continue
            res = io.read_json(self.dir / lang / "summary.json")["results"]
            baseline[lang] = {"harmful_non_refusal": {**res["harmful"]["baseline"]["non_refusal"],
                                                      "judgement_confidence": confidence[lang]},
                              "harmless_refusal": {**res["harmless"]["baseline"]["refusal"],
                                                   "judgement_confidence": confidence[lang]},
                              **scores["baseline_scores"][lang]}
        low = [lang for lang in langs if confidence[lang] == "low"]
        warnings = [f"Columns {', '.join(low)}: refusals judged with low-confidence phrase lists; their refusal rates "
                    "are lower bounds and non-refusal rates upper bounds."] if low else []
        for w in warnings:
            self._warn(w)
        out = {
            **{k: v for k, v in head.items() if k != "generation"},
            **mats,
            "ablation_kl": scores["ablation_kl"], "ablation_refusal_score": scores["ablation_refusal_score"],
            "addition_refusal_score": scores["addition_refusal_score"], "baseline": baseline,
            "judgement_confidence": confidence, "warnings": warnings, "generation": head["generation"],
            "metrics": TRANSFER_METRICS}
        io.write_json(self.dir / "transfer_completions.json", judged)
        io.write_json(self.dir / "transfer.json", out)
        return out

    # ---- stage 4: similarity -------------------------------------------------------------------------------------

    @property
    def reference(self) -> str:
        """The language the layer curves compare with: English, else the first by resource level."""
        from .plots import resource_order

        sources = self.sources()
        return "en" if "en" in sources else resource_order(sources)[0][0]

    def similarity(self) -> dict:
        """Cosine matrix of the selected directions and the layer curves; writes ``similarity.json``."""
        from ..directions.base import Direction
        from ..directions.diff_means import Candidates
        from .similarity import candidate_similarity, direction_similarity, layer_curves

        path, done_path = self.dir / "similarity.json", self.dir / "similarity.done.json"
        langs = self.sources()  # cosines between the languages that have a direction
        inputs = {lang: {"direction": direction_sha(self.dir / lang / "direction.safetensors"),
                         "candidates": file_sha(self.dir / lang / "candidates.safetensors")} for lang in langs}
        dig = digest({"stage": "similarity", "languages": langs, "reference": self.reference, "inputs": inputs})
        if self._done(done_path, dig):
            console.print("[dim]similarity: finished earlier, skipped[/]")
            return io.read_json(path)
        started = time.perf_counter()
        dirs = {lang: Direction.load(self.dir / lang / "direction.safetensors") for lang in langs}
        cands = {lang: Candidates.load(self.dir / lang / "candidates.safetensors") for lang in langs}
        ref = dirs[self.reference]
        out = direction_similarity(dirs)
        out["layer_curves"] = layer_curves(cands, self.reference, ref.pos)
        out["at_reference_candidate"] = {"reference": self.reference, "pos": ref.pos, "layer": ref.layer,
                                         "cosine": candidate_similarity(cands, ref.pos, ref.layer)}
        io.write_json(path, out)
        self._finish(done_path, "similarity", dig, time.perf_counter() - started, ["similarity.json"])
        return out

    # ---- stage 5: plots --------------------------------------------------------------------------------------------

    PLOTS = ("transfer_ablation.png", "transfer_addition.png", "transfer_kl.png", "similarity.png",
             "layer_similarity.png")

    def plots(self) -> list[Path]:
        from .plots import plot_all

        done_path = self.dir / "plots.done.json"
        dig = digest({"stage": "plots", "transfer": file_sha(self.dir / "transfer.json"),
                      "similarity": file_sha(self.dir / "similarity.json")})
        paths = [self.dir / p for p in self.PLOTS]
        if self._done(done_path, dig) and all(p.is_file() for p in paths):
            console.print("[dim]plots: finished earlier, skipped[/]")
            return paths
        started = time.perf_counter()
        paths = plot_all(self.dir, io.read_json(self.dir / "transfer.json"), io.read_json(self.dir / "similarity.json"))
        self._finish(done_path, "plots", dig, time.perf_counter() - started, [p.name for p in paths])
        return paths

    # ---- everything ------------------------------------------------------------------------------------------------

    def settings(self) -> dict:
        t = self.translator
        return {"languages": self.languages, "polyrefuse": self.polyrefuse, "paper": self.paper, "files": self.files,
                "translator": None if t is None else (t if isinstance(t, str) else str(t.name)),
                "max_flagged": self.max_flagged, "allow_flagged": self.allow_flagged}

    def run(self) -> CrosslingualResult:
        """Run or resume every stage; returns the result (also written as ``summary.json``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        io.write_yaml(self.dir / "config.yaml", {"crosslingual": self.settings(), **self.cfg.to_dict()})
        prompts = self.prompts()
        summaries = {lang: self.language(lang) for lang in self.languages}
        transfer = self.transfer()
        similarity = self.similarity()
        plots = self.plots()
        meta = {k: v for k, v in prompts.items() if k != "prompts"}
        headline = {}
        for lang, s in summaries.items():
            if s.get("selected") is None:  # no direction: its baseline comes from the transfer's own rows
                b = transfer["baseline"][lang]
                headline[lang] = {"selected": None, "no_direction": s.get("no_direction"),
                                  "judgement_confidence": s["judgement_confidence"],
                                  "harmful_baseline_refusal": _flip(b["harmful_non_refusal"]),
                                  "harmless_baseline_refusal": b["harmless_refusal"]}
                continue
            r = s["results"]
            headline[lang] = {
                "selected": s["selected"], "judgement_confidence": s["judgement_confidence"],
                "harmful_baseline_refusal": r["harmful"]["baseline"]["refusal"],
                "harmful_ablation_non_refusal": r["harmful"]["ablation"]["non_refusal"],
                "harmless_baseline_refusal": r["harmless"]["baseline"]["refusal"],
                "harmless_actadd_refusal": r["harmless"]["actadd"]["refusal"]}
        io.write_json(self.dir / "summary.json", {
            "model": self.cfg.model, "languages": self.languages, "device": self.base.device_name(),
            "dtype": self.base.dtype, "languages_summary": headline, "warnings": self.warnings,
            "prompts": {k: meta.get(k) for k in ("sources", "alignment", "translation", "sizes", "seed")},
            "files": {"transfer": "transfer.json", "similarity": "similarity.json",
                      "plots": [p.name for p in plots]}})
        return CrosslingualResult(self.dir, self.languages, summaries, transfer, similarity, plots,
                                  list(self.warnings), meta)


def _flip(rate: Mapping) -> dict:
    """A non-refusal rate as the refusal rate of the same items (count, rate and interval mirrored)."""
    return {**rate, "count": rate["n"] - rate["count"], "rate": round(1 - rate["rate"], 4),
            "low": round(1 - rate["high"], 4), "high": round(1 - rate["low"], 4)}


def crosslingual(cfg: RunConfig, languages: str | Sequence[str] | None = None, *,
                 polyrefuse: str | Path | None = None, paper: str | Path | None = None,
                 files: str | Mapping[str, Any] | None = None, translator: Any = None, max_flagged: float = 0.1,
                 allow_flagged: bool = False, out_dir: str | Path | None = None,
                 force: bool = False) -> CrosslingualResult:
    """Run (or resume) a cross-lingual study: see :mod:`refusal.crosslingual`.

    ``languages``: codes (default: the languages of ``files`` / ``polyrefuse``, else en fr es de ru zh th sw am).
    Prompts per (language, kind) come from ``files`` (``{"fr": path}`` or ``"fr=path,fr:harmless=path"``), else the
    PolyRefuse-style folder ``polyrefuse`` (English train/val from the paper-style folder ``paper``), else the
    built-in sets (or ``paper``'s, when given alone) translated by ``translator`` (``None``/``"local"``: the run's
    model; ``"google"``; another model spec; or a backend object) through ``out_dir/translations.json``; a language
    with more than ``max_flagged`` of its translations flagged stops the run unless ``allow_flagged``. ``out_dir``
    defaults to ``cfg.output / (cfg.name or <model alias>-crosslingual)``; ``force`` redoes every stage."""
    return Crosslingual(cfg, languages, polyrefuse=polyrefuse, paper=paper, files=files, translator=translator,
                        max_flagged=max_flagged, allow_flagged=allow_flagged, out_dir=out_dir, force=force).run()
