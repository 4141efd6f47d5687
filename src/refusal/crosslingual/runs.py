"""The cross-lingual run: prompts per language, one refusal-direction run per language, then transfer, similarity
and plots (see :mod:`refusal.crosslingual` for the stages and the folder layout).

Each language's run is the main pipeline's (:class:`refusal.runs.pipeline.Run` with its four stages) on that
language's prompts in ``<lang>/``, with that language's refusal-opening tokens as the refusal score's tokens, four
conditions (baseline and ablation on the harmful test prompts, baseline and activation addition on the harmless ones)
and one judge: substring matching with the language's own refusal phrases. The model is loaded once, on first need,
and shared by every language and the transfer; a run whose stages have all finished loads nothing. The run's
``data.harmful`` / ``harmless``, ``generate.conditions`` and ``evaluate`` settings are not used: the prompts come from
the cross-lingual sources, the conditions and the judge are the ones above.

:class:`Crosslingual` holds what its inputs' checks produced (:class:`Settings`, a
:class:`~refusal.crosslingual.pools.PromptPlan`, one :class:`~refusal.crosslingual.language_stage.Language` per
language, the run folder) and calls the stages, each a function of those in its own module: :mod:`.prompt_stage`,
:mod:`.openings_stage`, :mod:`.language_stage`, :mod:`.transfer_stage`, :mod:`.similarity` and :mod:`.plots`. Every
stage's manifest is written and read through the :class:`~refusal.runs.folder.RunFolder` of its folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import io
from ..batching import console
from ..config import RunConfig
from ..errors import RefusalError
from ..runs.folder import RunFolder
from ..runs.pipeline import Inputs, Run
from ..translate import Translator
from ..translate.choice import check_translator
from .inputs import language_phrases, parse_files, parse_languages
from .language_stage import Language, language_conditions
from .openings_stage import check_learn_mode, learn_language, learned_entry, needs_learning
from .plots import PLOTS
from .pools import PromptPlan, plan_prompts

__all__ = ["Crosslingual", "CrosslingualResult", "Settings", "crosslingual", "language_conditions"]


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


@dataclass
class Settings:
    """The cross-lingual settings (the ``crosslingual`` section of the run's ``config.yaml``)."""

    polyrefuse: str | None
    paper: str | None
    files: dict[str, dict[str, str]]
    translator: Any  # translates the prompts that need it (None: nothing does)
    phrase_translator: Any  # translates the English phrase list for the languages that learn (None: none)
    max_flagged: float
    allow_flagged: bool
    learn_mode: str

    def to_dict(self, languages: list[str]) -> dict:
        t = self.translator
        return {"languages": languages, "polyrefuse": self.polyrefuse, "paper": self.paper, "files": self.files,
                "translator": None if t is None else (t if isinstance(t, str) else str(t.name)),
                "max_flagged": self.max_flagged, "allow_flagged": self.allow_flagged, "learn_openings": self.learn_mode}


class Crosslingual:
    """A cross-lingual run: every check on its inputs happens in the constructor, before any model is loaded;
    :meth:`run` runs (or resumes) the stages, which are also methods: :meth:`prompts`, :meth:`openings`,
    :meth:`language`, :meth:`transfer`, :meth:`similarity`, :meth:`plots`."""

    PLOTS = PLOTS

    def __init__(self, cfg: RunConfig, languages: str | Sequence[str] | None = None, *,
                 polyrefuse: str | Path | None = None, paper: str | Path | None = None,
                 files: str | Mapping[str, Any] | None = None, translator: Any = None, max_flagged: float = 0.1,
                 allow_flagged: bool = False, out_dir: str | Path | None = None, force: bool = False,
                 echo_warnings: bool = True, learn_openings: str = "missing"):
        from ..models.loading import check_hub_config, resolve_source

        if not 0 <= max_flagged <= 1:
            raise RefusalError(f"--max-flagged must be a share between 0 and 1 (got {max_flagged}).",
                               "For at most 10 % flagged translations give 0.1.")
        self.cfg, self.force, self.echo_warnings = cfg, force, echo_warnings
        self.warnings: list[str] = []  # also printed as they arise, unless echo_warnings is false
        source = resolve_source(cfg.model)
        learn_mode = check_learn_mode(learn_openings)
        polyrefuse, paper = (None if p is None else str(p) for p in (polyrefuse, paper))
        files = parse_files(files)
        d = cfg.data
        self.plan: PromptPlan = plan_prompts(parse_languages(languages), files, polyrefuse, paper,
                                             {"train": d.n_train, "val": d.n_val, "test": d.n_test}, d.seed)
        self.settings = Settings(
            polyrefuse, paper, files,
            translator=check_translator(translator, cfg.model) if self.plan.translating else None,
            # a translator named for the run also translates the English phrase list: a second source of learned lists
            phrase_translator=check_translator(translator, cfg.model)
            if translator is not None and learn_mode != "never" else None,
            max_flagged=float(max_flagged), allow_flagged=bool(allow_flagged), learn_mode=learn_mode)
        self.langs: dict[str, Language] = {}
        for code in self.plan.languages:
            shipped = language_phrases(code)
            self.langs[code] = Language(code, shipped, learns=needs_learning(learn_mode, code, shipped))
        self.dir = Path(out_dir) if out_dir is not None else \
            Path(cfg.output) / (cfg.name or f"{source.alias}-crosslingual")
        if self.dir.exists() and not self.dir.is_dir():
            raise RefusalError(f"The output '{self.dir}' is a file, not a folder.", "Give another --output / --name.")
        self.folder = RunFolder(self.dir)
        check_hub_config(source, cfg.trust_remote_code)  # last: the only check that may touch the network
        self.base = Run(cfg, Inputs(source, {}), folder=self.dir)  # the model every language and the transfer share
        self._learned = False

    @property
    def languages(self) -> list[str]:
        return self.plan.languages

    @property
    def pools(self) -> dict:
        return self.plan.pools

    @property
    def _translating(self) -> bool:
        return self.plan.translating

    def _warn(self, text: str) -> None:
        if text in self.warnings:
            return
        self.warnings.append(text)
        if self.echo_warnings:
            console.print(f"[yellow]Warning:[/] {text}")

    # ---- the stages ------------------------------------------------------------------------------------------------

    def prompts(self) -> dict:
        """Every language's train/val/test prompts per kind (:mod:`.prompt_stage`); returns ``prompts.json``."""
        from ..translate.choice import build_translator, translator_identity
        from .prompt_stage import prompt_stage, prompts_digest

        s, base = self.settings, self.base
        quality = {"max_flagged": s.max_flagged, "allow_flagged": s.allow_flagged}
        dig = prompts_digest(self.plan, translator_identity(s.translator, base.inputs.source,
                                                            self.cfg.trust_remote_code), quality)

        def backend() -> Translator:
            return build_translator(s.translator, lambda: (base.model, base.tokenizer), device=base.device,
                                    dtype=self.cfg.dtype, trust_remote_code=self.cfg.trust_remote_code,
                                    batch_size=base.generate_batch_size)

        data = prompt_stage(self.folder, self.plan, dig, backend=backend, quality=quality,
                            judgement={c: lang.phrases for c, lang in self.langs.items()}, warn=self._warn,
                            force=self.force)
        for code, lang in self.langs.items():
            lang.sets = data["prompts"][code]
        return data

    def _ready(self) -> None:
        """The prompts and learned openings every later stage reads (each run once per process)."""
        if any(lang.sets is None for lang in self.langs.values()):
            self.prompts()
        if not self._learned:
            self.openings()

    def openings(self) -> dict[str, dict]:
        """Learn (or read back) the refusal openings of every language that needs them (:mod:`.openings_stage`),
        once per process; they replace those languages' phrase entries. Returns ``{lang: openings.json}`` for those
        languages."""
        if any(lang.sets is None for lang in self.langs.values()):
            self.prompts()
        learners = {code: lang for code, lang in self.langs.items() if lang.learns}
        if not self._learned:
            for code, lang in learners.items():
                learned = learn_language(code, RunFolder(self.dir / code), lang.prompt_sets, self.base,
                                         translator=self.settings.phrase_translator,
                                         translations=self.folder.file("translations.json"), force=self.force)
                lang.phrases = learned_entry(code, lang.phrases, learned, self._warn)
            self._learned = True
        return {code: RunFolder(self.dir / code).read_json("openings.json") for code in learners}

    def language_config(self, lang: str) -> RunConfig:
        """The config of ``lang``'s run (:func:`.language_stage.language_config`)."""
        from .language_stage import language_config

        self._ready()
        return language_config(self.cfg, self.langs[lang], self.dir)

    def language(self, lang: str) -> dict:
        """Run (or resume) ``lang``'s extract, select, generate and evaluate; returns its ``summary.json``."""
        from .language_stage import run_language

        self._ready()
        return run_language(self.base, self.langs[lang], self.dir, warn=self._warn, force=self.force)

    def transfer(self) -> dict:
        """Every language's direction on every language's test prompts (:mod:`.transfer_stage`)."""
        from .transfer_stage import transfer_stage

        self._ready()
        return transfer_stage(self.base, self.langs, self.folder, warn=self._warn, force=self.force)

    def similarity(self) -> dict:
        """Cosines of the selected directions and the layer curves (:func:`.similarity.similarity_stage`)."""
        from .language_stage import sources
        from .similarity import similarity_stage

        return similarity_stage(self.folder, sources(self.languages, self.dir), force=self.force)

    def plots(self) -> list[Path]:
        from .plots import plot_stage

        return plot_stage(self.folder, force=self.force)

    # ---- everything ------------------------------------------------------------------------------------------------

    def run(self) -> CrosslingualResult:
        """Run or resume every stage, holding the folder's lock; returns the result (also written as
        ``summary.json``)."""
        with self.folder.lock():
            self.dir.mkdir(parents=True, exist_ok=True)
            io.write_yaml(self.folder.config_path,
                          {"crosslingual": self.settings.to_dict(self.languages), **self.cfg.to_dict()})
            prompts = self.prompts()
            self.openings()
            summaries = {lang: self.language(lang) for lang in self.languages}
            transfer = self.transfer()
            similarity = self.similarity()
            plots = self.plots()
            meta = {k: v for k, v in prompts.items() if k != "prompts"}
            io.write_json(self.folder.file("summary.json"), {
                "model": self.cfg.model, "languages": self.languages, "device": self.base.device_name(),
                "dtype": self.base.dtype, "languages_summary": headline(summaries, transfer),
                "warnings": self.warnings,
                "prompts": {k: meta.get(k) for k in ("sources", "alignment", "translation", "sizes", "seed")},
                "files": {"transfer": "transfer.json", "similarity": "similarity.json",
                          "plots": [p.name for p in plots]}})
        return CrosslingualResult(self.dir, self.languages, summaries, transfer, similarity, plots,
                                  list(self.warnings), meta)


def headline(summaries: Mapping[str, dict], transfer: Mapping) -> dict[str, dict]:
    """Each language's headline numbers for the run's ``summary.json``: its own run's rates, or (no direction) its
    baseline rates from the transfer's baseline rows."""
    out = {}
    for lang, s in summaries.items():
        phrases = {"phrase_source": s.get("phrase_source"), "phrase_agreement": s.get("phrase_agreement")}
        if s.get("selected") is None:  # no direction: its baseline comes from the transfer's own rows
            b = transfer["baseline"][lang]
            out[lang] = {"selected": None, "no_direction": s.get("no_direction"),
                         "judgement_confidence": s["judgement_confidence"], **phrases,
                         "harmful_baseline_refusal": _flip(b["harmful_non_refusal"]),
                         "harmless_baseline_refusal": b["harmless_refusal"]}
            continue
        r = s["results"]
        out[lang] = {
            "selected": s["selected"], "judgement_confidence": s["judgement_confidence"], **phrases,
            "harmful_baseline_refusal": r["harmful"]["baseline"]["refusal"],
            "harmful_ablation_non_refusal": r["harmful"]["ablation"]["non_refusal"],
            "harmless_baseline_refusal": r["harmless"]["baseline"]["refusal"],
            "harmless_actadd_refusal": r["harmless"]["actadd"]["refusal"]}
    return out


def _flip(rate: Mapping) -> dict:
    """A non-refusal rate as the refusal rate of the same items (count, rate and interval mirrored)."""
    return {**rate, "count": rate["n"] - rate["count"], "rate": round(1 - rate["rate"], 4),
            "low": round(1 - rate["high"], 4), "high": round(1 - rate["low"], 4)}


def crosslingual(cfg: RunConfig, languages: str | Sequence[str] | None = None, *,
                 polyrefuse: str | Path | None = None, paper: str | Path | None = None,
                 files: str | Mapping[str, Any] | None = None, translator: Any = None, max_flagged: float = 0.1,
                 allow_flagged: bool = False, out_dir: str | Path | None = None,
                 force: bool = False, learn_openings: str = "missing") -> CrosslingualResult:
    """Run (or resume) a cross-lingual study: see :mod:`refusal.crosslingual`.

    ``languages``: codes (default: the languages of ``files`` / ``polyrefuse``, else en fr es de ru zh th sw am).
    Prompts per (language, kind) come from ``files`` (``{"fr": path}`` or ``"fr=path,fr:harmless=path"``), else the
    PolyRefuse-style folder ``polyrefuse`` (English train/val from the paper-style folder ``paper``), else the
    built-in sets (or ``paper``'s, when given alone) translated by ``translator`` (``None``/``"local"``: the run's
    model; ``"google"``; another model spec; or a backend object) through ``out_dir/translations.json``; a language
    with more than ``max_flagged`` of its translations flagged stops the run unless ``allow_flagged``. ``out_dir``
    defaults to ``cfg.output / (cfg.name or <model alias>-crosslingual)``; ``force`` redoes every stage.
    ``learn_openings``: ``missing`` learns refusal tokens and phrases from the model's own contrast for languages
    without a shipped list, ``all`` for every language (shipped lists hidden), ``never`` uses the shipped lists
    (English's where none ships); see :mod:`.openings_stage`."""
    return Crosslingual(cfg, languages, polyrefuse=polyrefuse, paper=paper, files=files, translator=translator,
                        max_flagged=max_flagged, allow_flagged=allow_flagged, out_dir=out_dir, force=force,
                        learn_openings=learn_openings).run()
