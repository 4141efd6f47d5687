"""The cross-lingual run: prompts per language, one refusal-direction run per language, then transfer, similarity
and plots (see :mod:`refusal.crosslingual` for the stages and the folder layout).

Each language's run is the main pipeline's (:class:`refusal.runs.pipeline.Run` with its extract, select and generate
stages) on that language's prompts, with that language's refusal-opening tokens as the refusal score's tokens and
four conditions: baseline and ablation on the harmful test prompts, baseline and activation addition on the harmless
ones; its evaluate stage judges the completions with the language's own refusal phrases. The model is loaded once,
on first need, and shared by every language and the transfer; a run whose stages have all finished loads nothing.
The run's ``data.harmful`` / ``harmless`` and ``generate.conditions`` settings are not used: the prompts come from the
cross-lingual sources, and the conditions are the four above.

The run is :class:`Crosslingual`, its stages mixed in from one module each: :mod:`.pools` (input checks),
:mod:`.prompt_stage`, :mod:`.openings_stage`, :mod:`.language_stage`, :mod:`.transfer_stage`,
:mod:`.similarity_stage` and :mod:`.plot_stage`, on the shared state and manifests of :mod:`.manifests`. This
module holds the constructor, which sets that state, and :meth:`Crosslingual.run`, which runs every stage and
writes ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import io
from ..config import RunConfig
from ..errors import RefusalError
from ..runs.pipeline import Inputs, Run
from ..translate.choice import check_translator
from .inputs import choose_splits, language_phrases, parse_files, parse_languages
from .language_stage import PER_LANGUAGE_STAGES, language_conditions
from .openings_stage import check_learn_mode
from .plot_stage import PlotStage
from .pools import PromptPools
from .similarity_stage import SimilarityStage
from .transfer_stage import TransferStage

__all__ = ["PER_LANGUAGE_STAGES", "Crosslingual", "CrosslingualResult", "crosslingual", "language_conditions"]


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

class Crosslingual(PromptPools, TransferStage, SimilarityStage, PlotStage):
    """A cross-lingual run: every check on its inputs happens in the constructor, before any model is loaded;
    :meth:`run` runs (or resumes) the stages, which are also methods: :meth:`prompts`, :meth:`language`,
    :meth:`transfer`, :meth:`similarity`, :meth:`plots`."""

    def __init__(self, cfg: RunConfig, languages: str | Sequence[str] | None = None, *,
                 polyrefuse: str | Path | None = None, paper: str | Path | None = None,
                 files: str | Mapping[str, Any] | None = None, translator: Any = None, max_flagged: float = 0.1,
                 allow_flagged: bool = False, out_dir: str | Path | None = None, force: bool = False,
                 echo_warnings: bool = True, learn_openings: str = "missing"):
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
        self.learn_mode = check_learn_mode(learn_openings)
        self._openings_ready = False
        self.languages = self._languages(parse_languages(languages))
        self.phrases = {lang: language_phrases(lang) for lang in self.languages}
        d = cfg.data
        self.sizes = {"train": d.n_train, "val": d.n_val, "test": d.n_test}
        self.pools = self._pools()
        self.chosen = {key: choose_splits(pool, self.sizes, d.seed, f"{key[1]} {key[0]}")
                       for key, pool in self.pools.items()}
        self.translator = check_translator(translator, self.cfg.model) if self._translating else None
        # a translator named for the run also translates the English phrase list: a second source of learned lists
        self.phrase_translator = check_translator(translator, self.cfg.model) \
            if translator is not None and self.learn_mode != "never" else None
        self.dir = Path(out_dir) if out_dir is not None else \
            Path(cfg.output) / (cfg.name or f"{self.source.alias}-crosslingual")
        if self.dir.exists() and not self.dir.is_dir():
            raise RefusalError(f"The output '{self.dir}' is a file, not a folder.", "Give another --output / --name.")
        check_hub_config(self.source, cfg.trust_remote_code)  # last: the only check that may touch the network
        self.base = Run(cfg, Inputs(self.source, {}), folder=self.dir)
        self.warnings: list[str] = []  # also printed as they arise, unless echo_warnings is false
        self.echo_warnings = echo_warnings
        self._sets: dict | None = None

    # ---- everything ------------------------------------------------------------------------------------------------

    def settings(self) -> dict:
        t = self.translator
        return {"languages": self.languages, "polyrefuse": self.polyrefuse, "paper": self.paper, "files": self.files,
                "translator": None if t is None else (t if isinstance(t, str) else str(t.name)),
                "max_flagged": self.max_flagged, "allow_flagged": self.allow_flagged,
                "learn_openings": self.learn_mode}

    def run(self) -> CrosslingualResult:
        """Run or resume every stage; returns the result (also written as ``summary.json``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        io.write_yaml(self.dir / "config.yaml", {"crosslingual": self.settings(), **self.cfg.to_dict()})
        prompts = self.prompts()
        self.openings()
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
                                  "judgement_confidence": s["judgement_confidence"], **_phrases(s),
                                  "harmful_baseline_refusal": _flip(b["harmful_non_refusal"]),
                                  "harmless_baseline_refusal": b["harmless_refusal"]}
                continue
            r = s["results"]
            headline[lang] = {
                "selected": s["selected"], "judgement_confidence": s["judgement_confidence"], **_phrases(s),
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


def _phrases(summary: Mapping) -> dict:
    """Which list judged a language and its measured agreement (a learned list's), for the headline."""
    return {"phrase_source": summary.get("phrase_source"), "phrase_agreement": summary.get("phrase_agreement")}


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
