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
      scores.json, scores.png    bypass / induce / KL for every candidate, the pick   (select)
      direction.safetensors      the selected direction with its provenance          (select)
      directions.safetensors     the ranked set (selected = rank 0)                   (select)
      completions.json           completions and refusal scores per condition        (generate)
      judgements.json            per-prompt refusal judgements                       (evaluate)
      summary.json               rates per prompt set x condition x metric           (evaluate)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import io
from ..batching import console
from ..config import RunConfig, digest, resolve
from ..data import load_source, make_splits
from ..errors import RefusalError
from ..models.loading import ModelSource, check_hub_config, default_device, load_model, parse_dtype, resolve_source
from ..scoring.refusal import refusal_token_ids
from ..templates import format_prompts

STAGES = ("extract", "select", "generate", "evaluate")


@dataclass
class Inputs:
    """Everything checked before a model is loaded."""

    source: ModelSource
    splits: dict[str, dict[str, list[dict]]]  # kind -> split -> records


def check_inputs(cfg: RunConfig) -> Inputs:
    """Validate the model spec and datasets, and build the splits, in seconds and without loading a model."""
    source = resolve_source(cfg.model)
    d = cfg.data
    sizes = {"train": d.n_train, "val": d.n_val, "test": d.n_test}
    splits = {}
    for kind, spec, test in (("harmful", d.harmful, d.harmful_test), ("harmless", d.harmless, d.harmless_test)):
        src = load_source(spec, kind)
        test_src = load_source(test, kind) if test else None
        splits[kind] = make_splits(src, sizes, d.seed, kind, test_src)
    check_hub_config(source, cfg.trust_remote_code)  # last: the only check that may touch the network
    return Inputs(source, splits)


class Run:
    """A run folder for one model and config, and the stages that fill it."""

    def __init__(self, cfg: RunConfig, inputs: Inputs | None = None, folder: str | Path | None = None):
        self.cfg = cfg = _absolute_paths(cfg)
        self.inputs = inputs or check_inputs(cfg)
        self.dir = Path(folder) if folder is not None else Path(cfg.output) / (cfg.name or self.inputs.source.alias)
        self._model = None
        self._tok = None
        self.device = cfg.device or default_device()
        self.dtype = str(parse_dtype(cfg.dtype, self.device)).replace("torch.", "")
        self.load_seconds = 0.0
        self._digests: dict[str, str] | None = None

    @classmethod
    def open(cls, folder: str | Path, overrides: dict | None = None) -> Run:
        """The run in an existing folder, with its saved config (``overrides``: settings to change, e.g. from flags;
        only the stages that read them, and the ones after, are redone)."""
        folder = Path(folder)
        cfg_path = folder / "config.yaml"
        if not cfg_path.is_file():
            raise RefusalError(f"'{folder}' is not a run folder (no config.yaml).",
                               "Give the folder a 'refusal run' made (runs/<model>/ by default).")
        saved = io.read_yaml(cfg_path) or {}
        saved.pop("digests", None)
        saved.pop("digest", None)
        base = resolve(None, _nested_merge(saved, overrides or {}), has_gpu=None)
        return cls(base, folder=folder)

    # ---- digests and manifests -----------------------------------------------------------------------------------

    @property
    def digests(self) -> dict[str, str]:
        """Each stage's digest: its config keys, its inputs' digests, and (extract) the model's identity and dtype."""
        if self._digests is None:
            from ..models.identity import model_identity

            out: dict[str, str] = {}
            prev: str | None = None
            for stage in STAGES:
                own = self.cfg.stage_config(stage)
                if stage == "extract":
                    own = {**own, "model_identity": model_identity(self.inputs.source, self.cfg.trust_remote_code),
                           "dtype": self.dtype}
                prev = out[stage] = digest({"stage": stage, "config": own, "after": prev})
            self._digests = out
        return self._digests

    def prepare(self, force: bool = False, resume: bool = False) -> None:
        """Create the folder, or check an existing one: a folder made with another config is refused unless
        ``resume`` (keep the stages whose digests still match, redo the rest) or ``force`` (redo everything)."""
        cfg_path = self.dir / "config.yaml"
        if cfg_path.exists() and not (force or resume):
            old = (io.read_yaml(cfg_path) or {}).get("digests", {})
            stale = [s for s in STAGES if old.get(s) != self.digests[s]]
            if stale and any((self.dir / f"{s}.done.json").exists() for s in stale):
                raise RefusalError(
                    f"The run folder '{self.dir}' was made with another config (stages {', '.join(stale)} would "
                    "change).",
                    f"Pass --resume {self.dir} to redo only those stages, --force to redo everything, or --name / "
                    "--output for another folder.")
        io.write_yaml(cfg_path, {"digests": self.digests, **self.cfg.to_dict()})

    def done(self, stage: str) -> dict | None:
        p = self.dir / f"{stage}.done.json"
        if not p.exists():
            return None
        m = io.read_json(p)
        return m if m.get("digest") == self.digests[stage] else None

    def _finish(self, stage: str, seconds: float, outputs: list[str], extra: dict | None = None) -> None:
        io.write_json(self.dir / f"{stage}.done.json", {
            "stage": stage, "digest": self.digests[stage], "seconds": round(seconds, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "outputs": outputs,
            **(extra or {})})

    # ---- model ---------------------------------------------------------------------------------------------------

    @property
    def model(self):
        if self._model is None:
            t = time.perf_counter()
            console.print(f"[bold]Loading[/] {self.inputs.source.describe()} on {self.device}")
            self._model, self._tok = load_model(
                self.inputs.source, device=self.device, dtype=self.cfg.dtype, device_map=self.cfg.device_map,
                trust_remote_code=self.cfg.trust_remote_code, max_memory_fraction=self.cfg.max_memory_fraction)
            self.load_seconds = time.perf_counter() - t
        return self._model

    @property
    def tokenizer(self):
        self.model  # noqa: B018 (loads both)
        return self._tok

    @property
    def on_gpu(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def batch_size(self) -> int:
        """Sequences per forward when reading prompts (extraction)."""
        return self.cfg.batch_size or (64 if self.on_gpu else 16)

    @property
    def generate_batch_size(self) -> int:
        """Sequences decoded together: every condition's rows share batches, so they are large (halved on
        out-of-memory, and the halved size is kept)."""
        return self.cfg.batch_size or (512 if self.on_gpu else 64)

    @property
    def score_batch_size(self) -> int:
        """Sequences per scoring forward: only the last position's logits are kept, so larger batches fit."""
        return self.batch_size * 64 if self.on_gpu else self.batch_size

    @property
    def ce_batch_size(self) -> int:
        """Sequences per cross-entropy forward: every position's logits are kept (about 0.1 GB per 330-token row of
        a 150k vocabulary in bf16), so smaller than the other batches."""
        return self.cfg.evaluate.ce_batch_size or (32 if self.on_gpu else 8)

    def prompts(self, records: list[dict]) -> list[str]:
        return format_prompts(self.tokenizer, [r["instruction"] for r in records], self.cfg.system_prompt)

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
        from . import stages as impl

        for s in list(stages) + ([from_stage] if from_stage else []):
            if s not in STAGES:
                raise RefusalError(f"Unknown stage '{s}'.", f"Stages are: {', '.join(STAGES)}.")
        fresh = not any((self.dir / f"{s}.done.json").exists() for s in STAGES)
        if self._digests is None and self._model is None and fresh and "extract" in stages:
            self._load_while_fingerprinting()
        self.prepare(force=force, resume=resume or bool(from_stage))
        redo_from = 0 if force else (STAGES.index(from_stage) if from_stage else len(STAGES))
        for i, stage in enumerate(STAGES):
            if stage not in stages:
                continue
            if i < redo_from and self.done(stage):
                console.print(f"[dim]{stage}: finished earlier, skipped[/]")
                continue
            for prev in STAGES[:i]:
                if not self.done(prev):
                    raise RefusalError(f"Stage '{stage}' needs stage '{prev}', which has not finished (for this "
                                       f"config) in {self.dir}.", f"Run 'refusal {prev} {self.dir}' first, or "
                                       f"'refusal run --resume {self.dir}'.")
            for later in STAGES[i:]:  # every later stage reads this one: mark them unfinished before starting
                (self.dir / f"{later}.done.json").unlink(missing_ok=True)
            console.rule(f"[bold]{stage}")
            t = time.perf_counter()
            outputs, extra = getattr(impl, stage)(self, started=t)
            self._finish(stage, time.perf_counter() - t, outputs, extra)
        return io.read_json(self.dir / "summary.json") if self.done("evaluate") else {}

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


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local model and dataset paths made absolute, so the saved config works from any folder (``refusal select
    RUN_DIR`` run elsewhere) and names what was used."""
    def fix(spec):
        if not spec or spec.startswith(("builtin", "hf:")):
            return spec
        p = Path(spec).expanduser()
        return str(p.resolve()) if p.exists() else spec
    cfg.model = fix(cfg.model)
    d = cfg.data
    d.harmful, d.harmless, d.harmful_test, d.harmless_test = (fix(x) for x in (d.harmful, d.harmless, d.harmful_test,
                                                                                d.harmless_test))
    return cfg


def _nested_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _nested_merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
