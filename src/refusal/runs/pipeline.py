"""A run folder and the stage graph behind ``refusal run``: extract → select → generate → evaluate.

Each stage reads the config keys it needs (``refusal.config.STAGE_KEYS``) and the artifacts of the stages before it,
writes its own files, and last a ``<stage>.done.json`` manifest with its digest: a hash of its config keys and of
the digests of the stages it reads from (and, for extract, of the model's identity and the resolved dtype). A stage
counts as finished only when its manifest holds the current digest, so changing ``generate.max_new_tokens`` redoes
generate and evaluate but not extract and select, and a run killed at any moment resumes where it stopped. The
stages themselves are in :mod:`refusal.runs.stages`. Run folder layout::

    runs/<name>/
      config.yaml                resolved config (with each stage's digest)
      splits.json                the prompts of every split, after filtering         (extract)
      candidates.safetensors     harmful and harmless means, (positions, layers, d)   (extract)
      scores.json, scores.png    bypass / induce / KL for every candidate; "selected":
                                 the selection, stored only here                      (select)
      direction.safetensors      the selected vector, refers to scores.json (sha256)  (select)
      directions.safetensors     the ranked set "0", "1", ... (rank 0 = the selection)  (select)
      completions.json           completions and refusal scores per condition        (generate)
      judgements.json            per-prompt refusal judgements                       (evaluate)
      summary.json               rates per prompt set x condition x metric; its
                                 "selected" (pos, layer) is derived from scores.json  (evaluate)
      sets.safetensors           the set `refusal sets` saved ("set"), with its
                                 manifest sets.done.json; sets.json, sets.png: its
                                 last search                                          (sets)

The selection has one owner, ``scores.json``; read it, the selected direction and every named direction through
:class:`RunFolder` (``selection()``, ``selected_direction()``, ``directions()``). ``refusal sets`` never writes
select's files: its manifest records the extract and select manifests it read, so a select run again makes the saved
set stale, and a stage that used ``set`` is redone when the saved set changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .. import io
from ..batching import console
from ..config import RunConfig, digest, resolve, stage_config
from ..data import load_source, make_splits
from ..errors import RefusalError
from ..models.loading import ModelSource, check_hub_config, default_device, load_model, parse_dtype, resolve_source
from ..scoring.refusal import refusal_token_ids
from ..templates import format_prompts
from .folder import (
    STAGES,
    Destination,
    RunFolder,
    check_network,
    path_name,
    unnamed_destinations,
    widening_settings,
    with_values,
)

__all__ = ["STAGES", "Inputs", "ModelProvider", "Run", "RunFolder", "SummaryExtra", "check_inputs",
           "check_plan"]


@dataclass
class Inputs:
    """Everything checked before a model is loaded."""

    source: ModelSource
    splits: dict[str, dict[str, list[dict]]]  # kind -> split -> records


ModelProvider = Callable[[], tuple[Any, Any]]  # () -> (model, tokenizer): a model the run uses but does not own


@dataclass(frozen=True)
class SummaryExtra:
    """What a caller adds to a run's ``summary.json`` (evaluate writes it whole, once: nothing patches it after).

    ``fields``: fixed fields; they are part of evaluate's digest, so a change redoes evaluate. ``derive``: fields
    computed from the finished summary (e.g. warnings about its rates), given the run and the summary. ``refused_by``:
    the configured judge whose verdicts are the summary's ``refused`` (None: the paper's,
    :func:`~refusal.evaluation.summary.paper_judge`). Neither may replace a field the summary has."""

    fields: Mapping[str, Any] = field(default_factory=dict)
    derive: Callable[[Run, dict], Mapping[str, Any]] | None = None
    refused_by: str | None = None

    def key(self) -> dict[str, Any]:
        """What evaluate's digest covers of it (empty: nothing added, the digest as a plain run's)."""
        return {k: v for k, v in (("fields", dict(self.fields)), ("refused_by", self.refused_by)) if v}

    def add_to(self, run: Run, summary: dict) -> dict:
        extra = {**self.fields, **(self.derive(run, summary) if self.derive else {})}
        clash = sorted(set(extra) & set(summary))
        if clash:
            raise ValueError(f"summary extras would replace the summary's own {', '.join(clash)}")
        return {**summary, **extra}

def check_inputs(cfg: RunConfig) -> Inputs:
    """Validate the model spec and datasets, and build the splits, in seconds and without loading a model."""
    source = resolve_source(cfg.model)
    check_plan(cfg, source)
    d = cfg.data
    sizes = {"train": d.n_train, "val": d.n_val, "test": d.n_test}
    splits = {}
    for kind, spec, test in (("harmful", d.harmful, d.harmful_test), ("harmless", d.harmless, d.harmless_test)):
        src = load_source(spec, kind)
        test_src = load_source(test, kind) if test else None
        splits[kind] = make_splits(src, sizes, d.seed, kind, test_src)
    if cfg.select.keep_refusal:  # every category to keep must exist in the data the directions come from
        from ..directions.categories import check_categories

        check_categories(cfg.select.keep_refusal, splits["harmful"]["train"])
    check_hub_config(source, cfg.trust_remote_code)  # last: the only check that may touch the network
    return Inputs(source, splits)


def model_layers(source: ModelSource) -> int | None:
    """The number of decoder layers, read without loading weights (a folder's config.json, the catalog entry);
    None where that would need more (a hub model, a GGUF file)."""
    import json

    if source.kind == "catalog":
        from ..models import catalog

        return int(catalog.get(source.path).layers)
    if source.kind != "folder":
        return None
    try:
        c = json.loads((Path(source.path) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    for d in (c, c.get("text_config") or {}, c.get("language_config") or {}):
        n = d.get("num_hidden_layers") or d.get("n_layer") or d.get("num_layers")
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_plan(cfg: RunConfig, source: ModelSource) -> None:
    """What the conditions name, checked against what extract and select will produce, before any model loads:
    every direction name, and every listed layer against the model's depth (from its config.json)."""
    from ..config import METHODS

    names = {"selected", "set", *(str(i) for i in range(16))}
    if "inlp" in cfg.extract.methods:
        names |= {"inlp", "inlp_first"}
    if cfg.select.keep_refusal:
        names.add("kept")
    n_layers = model_layers(source)
    for c in cfg.generate.conditions:
        for iv in c.interventions:
            if iv.direction not in names:
                raise RefusalError(
                    f"Condition '{c.name}' ({c.prompts}) names the direction '{iv.direction}', which this run will "
                    "not have.", "Directions are: selected, 0-15 (by rank), set (after `refusal sets`), kept (with "
                    "select.keep_refusal)"
                    + (", inlp, inlp_first" if "inlp" in cfg.extract.methods else
                       f" (and inlp, inlp_first with extract.methods: {list(METHODS)})") + ".")
            layers = iv.layers
            listed = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else \
                list(layers) if isinstance(layers, (list, tuple)) else []
            bad = [la for la in listed if not isinstance(la, int) or (n_layers is not None and not 0 <= la < n_layers)
                   or la < 0]
            if bad:
                depth = f"the model has {n_layers} layers (0-{n_layers - 1})" if n_layers else "layers count from 0"
                raise RefusalError(f"Condition '{c.name}' ({c.prompts}) lists layer(s) {bad}, but {depth}.",
                                   "Give layers the model has, or all, source, or {top: p}.")


class Run:
    """A run folder for one model and config, and the stages that fill it.

    ``model_provider``: where the model and tokenizer come from when this run does not own them (called once, on
    first need; e.g. another run's, shared by several runs); default: loaded from ``cfg.model``. ``summary_extra``:
    fields added to ``summary.json`` (:class:`SummaryExtra`)."""

    def __init__(self, cfg: RunConfig, inputs: Inputs | None = None, folder: str | Path | None = None, *,
                 model_provider: ModelProvider | None = None, summary_extra: SummaryExtra | None = None):
        self.cfg = cfg = _absolute_paths(cfg)
        self.inputs = inputs or check_inputs(cfg)
        self.dir = Path(folder) if folder is not None else Path(cfg.output) / (cfg.name or self.inputs.source.alias)
        self.folder = RunFolder(self.dir)
        # settings the saved config asked for but this invocation did not grant (trust_remote_code): recorded as
        # saved (digests, config.yaml), not obeyed (see Run.open)
        self.recorded: dict[tuple, object] = {}
        self._verified: set[str] = set()  # finished stages whose artifacts matched their checksums
        # network destinations the saved config names and this invocation did not (see Run.open): checked for the
        # stages that will run, before any of them starts
        self.unnamed_network: list[Destination] = []
        self.allow_network = True
        self._model = None
        self._tok = None
        self.model_provider = model_provider
        self.summary_extra = summary_extra or SummaryExtra()
        self.device = cfg.device or default_device()
        self.dtype = str(parse_dtype(cfg.dtype, self.device)).replace("torch.", "")
        self.load_seconds = 0.0
        self._digests: dict[str, str] | None = None

    @classmethod
    def open(cls, folder: str | Path, overrides: dict | None = None, *, force: bool = False,
             from_stage: str | None = None, allow_network: bool = False,
             model_provider: ModelProvider | None = None) -> Run:
        """The run in an existing folder, with its saved config (``overrides``: settings to change, e.g. from flags;
        only the stages that read them, and the ones after, are redone).

        The saved ``config.yaml`` is checked first (:meth:`RunFolder.read_config`; with neither ``force`` nor a
        ``from_stage`` early enough, it must reproduce its saved digests). ``trust_remote_code`` is taken from
        ``overrides`` only: a saved config that asks for it is reported and recorded, not obeyed. Likewise a network
        destination the saved config names (a hub id, a judge's or ``generate.backend: openai``'s URL) is used only
        if ``overrides`` name the same value or ``allow_network``; otherwise a :class:`RefusalError` before any work
        (the model and data sets here, a stage's own destinations when :meth:`run` is about to run it).
        ``model_provider``: as for the constructor."""
        rf = RunFolder(folder)
        saved = rf.read_config(complete=not force)
        rf.check_digests(saved, force=force, from_stage=from_stage)
        saved = {k: v for k, v in saved.items() if k not in ("digests", "digest")}
        overrides = overrides or {}
        granted = bool(overrides.get("trust_remote_code"))
        asked = widening_settings(saved)
        recorded: dict[tuple, object] = {}
        if asked and not granted:
            recorded = {p: True for p in asked}
            saved = with_values(saved, {p: False for p in asked})
            console.print(f"[yellow]Warning:[/] {rf.config_path} asks for trust_remote_code "
                          f"({', '.join(path_name(p) for p in asked)}): not obeyed. A saved config cannot allow code "
                          "from a model's folder or the hub to run; pass --trust-remote-code (trust_remote_code=True) "
                          "if you trust that code.")
        elif asked and granted:  # the user grants it now: every part of the run may use it
            saved = with_values(saved, {p: True for p in asked})
        try:
            base = resolve(None, _nested_merge(saved, overrides), has_gpu=None)
        except RefusalError as exc:
            raise RefusalError(f"{exc.problem} (in {rf.config_path} or the flags)", exc.fix) from None
        unnamed = unnamed_destinations(base.to_dict(), overrides)
        check_network(rf, [d for d in unnamed if d.stage is None], allow_network)  # before check_inputs reads them
        run = cls(base, folder=rf.path, model_provider=model_provider)
        run.unnamed_network, run.allow_network = [d for d in unnamed if d.stage is not None], allow_network
        if "trust_remote_code" not in overrides:
            run.recorded = recorded
        else:
            run.recorded = {p: v for p, v in recorded.items() if p != ("trust_remote_code",)}
        return run

    def recorded_config(self) -> dict:
        """The config as the run records it (config.yaml, digests): settings the saved file asked for but this
        invocation did not grant stay as saved."""
        return with_values(self.cfg.to_dict(), self.recorded) if self.recorded else self.cfg.to_dict()

    # ---- digests and manifests -----------------------------------------------------------------------------------

    @property
    def digests(self) -> dict[str, str]:
        """Each stage's digest: its config keys, its inputs' digests, (extract) the model's identity and dtype, and
        (evaluate) what :attr:`summary_extra` fixes."""
        if self._digests is None:
            from ..models.identity import model_identity

            out: dict[str, str] = {}
            prev: str | None = None
            recorded = self.recorded_config()
            for stage in STAGES:
                own = stage_config(recorded, stage)
                if stage == "extract":
                    own = {**own, "model_identity": model_identity(self.inputs.source, self.cfg.trust_remote_code),
                           "dtype": self.dtype}
                if stage == "evaluate" and self.summary_extra.key():
                    own = {**own, "summary_extra": self.summary_extra.key()}
                prev = out[stage] = digest({"stage": stage, "config": own, "after": prev})
            self._digests = out
        return self._digests

    def prepare(self, force: bool = False, resume: bool = False) -> None:
        """Create the folder, or check an existing one: a folder made with another config is refused unless
        ``resume`` (keep the stages whose digests still match, redo the rest) or ``force`` (redo everything)."""
        cfg_path = self.folder.config_path
        if cfg_path.exists() and not (force or resume):
            old = self.folder.read_config(complete=False).get("digests") or {}
            stale = [s for s in STAGES if old.get(s) != self.digests[s]]
            if stale and any((self.dir / f"{s}.done.json").exists() for s in stale):
                raise RefusalError(
                    f"The run folder '{self.dir}' was made with another config (stages {', '.join(stale)} would "
                    "change).",
                    f"Pass --resume {self.dir} to redo only those stages, --force to redo everything, or --name / "
                    "--output for another folder.")
        io.write_yaml(cfg_path, {"digests": self.digests, **self.recorded_config()})

    def done(self, stage: str) -> dict | None:
        """``stage``'s manifest if it finished for the current digests (and, where it used the direction ``set``,
        for the set `refusal sets` saves now: a set saved again, or made stale by a new select, redoes it)."""
        name = f"{stage}.done.json"
        if not self.folder.file(name).exists():
            return None
        m = self.folder.read_json(name)
        if m.get("digest") != self.digests[stage]:
            return None
        if "sets" in m and m["sets"] != self.folder.set_reference():
            return None
        return m

    def _finish(self, stage: str, seconds: float, outputs: list[str], extra: dict | None = None) -> None:
        self.folder.write_manifest(stage, self.digests[stage], seconds, outputs, extra)

    # ---- model ---------------------------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        if self._model is None and self.model_provider is not None:
            self._model, self._tok = self.model_provider()
        if self._model is None:
            t = time.perf_counter()
            console.print(f"[bold]Loading[/] {self.inputs.source.describe()} on {self.device}")
            try:
                self._model, self._tok = load_model(
                    self.inputs.source, device=self.device, dtype=self.cfg.dtype, device_map=self.cfg.device_map,
                    trust_remote_code=self.cfg.trust_remote_code, max_memory_fraction=self.cfg.max_memory_fraction)
            except (RefusalError, MemoryError, torch.cuda.OutOfMemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # transformers' many error types: a folder it cannot read, code not allowed
                raise _load_error(self.inputs.source, exc, bool(self.recorded)) from exc
            self.load_seconds = time.perf_counter() - t
        return self._model

    @property
    def tokenizer(self) -> Any:
        self.model  # noqa: B018 (loads both)
        return self._tok

    @property
    def on_gpu(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def batch_size(self) -> int:
        """Sequences per forward when reading prompts (extraction)."""
        return self.cfg.batch_sizes(self.on_gpu).extract

    @property
    def generate_batch_size(self) -> int:
        """Sequences decoded together: every condition's rows share batches, so they are large (halved on
        out-of-memory, and the halved size is kept)."""
        return self.cfg.batch_sizes(self.on_gpu).generate

    @property
    def score_batch_size(self) -> int:
        """Sequences per scoring forward: only the last position's logits are kept, so larger batches fit."""
        return self.cfg.batch_sizes(self.on_gpu).select

    @property
    def ce_batch_size(self) -> int:
        """Sequences per cross-entropy forward: every position's logits are kept (about 0.1 GB per 330-token row of
        a 150k vocabulary in bf16), so smaller than the other batches."""
        return self.cfg.batch_sizes(self.on_gpu).cross_entropy

    def prompts(self, records: Sequence[Mapping]) -> list[str]:
        return format_prompts(self.tokenizer, [r["instruction"] for r in records], self.cfg.system_prompt,
                              self.cfg.data.thinking)

    def refusal_ids(self) -> list[int]:
        return refusal_token_ids(self.tokenizer, self.cfg.refusal_tokens)

    def device_name(self) -> str:
        if self.on_gpu and torch.cuda.is_available():
            return f"cuda ({torch.cuda.get_device_name(0)})"
        return str(self.device)

    # ---- the stage graph -----------------------------------------------------------------------------------------

    def run(self, stages: tuple[str, ...] = STAGES, *, from_stage: str | None = None, force: bool = False,
            resume: bool = False) -> dict:
        """Run the given stages in order, skipping finished ones (unless forced); returns the summary if evaluated."""
        for s in list(stages) + ([from_stage] if from_stage else []):
            if s not in STAGES:
                raise RefusalError(f"Unknown stage '{s}'.", f"Stages are: {', '.join(STAGES)}.")
        if self.dir.exists() and not self.dir.is_dir():
            raise RefusalError(f"The run folder '{self.dir}' is a file.", "Give another --output / --name.")
        with self.folder.lock():
            return self._run(stages, from_stage, force, resume)

    def _run(self, stages: tuple[str, ...], from_stage: str | None, force: bool, resume: bool) -> dict:
        from ..errors import DamagedFileError
        from . import stages as impl

        fresh = not self.folder.has_finished()
        if self.unnamed_network and not self.allow_network:  # the saved destinations of the stages about to run
            redo = 0 if force else (STAGES.index(from_stage) if from_stage else len(STAGES))
            first = next((i for i, s in enumerate(STAGES) if s in stages and not (i < redo and self.done(s))), None)
            will_run = set() if first is None else {s for s in STAGES[first:] if s in stages}
            check_network(self.folder, [d for d in self.unnamed_network if d.stage in will_run], False)
        if self._digests is None and self._model is None and fresh and "extract" in stages:
            self._load_while_fingerprinting()
        self.prepare(force=force, resume=resume or bool(from_stage))
        redo_from = 0 if force else (STAGES.index(from_stage) if from_stage else len(STAGES))
        for i, stage in enumerate(STAGES):
            if stage not in stages:
                continue
            if i < redo_from and self.done(stage):
                self._verify(stage)
                console.print(f"[dim]{stage}: finished earlier, skipped[/]")
                continue
            for prev in STAGES[:i]:
                if not self.done(prev):
                    raise RefusalError(f"Stage '{stage}' needs stage '{prev}', which has not finished (for this "
                                       f"config) in {self.dir}.", f"Run 'refusal {prev} {self.dir}' first, or "
                                       f"'refusal run --resume {self.dir}'.")
                self._verify(prev)
            if stage != "evaluate":
                self.model  # noqa: B018 (a model that cannot load stops the run before anything is marked undone)
            for later in STAGES[i:]:  # every later stage reads this one: mark them unfinished before starting
                (self.dir / f"{later}.done.json").unlink(missing_ok=True)
            console.rule(f"[bold]{stage}")
            t = time.perf_counter()
            try:
                outputs, extra = getattr(impl, stage)(self, started=t)
            except DamagedFileError as exc:  # an input artifact: name the stage that rewrites it
                raise self.folder.explain(exc) from None
            self._finish(stage, time.perf_counter() - t, outputs, extra)
        return self.folder.read_json("summary.json") if self.done("evaluate") else {}

    def _verify(self, stage: str) -> None:
        """A finished stage's artifacts are what it recorded (checked once per run)."""
        if stage not in self._verified:
            self.folder.verify(stage, self.done(stage) or {})
            self._verified.add(stage)

    def _load_while_fingerprinting(self) -> None:
        """A fresh folder runs every stage, so the model is needed whatever the digests say: load it while the
        weights' sha256 (part of extract's digest; seconds for gigabytes, remembered afterwards) is computed in a
        background thread. Both mostly wait on the disk or run outside the GIL."""
        from concurrent.futures import ThreadPoolExecutor

        from ..models.identity import model_identity

        with ThreadPoolExecutor(1, thread_name_prefix="fingerprint") as pool:
            identity = pool.submit(model_identity, self.inputs.source, self.cfg.trust_remote_code)
            self.model  # noqa: B018 (loads the model and tokenizer)
            identity.result()  # remembered: the digests read it back at once

    def stage_seconds(self) -> dict[str, float | None]:
        out = {s: (self.done(s) or {}).get("seconds") for s in STAGES}
        if self.load_seconds:
            out["load_model"] = round(self.load_seconds, 2)
        return out


def _load_error(source: ModelSource, exc: Exception, refused_code: bool) -> RefusalError:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if refused_code or "trust_remote_code" in str(exc):
        return RefusalError(
            f"The model {source.describe()} could not be loaded without running its own code "
            f"({exc.__class__.__name__}: {first}).",
            "If you trust the code in that model folder (or hub repository), pass --trust-remote-code "
            "(trust_remote_code=True); a run folder's saved config cannot grant it.")
    return RefusalError(f"Could not load the model {source.describe()} ({exc.__class__.__name__}: {first}).",
                        "Check that the folder holds a complete Hugging Face model (config.json, weights, tokenizer), "
                        "or give a catalog model or a .gguf file.")


_MaybePath = TypeVar("_MaybePath", str, str | None)  # a config's path setting: str or, where optional, None


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local model and dataset paths made absolute, so the saved config works from any folder (``refusal select
    RUN_DIR`` run elsewhere) and names what was used."""
    def fix(spec: _MaybePath) -> _MaybePath:
        if not spec or spec.startswith(("builtin", "hf:")):
            return spec
        p = Path(spec).expanduser()
        return str(p.resolve()) if p.exists() else spec
    cfg.model = fix(cfg.model)
    d = cfg.data
    d.harmful, d.harmless = fix(d.harmful), fix(d.harmless)
    d.harmful_test, d.harmless_test = fix(d.harmful_test), fix(d.harmless_test)
    return cfg


def _nested_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _nested_merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
