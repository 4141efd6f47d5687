"""The staged pipeline behind ``refusal run``: extract → select → generate → evaluate.

Each stage writes its own files into the run folder and, last, a ``<stage>.done.json`` manifest holding the config
digest and the stage's wall time. A stage counts as finished only when its manifest exists with the current digest,
so a run killed at any moment resumes from the first unfinished stage. Run folder layout::

    runs/<name>/
      config.yaml              resolved config (with its digest)
      splits.json              the prompts of every split, after filtering       (extract)
      candidates.safetensors   harmful and harmless means, (positions, layers, d) (extract)
      scores.json, scores.png  bypass / induce / KL for every candidate          (select)
      direction.safetensors    the selected direction with its provenance        (select)
      completions.json         completions and refusal scores per condition      (generate)
      judgements.json          per-prompt refusal judgements                     (evaluate)
      summary.json             the numbers of the summary table                  (evaluate)
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import io
from ..batching import console
from ..config import RunConfig
from ..data import load_source, make_splits
from ..directions.diff_means import Candidates, Direction, extract
from ..errors import RefusalError
from ..evaluation.substring import ACTADD_SIGN, CONDITIONS, judge, summarize
from ..generation.batched import generate
from ..interventions.weights import orthogonalized
from ..models.loading import ModelSource, check_hub_config, default_device, load_model, parse_dtype, resolve_source
from ..scoring.engine import refusal_scores, score_candidates
from ..scoring.refusal import refusal_token_ids
from ..scoring.selection import choose, plot_scores
from ..templates import format_prompts, post_instruction_ids

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

    def __init__(self, cfg: RunConfig, inputs: Inputs | None = None):
        self.cfg = cfg
        self.inputs = inputs or check_inputs(cfg)
        self.dir = Path(cfg.output) / (cfg.name or self.inputs.source.alias)
        self.digest = cfg.digest()
        self._model = None
        self._tok = None
        self.device = cfg.device or default_device()
        self.load_seconds = 0.0

    # ---- folder and resume -------------------------------------------------------------------------------------

    def prepare(self, force: bool = False) -> None:
        """Create the folder, or check that an existing one was made with this config (refuse unless ``force``)."""
        cfg_path = self.dir / "config.yaml"
        if cfg_path.exists() and not force:
            old = io.read_yaml(cfg_path) or {}
            if old.get("digest") != self.digest:
                raise RefusalError(
                    f"The run folder '{self.dir}' was made with another config (digest {old.get('digest')}, "
                    f"now {self.digest}).",
                    "Pass --force to redo the run with the new config, or --name / --output to use another folder.",
                )
        io.write_yaml(cfg_path, {"digest": self.digest, **self.cfg.to_dict()})

    def done(self, stage: str) -> dict | None:
        p = self.dir / f"{stage}.done.json"
        if not p.exists():
            return None
        m = io.read_json(p)
        return m if m.get("config_digest") == self.digest else None

    def _finish(self, stage: str, seconds: float, outputs: list[str], extra: dict | None = None) -> None:
        io.write_json(self.dir / f"{stage}.done.json", {
            "stage": stage, "config_digest": self.digest, "seconds": round(seconds, 2),
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
                trust_remote_code=self.cfg.trust_remote_code)
            self.load_seconds = time.perf_counter() - t
        return self._model

    @property
    def tokenizer(self):
        self.model  # noqa: B018 (loads both)
        return self._tok

    @property
    def batch_size(self) -> int:
        """Sequences per generation batch."""
        if self.cfg.batch_size:
            return self.cfg.batch_size
        return 64 if str(self.device).startswith("cuda") else 16

    @property
    def score_batch_size(self) -> int:
        """Sequences per scoring forward: only the last position's logits are kept, so larger batches fit."""
        return self.batch_size * 64 if str(self.device).startswith("cuda") else self.batch_size

    def prompts(self, records: list[dict]) -> list[str]:
        return format_prompts(self.tokenizer, [r["instruction"] for r in records], self.cfg.system_prompt)

    def refusal_ids(self) -> list[int]:
        return refusal_token_ids(self.tokenizer, self.cfg.refusal_tokens)

    # ---- stages --------------------------------------------------------------------------------------------------

    def run(self, stages: tuple[str, ...] = STAGES, *, from_stage: str | None = None, force: bool = False) -> dict:
        """Run the given stages in order, skipping finished ones (unless forced); returns the summary if evaluated."""
        for s in list(stages) + ([from_stage] if from_stage else []):
            if s not in STAGES:
                raise RefusalError(f"Unknown stage '{s}'.", f"Stages are: {', '.join(STAGES)}.")
        self.prepare(force=force)
        redo_from = 0 if force else (STAGES.index(from_stage) if from_stage else len(STAGES))
        redo = False
        for i, stage in enumerate(STAGES):
            if stage not in stages:
                continue
            if not redo and i < redo_from and self.done(stage):
                console.print(f"[dim]{stage}: finished earlier, skipped[/]")
                continue
            for prev in STAGES[:i]:
                if not self.done(prev):
                    raise RefusalError(f"Stage '{stage}' needs stage '{prev}', which has not finished in {self.dir}.",
                                       f"Run 'refusal {prev}' first, or 'refusal run'.")
            redo = True  # every later stage depends on this one: mark them unfinished before starting
            for later in STAGES[i:]:
                (self.dir / f"{later}.done.json").unlink(missing_ok=True)
            console.rule(f"[bold]{stage}")
            t = time.perf_counter()
            outputs, extra = getattr(self, f"_{stage}")()
            self._finish(stage, time.perf_counter() - t, outputs, extra)
            if stage == "evaluate":  # the summary also records the evaluate stage's own time
                summary = io.read_json(self.dir / "summary.json")
                summary["stage_seconds"]["evaluate"] = self.done("evaluate")["seconds"]
                io.write_json(self.dir / "summary.json", summary)
        return io.read_json(self.dir / "summary.json") if self.done("evaluate") else {}

    def _extract(self):
        tok = self.tokenizer
        n_pos = len(post_instruction_ids(tok, self.cfg.system_prompt))
        splits = {k: dict(v) for k, v in self.inputs.splits.items()}
        kept = {}
        if self.cfg.data.filter:
            rids = self.refusal_ids()
            for split in ("train", "val"):
                for kind, want_refusal in (("harmful", True), ("harmless", False)):
                    recs = splits[kind][split]
                    s = refusal_scores(self.model, tok, self.prompts(recs), rids, self.score_batch_size,
                                       f"Filtering {kind} {split}")
                    keep = [r for r, v in zip(recs, s.tolist()) if (v > 0) == want_refusal]
                    if not keep:
                        raise RefusalError(
                            f"Filtering by the baseline refusal score left no {kind} {split} prompts: the model "
                            f"{'never' if want_refusal else 'always'} refuses them at the first token.",
                            "Set data.filter: false (--no-filter), or use a model that refuses harmful requests.",
                        )
                    kept[f"{kind}_{split}"] = f"{len(keep)}/{len(recs)}"
                    splits[kind][split] = keep
        io.write_json(self.dir / "splits.json", {"filtered": kept, **splits})
        cands = extract(self.model, tok, self.prompts(splits["harmful"]["train"]),
                        self.prompts(splits["harmless"]["train"]), n_pos, batch_size=self.batch_size,
                        model_name=self.cfg.model)
        cands.save(self.dir / "candidates.safetensors")
        return ["splits.json", "candidates.safetensors"], {"kept_after_filter": kept}

    def _select(self):
        splits = io.read_json(self.dir / "splits.json")
        cands = Candidates.load(self.dir / "candidates.safetensors")
        n_layers = cands.n_layers
        s = self.cfg.select
        layers = [i for i in range(0, n_layers, s.layer_stride) if i < int(s.max_layer_fraction * n_layers)]
        hv, bv = self.prompts(splits["harmful"]["val"]), self.prompts(splits["harmless"]["val"])
        scores = score_candidates(
            self.model, self.tokenizer, cands, hv, bv, self.refusal_ids(), layers=layers,
            batch_size=self.score_batch_size, prune_induce_below=s.induce_threshold if s.prune else None)
        io.write_json(self.dir / "scores.json", scores.to_json())  # kept for diagnosis even if nothing passes
        try:
            sel = choose(scores, n_layers=n_layers, kl_threshold=s.kl_threshold,
                         induce_threshold=s.induce_threshold, max_layer_fraction=s.max_layer_fraction)
        except RefusalError as exc:
            plot_scores(scores, None, self.dir / "scores.png", title=f"{self.cfg.model}: candidate directions")
            raise RefusalError(f"{exc.problem} The scores are in {self.dir / 'scores.json'} and scores.png.",
                               exc.fix) from None
        io.write_json(self.dir / "scores.json", {**scores.to_json(), "selected": sel.__dict__})
        plot_scores(scores, sel, self.dir / "scores.png", title=f"{self.cfg.model}: candidate directions")
        d = cands.direction(sel.pos, sel.layer)
        d.scores = {"bypass": sel.bypass, "induce": sel.induce, "kl": sel.kl}
        d.save(self.dir / "direction.safetensors")
        console.print(f"Selected position {sel.pos}, layer {sel.layer} (bypass {sel.bypass:.3f}, induce "
                      f"{sel.induce:.3f}, KL {sel.kl:.4f}; {sel.n_passing} candidates passed the filters)")
        selected = {"pos": sel.pos, "layer": sel.layer}
        return ["scores.json", "scores.png", "direction.safetensors"], {"selected": selected}

    def condition(self, name: str, kind: str, direction: Direction):
        """The context manager for a condition of the evaluation."""
        if name == "baseline":
            return nullcontext()
        if name == "ablation":
            if self.cfg.generate.ablation == "weights":
                return orthogonalized(self.model, direction.vector)
            return direction.ablate(self.model)
        if name == "actadd":
            return direction.add(self.model, coeff=ACTADD_SIGN[kind])
        raise ValueError(name)

    def _generate(self):
        splits = io.read_json(self.dir / "splits.json")
        direction = Direction.load(self.dir / "direction.safetensors")
        rids = self.refusal_ids()
        g = self.cfg.generate
        out: dict = {}
        for kind, conds in CONDITIONS.items():
            recs = splits[kind]["test"]
            prompts = self.prompts(recs)
            out[kind] = {}
            for cond in conds:
                with self.condition(cond, kind, direction):
                    texts, scores = generate(self.model, self.tokenizer, prompts, max_new_tokens=g.max_new_tokens,
                                             batch_size=self.batch_size, static_cache=g.static_cache,
                                             refusal_ids=rids, description=f"Generating {kind} / {cond}")
                out[kind][cond] = [{"instruction": r["instruction"], "category": r.get("category"),
                                    "completion": t, "refusal_score": round(float(s), 4)}
                                   for r, t, s in zip(recs, texts, scores.tolist())]
        io.write_json(self.dir / "completions.json", out)
        return ["completions.json"], None

    def _evaluate(self):
        comps = io.read_json(self.dir / "completions.json")
        io.write_json(self.dir / "judgements.json",
                      {k: {c: judge(v) for c, v in conds.items()} for k, conds in comps.items()})
        rates = summarize(comps)
        sel = io.read_json(self.dir / "select.done.json")["selected"]
        stage_seconds = {s: (self.done(s) or {}).get("seconds") for s in STAGES if s != "evaluate"}
        if self.load_seconds:
            stage_seconds["load_model"] = round(self.load_seconds, 2)
        summary = {
            "model": self.cfg.model, "device": _device_name(self.device),
            "dtype": str(parse_dtype(self.cfg.dtype, self.device)).replace("torch.", ""),
            "preset": self.cfg.preset, "selected": sel, **rates,
            "n_harmful": len(comps["harmful"]["baseline"]), "n_harmless": len(comps["harmless"]["baseline"]),
            "max_new_tokens": self.cfg.generate.max_new_tokens, "stage_seconds": stage_seconds,
            "config_digest": self.digest,
        }
        io.write_json(self.dir / "summary.json", summary)
        return ["judgements.json", "summary.json"], None


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return str(device)
