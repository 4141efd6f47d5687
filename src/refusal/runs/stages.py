"""The four stages of a run. Each takes the :class:`~refusal.runs.pipeline.Run`, reads the artifacts of the stages
before it, and returns ``(outputs, manifest extras)``."""

from __future__ import annotations

import time

from .. import io
from ..batching import console
from ..directions.base import Direction, DirectionSet
from ..directions.diff_means import Candidates
from ..directions.diff_means import extract as extract_candidates
from ..errors import RefusalError
from ..evaluation.summary import judge_completions, summarize
from ..generation.batched import generate as generate_completions
from ..interventions.hooks import Plan
from ..interventions.specs import condition_interventions
from ..models.parts import find_parts
from ..scoring.engine import refusal_scores, score_candidates
from ..scoring.selection import choose, plot_scores, ranked
from ..templates import post_instruction_ids


def extract(run, started: float):
    tok = run.tokenizer
    n_pos = len(post_instruction_ids(tok, run.cfg.system_prompt))
    splits = {k: dict(v) for k, v in run.inputs.splits.items()}
    kept = {}
    if run.cfg.data.filter:
        rids = run.refusal_ids()
        for split in ("train", "val"):
            for kind, want_refusal in (("harmful", True), ("harmless", False)):
                recs = splits[kind][split]
                s = refusal_scores(run.model, tok, run.prompts(recs), rids, run.score_batch_size,
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
    io.write_json(run.dir / "splits.json", {"filtered": kept, **splits})
    cands = extract_candidates(run.model, tok, run.prompts(splits["harmful"]["train"]),
                               run.prompts(splits["harmless"]["train"]), n_pos, batch_size=run.batch_size,
                               model_name=run.digests["extract"])
    cands.save(run.dir / "candidates.safetensors")
    return ["splits.json", "candidates.safetensors"], {"kept_after_filter": kept}


def select(run, started: float):
    splits = io.read_json(run.dir / "splits.json")
    cands = Candidates.load(run.dir / "candidates.safetensors")
    n_layers = cands.n_layers
    s = run.cfg.select
    layers = [i for i in range(0, n_layers, s.layer_stride) if i < int(s.max_layer_fraction * n_layers)]
    hv, bv = run.prompts(splits["harmful"]["val"]), run.prompts(splits["harmless"]["val"])
    scores = score_candidates(
        run.model, run.tokenizer, cands, hv, bv, run.refusal_ids(), layers=layers,
        batch_size=run.score_batch_size, prune_induce_below=s.induce_threshold if s.prune else None)
    io.write_json(run.dir / "scores.json", scores.to_json())  # kept for diagnosis even if nothing passes
    title = f"{run.cfg.model}: candidate directions"
    filters = {"n_layers": n_layers, "kl_threshold": s.kl_threshold, "induce_threshold": s.induce_threshold,
               "max_layer_fraction": s.max_layer_fraction}
    try:
        sel = choose(scores, **filters)
    except RefusalError as exc:
        plot_scores(scores, None, run.dir / "scores.png", title=title)
        raise RefusalError(f"{exc.problem} The scores are in {run.dir / 'scores.json'} and scores.png.",
                           exc.fix) from None
    order = ranked(scores, **filters)
    io.write_json(run.dir / "scores.json", {**scores.to_json(), "selected": sel.__dict__,
                                            "ranked": [{"pos": p, "layer": la} for p, la in order]})
    plot_scores(scores, sel, run.dir / "scores.png", title=title)
    identity, data = run.digests["extract"], io.read_json(run.dir / "extract.done.json")["digest"]

    def direction(pos: int, layer: int) -> Direction:
        d = cands.direction(pos, layer)
        i = scores.positions.index(pos)
        return Direction(d.vectors, layer, pos, identity, "diff_means",
                         {"bypass": float(scores.bypass[i, layer]), "induce": float(scores.induce[i, layer]),
                          "kl": float(scores.kl[i, layer])}, data)

    chosen = direction(sel.pos, sel.layer)
    chosen.save(run.dir / "direction.safetensors")
    ranked_set = DirectionSet([("selected", chosen)] + [(str(r), direction(p, la)) for r, (p, la) in
                                                        enumerate(order[:16])])
    ranked_set.save(run.dir / "directions.safetensors")
    console.print(f"Selected position {sel.pos}, layer {sel.layer} (bypass {sel.bypass:.3f}, induce "
                  f"{sel.induce:.3f}, KL {sel.kl:.4f}; {sel.n_passing} candidates passed the filters)")
    return (["scores.json", "scores.png", "direction.safetensors", "directions.safetensors"],
            {"selected": {"pos": sel.pos, "layer": sel.layer}})


def _layer_ranking(run) -> list[int]:
    """Layers best first by the bypass score of their best position (for ``{top: p}`` scopes)."""
    from ..scoring.selection import Scores

    scores = Scores.from_json(io.read_json(run.dir / "scores.json"))
    best = scores.bypass.nan_to_num(float("inf")).min(0).values
    return [int(i) for i in best.argsort()]


def generate(run, started: float):
    """Every condition's rows decode together in large batches, each row with its own interventions; finished
    batches are saved as they end (``completions.partial.json``), so a killed run loses only the batch in flight."""
    splits = io.read_json(run.dir / "splits.json")
    directions = DirectionSet.load(run.dir / "directions.safetensors")
    conds = run.cfg.generate.conditions
    needs_ranking = any(isinstance(s.layers, dict) for c in conds for s in c.interventions)
    ranking = _layer_ranking(run) if needs_ranking else None
    rows: list[tuple[int, int]] = []  # (condition index, prompt index)
    prompts: list[str] = []
    per_row = []
    by_set = {k: run.prompts(splits[k]["test"]) for k in ("harmful", "harmless")}
    for ci, c in enumerate(conds):
        ivs = condition_interventions(c, directions, ranking)
        for pi, p in enumerate(by_set[c.prompts]):
            rows.append((ci, pi))
            prompts.append(p)
            per_row.append(ivs)
    parts = find_parts(run.model)
    for d in directions.values():
        d.check_model(parts.hidden_size, parts.n_layers)
    plan = Plan.rows(run.model, per_row)

    partial_path = run.dir / "completions.partial.json"
    key = run.digests["generate"]
    partial = io.read_json(partial_path) if partial_path.exists() else {}
    done = partial.get("rows", {}) if partial.get("digest") == key else {}
    todo = [i for i in range(len(rows)) if str(i) not in done]
    if done:
        console.print(f"Resuming generation: {len(done)} of {len(rows)} completions were saved earlier")

    def save(batch_rows, texts, scores):
        for i, t, s in zip(batch_rows, texts, scores):
            done[str(i)] = {"completion": t, "refusal_score": None if s is None else round(float(s), 4)}
        io.write_json(partial_path, {"digest": key, "rows": done})

    if todo:
        g = run.cfg.generate
        generate_completions(run.model, run.tokenizer, prompts, max_new_tokens=g.max_new_tokens,
                             batch_size=run.generate_batch_size, static_cache=g.static_cache,
                             refusal_ids=run.refusal_ids(), plan=plan, rows=todo, on_batch=save,
                             description=f"Generating {len(conds)} conditions x test prompts")
    out: dict = {}
    for i, (ci, pi) in enumerate(rows):
        c = conds[ci]
        r = splits[c.prompts]["test"][pi]
        out.setdefault(c.prompts, {}).setdefault(c.name, []).append(
            {"instruction": r["instruction"], "category": r.get("category"), **done[str(i)]})
    io.write_json(run.dir / "completions.json", out)
    partial_path.unlink(missing_ok=True)
    return ["completions.json"], None


def evaluate(run, started: float):
    comps = io.read_json(run.dir / "completions.json")
    judged = judge_completions(comps)
    io.write_json(run.dir / "judgements.json", judged)
    scores = io.read_json(run.dir / "scores.json")
    seconds = run.stage_seconds()
    seconds["evaluate"] = round(time.perf_counter() - started, 2)
    summary = {
        "model": run.cfg.model, "device": run.device_name(), "dtype": run.dtype, "preset": run.cfg.preset,
        "selected": {"pos": scores["selected"]["pos"], "layer": scores["selected"]["layer"]},
        **summarize(judged), "max_new_tokens": run.cfg.generate.max_new_tokens, "stage_seconds": seconds,
        "digests": run.digests,
    }
    io.write_json(run.dir / "summary.json", summary)
    return ["judgements.json", "summary.json"], None
