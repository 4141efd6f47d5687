"""The four stages of a run. Each takes the :class:`~refusal.runs.pipeline.Run`, reads the artifacts of the stages
before it, and returns ``(outputs, manifest extras)``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import io
from ..batching import console
from ..config import BenchmarksConfig, Condition, EvaluateConfig, OverRefusalConfig
from ..directions.base import Direction, DirectionSet
from ..directions.diff_means import Candidates
from ..directions.diff_means import extract as extract_candidates
from ..errors import NoDirectionError, RefusalError
from ..evaluation.reasoning import (
    has_split,
    open_prefix,
    reasoning_format,
    split_completion,
    substring_parts,
    with_reasoning,
)
from ..evaluation.summary import judge_completions, paper_judge, summarize
from ..generation.batched import generate as generate_completions
from ..interventions.hooks import Plan
from ..interventions.specs import condition_interventions
from ..models.parts import find_parts
from ..scoring.engine import refusal_scores, score_candidates
from ..scoring.selection import Selection, choose, plot_scores, ranked
from ..templates import post_instruction_ids, post_instruction_text
from . import rankings as picks
from .keep_refusal import Gates
from .keep_refusal import gates as keep_gates

if TYPE_CHECKING:
    from pathlib import Path

    from ..evaluation.reasoning import ReasoningFormat
    from ..interventions.scopes import Intervention
    from .pipeline import Run

StageResult = tuple[list[str], dict | None]  # (the files it wrote, its manifest's extra fields)
SaveBatch = Callable[[list[int], list[str], list[float | None]], None]  # generate's on_batch: rows, texts, scores


def extract(run: Run, started: float) -> StageResult:
    tok = run.tokenizer
    post = post_instruction_ids(tok, run.cfg.system_prompt, run.cfg.data.thinking)
    n_pos = len(post)
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
                    raise (NoDirectionError if want_refusal else RefusalError)(
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
    outputs = ["splits.json", "candidates.safetensors"]
    if "inlp" in run.cfg.extract.methods:
        outputs += _extract_inlp(run, splits, n_pos)
    thinking = {"mode": run.cfg.data.thinking, "post_instruction_ids": post,
                "post_instruction_tokens": tok.convert_ids_to_tokens(post)}
    return outputs, {"kept_after_filter": kept, "thinking": thinking}


def _extract_inlp(run: Run, splits: dict, n_pos: int) -> list[str]:
    """INLP subspaces at every component (layer below the selection's depth limit x post-instruction position)."""
    from ..directions.inlp import extract_inlp, plot_accuracy

    n_layers = find_parts(run.model).n_layers
    s = run.cfg.select
    layers = [i for i in range(0, n_layers, s.layer_stride) if i < int(s.max_layer_fraction * n_layers)]
    c = run.cfg.extract.inlp
    t = time.perf_counter()
    res = extract_inlp(run.model, run.tokenizer, run.prompts(splits["harmful"]["train"]),
                       run.prompts(splits["harmless"]["train"]), n_pos, layers, batch_size=run.batch_size,
                       model_name=run.digests["extract"], n_iterations=c.n_iterations, min_accuracy=c.min_accuracy,
                       margin=c.margin, heldout_fraction=c.heldout_fraction, classifier=c.classifier,
                       seed=run.cfg.data.seed)
    res.save(run.dir / "inlp.safetensors")
    io.write_json(run.dir / "inlp.json", {**res.to_json(), "seconds": round(time.perf_counter() - t, 2)})
    best = max(((p, la) for p in res.positions for la in res.layers), key=lambda pl: int(res.rank[res.index(*pl)]))
    plot_accuracy(res, *best, run.dir / "inlp_accuracy.png")
    console.print(f"INLP: {int((res.rank > 0).sum())} of {res.rank.numel()} components found a subspace (largest "
                  f"rank {int(res.rank.max())}) in {time.perf_counter() - t:.1f} s")
    return ["inlp.safetensors", "inlp.json", "inlp_accuracy.png"]


def select(run: Run, started: float) -> StageResult:
    splits = io.read_json(run.dir / "splits.json")
    cands = Candidates.load(run.dir / "candidates.safetensors")
    n_layers = cands.n_layers
    s = run.cfg.select
    layers = [i for i in range(0, n_layers, s.layer_stride) if i < int(s.max_layer_fraction * n_layers)]
    hv, bv = run.prompts(splits["harmful"]["val"]), run.prompts(splits["harmless"]["val"])
    scores = score_candidates(
        run.model, run.tokenizer, cands, hv, bv, run.refusal_ids(), layers=layers,
        batch_size=run.score_batch_size, prune_induce_below=s.induce_threshold if s.prune else None)
    title = f"{run.cfg.model}: candidate directions"
    filters: dict[str, Any] = {"n_layers": n_layers, "kl_threshold": s.kl_threshold,
                               "induce_threshold": s.induce_threshold, "max_layer_fraction": s.max_layer_fraction}
    try:
        sel = choose(scores, **filters)
    except RefusalError as exc:
        run.folder.write_selection(scores.to_json())  # the scores without a selection, for diagnosis
        plot_scores(scores, None, run.dir / "scores.png", title=title)
        raise type(exc)(f"{exc.problem} The scores are in {run.dir / 'scores.json'} and scores.png.",
                           exc.fix) from None
    order = ranked(scores, **filters)
    extra = {}
    if s.objective != "refusal_score":
        judged = picks.judge_objective(run, cands, order[:s.judge_candidates], splits["harmful"]["val"])
        p, la = judged["pick"]["pos"], judged["pick"]["layer"]
        i = scores.positions.index(p)
        extra = {"selected_by_refusal_score": sel.__dict__, "judge_objective": judged}
        sel = Selection(p, la, float(scores.bypass[i, la]), float(scores.induce[i, la]), float(scores.kl[i, la]),
                        sel.n_passing)
        order = [(p, la)] + [c for c in order if c != (p, la)]
    # the selection is stored here, once; direction.safetensors refers to it
    reference = run.folder.write_selection(scores.to_json(), sel.__dict__, **extra,
                                           ranked=[{"pos": p, "layer": la} for p, la in order])
    plot_scores(scores, sel, run.dir / "scores.png", title=title)
    from ..config import digest
    from ..models.identity import model_identity

    identity = model_identity(run.inputs.source, run.cfg.trust_remote_code)  # cached: hashed once per weights file
    data = digest({k: {sp: [r["instruction"] for r in v[sp]] for sp in ("train", "val")}
                   for k, v in splits.items() if k in ("harmful", "harmless")})

    def direction(pos: int, layer: int) -> Direction:
        d = cands.direction(pos, layer)
        i = scores.positions.index(pos)
        return Direction(d.vectors, layer, pos, identity, "diff_means",
                         {"bypass": float(scores.bypass[i, layer]), "induce": float(scores.induce[i, layer]),
                          "kl": float(scores.kl[i, layer])}, data)

    chosen = direction(sel.pos, sel.layer)
    # the vector, with a reference to the selection instead of a copy of its scores (RunFolder.selected_direction)
    Direction(chosen.vectors, chosen.layer, chosen.pos, chosen.model, chosen.method, {}, chosen.data_digest,
              {"selection": reference}).save(run.dir / "direction.safetensors")
    ranked_set = DirectionSet([("selected", chosen)] + [(str(r), direction(p, la)) for r, (p, la) in
                                                        enumerate(order[:16])])
    console.print(f"Selected position {sel.pos}, layer {sel.layer} (bypass {sel.bypass:.3f}, induce "
                  f"{sel.induce:.3f}, KL {sel.kl:.4f}; {sel.n_passing} candidates passed the filters)")
    ranks = {"diff_means": picks.rank_diff_means(run, scores, cands, layers, hv, bv)}
    if "inlp" in run.cfg.extract.methods:
        ranks["inlp"] = picks.rank_inlp(run, cands, hv, bv, ranked_set)
    io.write_json(run.dir / "rankings.json", ranks)
    kept = _keep_refusal(run, splits, cands, chosen, ranked_set) if s.keep_refusal else []
    # the ranked set; "selected" is direction.safetensors (RunFolder.directions adds it), not a copy here
    DirectionSet([(n, d) for n, d in ranked_set.items() if n != "selected"]).save(run.dir / "directions.safetensors")
    outputs = ["scores.json", "scores.png", "direction.safetensors", "directions.safetensors", "rankings.json"]
    if "inlp" in ranks:
        outputs.append("inlp_selected_accuracy.png")
    return outputs + kept, None


def _keep_refusal(run: Run, splits: dict, cands: Candidates, chosen: Direction, ranked_set: DirectionSet) -> list[str]:
    """``select.keep_refusal``: per-category directions, ``kept`` and the keep condition (refusal.runs.keep_refusal)."""
    from .keep_refusal import select_outputs

    return select_outputs(run, splits, cands, chosen, ranked_set)


def _layer_rankings(run: Run) -> dict[str, list[int]]:
    """Layers best first per method (for ``{top: p}`` scopes), from the select stage's rankings."""
    return {m: r["layers"] for m, r in io.read_json(run.dir / "rankings.json").items()}


def generate(run: Run, started: float) -> StageResult:
    """Every condition's rows decode together in large batches, each row with its own interventions; finished
    batches are saved as they end (``completions.partial.json``), so a killed run loses only the batch in flight."""
    splits = io.read_json(run.dir / "splits.json")
    directions = run_directions(run)
    used_set = set_used(run)  # the saved set's reference, where a condition names it: recorded in the manifest
    conds = run.cfg.generate.conditions
    rankings = _layer_rankings(run)
    by_set = {k: run.prompts(splits[k]["test"]) for k in ("harmful", "harmless")}
    gate = keep_gates(run, conds, by_set)  # conditional keep-refusal: each keep_refusal row released or kept
    rows, prompts, plan = _plan_rows(run, conds, directions, rankings, by_set, gate)

    partial_path = run.dir / "completions.partial.json"
    key = run.digests["generate"] + (f"+set:{used_set['sha256'][:16]}" if used_set else "")
    done, server = _resume(partial_path, key)
    todo = [i for i in range(len(rows)) if str(i) not in done]
    if done:
        console.print(f"Resuming generation: {len(done)} of {len(rows)} completions were saved earlier")
    save = _saver(partial_path, key, done, server)

    decoding: dict = {}  # what decoded (and why not the configured decoder, if it stepped aside)
    fmt = reasoning_format(run.tokenizer)  # a reasoning model's markers stay in the text, to split it below
    _decode(run, conds, rows, prompts, plan, todo, save, server, decoding, fmt)
    kl = {}
    if run.cfg.generate.kl:
        kl = _condition_kl(run, conds, [condition_interventions(c, directions, rankings) for c in conds],
                           by_set["harmless"], gate)
    io.write_json(run.dir / "kl.json", kl)
    prefix = open_prefix(post_instruction_text(run.tokenizer, run.cfg.system_prompt, run.cfg.data.thinking), fmt)
    out, cut = _completion_records(splits, conds, rows, done, gate, fmt, prefix)
    io.write_json(run.dir / "completions.json", out)
    partial_path.unlink(missing_ok=True)
    return ["completions.json", "kl.json"], _generate_extras(run, decoding, used_set, gate, fmt, prefix, cut)


def _plan_rows(run: Run, conds: list[Condition], directions: DirectionSet, rankings: dict[str, list[int]],
               by_set: dict[str, list[str]], gate: Gates | None) -> tuple[list[tuple[int, int]], list[str], Plan]:
    """The rows to decode, every condition's test prompts in turn: ``(condition index, prompt index)``, their
    prompts, and the plan of each row's interventions (a gated row gets those its keep-refusal routing gives it);
    the directions checked against the model first."""
    rows: list[tuple[int, int]] = []  # (condition index, prompt index)
    prompts: list[str] = []
    per_row = []
    for ci, c in enumerate(conds):
        ivs = condition_interventions(c, directions, rankings)
        for pi, p in enumerate(by_set[c.prompts]):
            rows.append((ci, pi))
            prompts.append(p)
            per_row.append(ivs if gate is None else gate.interventions(ci, pi, ivs))
    parts = find_parts(run.model)
    for d in directions.values():
        d.check_model(parts.hidden_size, parts.n_layers)
    return rows, prompts, Plan.rows(run.model, per_row)


def _resume(partial_path: Path, key: str) -> tuple[dict, dict]:
    """What an interrupted generation saved under the same digest ``key``: the finished rows (``{row: record}``)
    and the server's record (generate.backend openai); both empty where nothing (or another run's) was saved."""
    partial = io.read_json(partial_path) if partial_path.exists() else {}
    done = partial.get("rows", {}) if partial.get("digest") == key else {}
    server: dict = dict(partial.get("server") or {}) if partial.get("digest") == key else {}  # generate.backend openai
    return done, server


def _saver(partial_path: Path, key: str, done: dict, server: dict) -> SaveBatch:
    """The on-batch callback: add a finished batch's rows to ``done`` and save them (with the server's record, if
    any) to ``completions.partial.json``."""

    def save(batch_rows: list[int], texts: list[str], scores: list[float | None]) -> None:
        for i, t, s in zip(batch_rows, texts, scores):
            done[str(i)] = {"completion": t, "refusal_score": None if s is None else round(float(s), 4)}
        io.write_json(partial_path, {"digest": key, "rows": done, **({"server": server} if server else {})})

    return save


def _decode(run: Run, conds: list[Condition], rows: list[tuple[int, int]], prompts: list[str], plan: Plan,
            todo: list[int], save: SaveBatch, server: dict, decoding: dict,
            fmt: ReasoningFormat | None) -> None:
    """Decode the rows in ``todo``: with generate.backend openai the conditions without interventions on the
    server first, the rest here, one pass per max_new_tokens budget (per condition, else generate's)."""
    g = run.cfg.generate
    budgets = [c.max_new_tokens or g.max_new_tokens for c in conds]  # per condition, else generate.max_new_tokens
    if g.backend == "openai":  # the conditions without interventions decode on the server, its model checked first
        todo = _generate_on_server(run, conds, rows, prompts, budgets, todo, save, server, decoding)
    for budget in sorted({budgets[rows[i][0]] for i in todo}):
        group = [i for i in todo if budgets[rows[i][0]] == budget]
        generate_completions(run.model, run.tokenizer, prompts, max_new_tokens=budget,
                             batch_size=run.generate_batch_size, static_cache=g.static_cache, fallback=True,
                             refusal_ids=run.refusal_ids(), plan=plan, rows=group, on_batch=save, report=decoding,
                             keep_special=fmt.keep_ids(run.tokenizer) if fmt else (),
                             description=f"Generating {len(conds)} conditions x test prompts"
                                         + (f" ({budget} tokens)" if len(set(budgets)) > 1 else ""))


def _completion_records(splits: dict, conds: list[Condition], rows: list[tuple[int, int]], done: dict,
                        gate: Gates | None, fmt: ReasoningFormat | None, prefix: str) -> tuple[dict, dict]:
    """``completions.json``'s content, ``{prompt set: {condition: [record]}}`` (each with its keep-refusal routing
    and, for a reasoning model, its split), and per set and condition how many ran out inside the reasoning."""
    out: dict = {}
    cut: dict = {}
    for i, (ci, pi) in enumerate(rows):
        c = conds[ci]
        r = splits[c.prompts]["test"][pi]
        rec = {"instruction": r["instruction"], "category": r.get("category"), **done[str(i)]}
        if gate is not None and gate.label(ci, pi) is not None:
            rec["gate"] = gate.label(ci, pi)  # the keep condition's routing of this prompt: release or keep
        if fmt is not None:  # reasoning, final answer, and whether the budget ran out inside the reasoning
            rec.update(split_completion(rec["completion"], fmt, prefix).to_json())
            cut.setdefault(c.prompts, {}).setdefault(c.name, 0)
            cut[c.prompts][c.name] += rec["cut_inside_reasoning"]
        out.setdefault(c.prompts, {}).setdefault(c.name, []).append(rec)
    return out, cut


def _generate_extras(run: Run, decoding: dict, used_set: dict | None, gate: Gates | None,
                     fmt: ReasoningFormat | None, prefix: str, cut: dict) -> dict | None:
    """generate's manifest extras: what decoded, the saved set it used, the keep-refusal gate, the reasoning
    format; None where there is nothing to record."""
    extras: dict[str, Any] = {"decoding": decoding} if decoding else {}
    if used_set:
        extras["sets"] = used_set  # Run.done: generate is redone when the saved set changes
    if gate is not None:
        extras["keep_gate"] = gate.to_json()
    if fmt is not None:
        extras["reasoning"] = {"format": fmt.to_json(), "thinking": run.cfg.data.thinking,
                               "prompt_opens_reasoning": bool(prefix), "cut_inside_reasoning": cut}
    return extras or None


def uses_set(conditions: list[Condition]) -> bool:
    """Whether a condition names the direction ``set`` (the one `refusal sets` saves)."""
    return any(iv.direction == "set" for c in conditions for iv in c.interventions)


def set_used(run: Run) -> dict | None:
    """The reference of the saved set (:meth:`RunFolder.set_reference`) when a condition names it, else None."""
    return run.folder.set_reference() if uses_set(run.cfg.generate.conditions) else None


def run_directions(run: Run) -> DirectionSet:
    """The run's directions by name (:meth:`RunFolder.directions`); a condition that names ``set`` needs the set
    `refusal sets` saved from this run's current select outputs."""
    directions = run.folder.directions()
    if "set" not in directions and uses_set(run.cfg.generate.conditions):
        why = ("was saved from an earlier select (select ran again since)" if run.folder.sets_state() == "stale"
               else "has not been saved")
        raise RefusalError(f"A condition names the direction 'set', but the set of `refusal sets` {why} in "
                           f"{run.dir}.", f"Run `refusal sets {run.dir}` (it saves the best set), then resume.")
    return directions


def _generate_on_server(run: Run, conds: list[Condition], rows: list[tuple[int, int]], prompts: list[str],
                        budgets: list[int], todo: list[int], save: SaveBatch, server: dict,
                        decoding: dict) -> list[int]:
    """generate.backend openai: decode the rows of the conditions that are pure weights (no interventions) on the
    server, after checking that it serves the run's model; fill the record; return the rows left to decode here."""
    from ..generation.batched import greedy_config
    from ..generation.remote import generate_on_server, run_model_names
    from ..models.identity import model_identity

    pure = {ci for ci, c in enumerate(conds) if not c.interventions}
    decoding["conditions"] = {where: [f"{c.prompts}/{c.name}" for ci, c in enumerate(conds)
                                      if (ci in pure) == (where == "server")] for where in ("server", "local")}
    if not pure:
        console.print("[yellow]generate.backend is openai, but every condition has interventions: all decode here.[/]")
    eos = greedy_config(run.model, run.tokenizer, 1).eos_token_id
    generate_on_server(run.cfg.generate.openai, prompts, [i for i in todo if rows[i][0] in pure],
                       {i: budgets[ci] for i, (ci, _) in enumerate(rows)}, tokenizer=run.tokenizer,
                       run_names=run_model_names(run.cfg.model, run.inputs.source),
                       identity=model_identity(run.inputs.source, run.cfg.trust_remote_code),
                       stop_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                       on_batch=save, record=server)
    if server:
        decoding["server"] = server
    return [i for i in todo if rows[i][0] not in pure]


def _condition_kl(run: Run, conds: list[Condition], ivs: list[list[Intervention]], harmless_prompts: list[str],
                  gate: Gates | None = None) -> dict:
    """Each condition's first-token KL(baseline || condition) on the harmless test prompts: what its interventions
    change on inputs that should not change (batched over conditions). A gated condition (conditional keep-refusal)
    gets its interventions only on the harmless prompts its condition routes to release, as its own prompts do."""
    from ..evaluation.stats import Rate
    from ..scoring.plans import score_interventions
    from .keep_refusal import gated_kl

    extra: list[list[Intervention]] = [[]] if gate is not None else []  # no intervention: the rows routed to keep
    res = score_interventions(run.model, run.tokenizer, harmless_prompts, list(ivs) + extra, run.refusal_ids(),
                              batch_size=run.score_batch_size, description="First-token KL per condition")
    out: dict = {}
    for ci, (c, v) in enumerate(zip(conds, gated_kl(res.kl, gate).mean(1).tolist())):
        out.setdefault(c.prompts, {})[c.name] = {"kl_harmless": round(v, 6), "n": len(harmless_prompts)}
        if gate is not None and gate.harmless is not None and ci in gate.rows:
            out[c.prompts][c.name]["harmless_routed_release"] = Rate.of(sum(gate.harmless), len(gate.harmless)
                                                                        ).to_json()
    return out


def evaluate(run: Run, started: float) -> StageResult:
    """Judge every completion with every configured judge (side by side), and measure cross-entropy under every
    condition's interventions; write judgements.json, judges.json, ce.json and summary.json (once, at the end, with
    the fields of ``run.summary_extra``)."""
    comps = io.read_json(run.dir / "completions.json")
    split = any(has_split(r) for conds in comps.values() for recs in conds.values() for r in recs)
    # a reasoning model's completions: the answer is judged (refused) and, apart, the reasoning (refused_reasoning)
    ev = run.cfg.evaluate
    judges = _run_judges(comps, ev.judges)
    # the configured substring judge's verdicts are the summary's refused: the substring judge runs once
    extra = run.summary_extra
    if extra.refused_by is not None and extra.refused_by not in judges:
        raise RefusalError(f"The summary's refusals are to come from the judge '{extra.refused_by}', which is not "
                           f"among the configured judges ({', '.join(judges) or 'none'}).",
                           "Configure that judge in evaluate.judges.")
    name = extra.refused_by or paper_judge(ev.judges)
    reasoning_judges = _run_judges(comps, ev.judges, part="reasoning") if split else {}
    if split and name in judges:  # that judge's verdicts on the answer, and on the reasoning
        judged = with_reasoning(judge_completions(comps, judges[name]), reasoning_judges.get(name, {}))
    elif split:  # no substring judge configured: the shipped list judges both parts here
        judged = {k: {c: substring_parts(rs) for c, rs in cs.items()} for k, cs in comps.items()}
    else:
        judged = judge_completions(comps, judges.get(name or ""))
    io.write_json(run.dir / "judgements.json", judged)
    kl = io.read_json(run.dir / "kl.json")
    outputs = ["judgements.json"]
    if judges:
        io.write_json(run.dir / "judges.json", judges)
        outputs.append("judges.json")
    if reasoning_judges:
        io.write_json(run.dir / "judges_reasoning.json", reasoning_judges)
        outputs.append("judges_reasoning.json")
    ce = _cross_entropy(run, comps, ev) if ev.cross_entropy else {}
    if ce:
        io.write_json(run.dir / "ce.json", ce)
        outputs.append("ce.json")
    bench = _benchmarks(run, ev.benchmarks) if ev.benchmarks else {}
    if bench:
        io.write_json(run.dir / "benchmarks.json", bench)
        outputs.append("benchmarks.json")
    over = _over_refusal(run, ev.over_refusal) if ev.over_refusal else {}
    if over:
        io.write_json(run.dir / "over_refusal.json", over)
        outputs.append("over_refusal.json")
    if ev.magnitude:
        outputs += _magnitude(run, comps, judged, over)
    selection = run.folder.selection()
    seconds = run.stage_seconds()
    seconds["evaluate"] = round(time.perf_counter() - started, 2)
    summary = summarize(judged, kl)
    for kind, conds in summary["results"].items():
        for cond, m in conds.items():
            m["judges"] = {name: v[kind][cond]["rates"] | {"failed": v[kind][cond]["failed"]}
                           for name, v in judges.items()}
            m["cross_entropy"] = {name: v.get(f"{kind}/{cond}") for name, v in ce.items()}
            if bench:
                m["benchmarks"] = bench.get(f"{kind}/{cond}")
            if over:
                m["over_refusal"] = {k: over[f"{kind}/{cond}"][k] for k in ("over_refusal", "compliance")}
            if split:
                m["reasoning"] = _reasoning_summary(judged[kind][cond], reasoning_judges, kind, cond)
    budgets: dict[str, dict[str, int]] = {c.prompts: {} for c in run.cfg.generate.conditions}
    for c in run.cfg.generate.conditions:
        budgets[c.prompts][c.name] = c.max_new_tokens or run.cfg.generate.max_new_tokens
    summary = {
        "model": run.cfg.model, "device": run.device_name(), "dtype": run.dtype, "preset": run.cfg.preset,
        "selected": {"pos": selection["pos"], "layer": selection["layer"]},  # derived from scores.json, the owner
        **summary, "max_new_tokens": run.cfg.generate.max_new_tokens, "stage_seconds": seconds,
        "max_new_tokens_per_condition": budgets,
        "thinking": (run.done("extract") or {}).get("thinking", {"mode": run.cfg.data.thinking}),
        "decoding": (run.done("generate") or {}).get("decoding"),  # which paths generated, and why
        "digests": run.digests,
    }
    if run.cfg.select.keep_refusal and (run.dir / "categories.json").is_file():  # kept, released, the gate's routing
        from .keep_refusal import summary_fields

        summary["keep_refusal"] = summary_fields(run, judged, kl)
    summary = extra.add_to(run, summary)  # a caller's own fields (Run.summary_extra), written with the rest
    io.write_json(run.dir / "summary.json", summary)
    return outputs + ["summary.json"], None


def _run_judges(comps: dict, specs: list[Any], part: str = "answer") -> dict:
    """``{judge name: {prompt set: {condition: {"n", "failed", "rates", "items"}}}}`` for every configured judge.

    ``part``: what is judged (:func:`~refusal.evaluation.judges.base.judge_part`): the final answer (the whole
    completion of a model that does not reason), or the reasoning of the completions that have one."""
    from ..evaluation.judges import make_judge
    from ..evaluation.judges import summarize as judge_summary
    from ..evaluation.judges.base import judge_part

    out: dict = {}
    for spec in specs:
        judge = make_judge(spec)
        items = [(kind, cond, r) for kind, conds in comps.items() for cond, recs in conds.items() for r in recs]
        # one call: a model judge batches over every condition
        verdicts = judge_part(judge, [r for _, _, r in items], part)
        res: dict = {}
        for (kind, cond, _), v in zip(items, verdicts):
            if v is not None:  # None: no reasoning in this completion
                res.setdefault(kind, {}).setdefault(cond, []).append(v)
        out[judge.name] = {kind: {cond: {**judge_summary(vs, judge.labels), "items": [v.to_json() for v in vs]}
                                  for cond, vs in conds.items()} for kind, conds in res.items()}
        console.print(f"Judged {len(items)} completions with {judge.name}" + ("" if part == "answer" else
                                                                                f" (their {part})"))
    return out


def _reasoning_summary(judged: list[dict], reasoning_judges: dict, kind: str, cond: str) -> dict:
    """One condition's reasoning: how many completions reason, how many were cut inside the reasoning (no answer),
    the substring refusal rate of the reasoning, and every judge's rates on it."""
    from ..evaluation.stats import Rate

    with_reasoning = [r for r in judged if r.get("refused_reasoning") is not None]
    return {"n_with_reasoning": len(with_reasoning),
            "cut_inside_reasoning": sum(bool(r.get("cut_inside_reasoning")) for r in judged),
            "refusal_in_reasoning": Rate.of(sum(bool(r["refused_reasoning"]) for r in with_reasoning),
                                            len(with_reasoning)).to_json(),
            "judges": {name: v[kind][cond]["rates"] | {"failed": v[kind][cond]["failed"]}
                       for name, v in reasoning_judges.items() if cond in v.get(kind, {})}}


def _condition_ivs(run: Run) -> dict[str, list[Intervention]]:
    """``{"prompt_set/condition": interventions}`` for every configured condition."""
    directions = run_directions(run)
    rankings = _layer_rankings(run)
    return {f"{c.prompts}/{c.name}": condition_interventions(c, directions, rankings)
            for c in run.cfg.generate.conditions}


def _benchmarks(run: Run, spec: BenchmarksConfig) -> dict:
    """lm-eval accuracies under every condition: ``{"prompt_set/condition": {task: {acc, n, ...}}}``."""
    from ..evaluation.benchmarks import run_benchmarks

    out = {}
    for name, ivs in _condition_ivs(run).items():
        console.print(f"Benchmarks under {name}")
        out[name] = run_benchmarks(run.model, run.tokenizer, list(spec.tasks), limit=spec.limit,
                                   interventions=ivs, data_dir=spec.data_dir,
                                   num_fewshot=spec.num_fewshot, batch_size=spec.batch_size)
    return out


def _over_refusal(run: Run, spec: OverRefusalConfig) -> dict:
    """Refusals on safe-looking prompts and compliance on unsafe ones, every condition in one generation."""
    from ..data.contrast import builtin_contrast, load_contrast
    from ..evaluation.over_refusal import over_refusal, to_json

    src = spec.contrast
    records = builtin_contrast() if src == "builtin" else load_contrast(src)
    res = over_refusal(run.model, run.tokenizer, records, _condition_ivs(run), spec.judge,
                       max_new_tokens=spec.max_new_tokens, batch_size=run.generate_batch_size,
                       system=run.cfg.system_prompt)
    return to_json(res)


def _magnitude(run: Run, comps: dict, judged: dict, over: dict) -> list[str]:
    """Projection of each test prompt (and contrast prompt) on the selected direction against its refusal."""
    from ..evaluation.magnitude import magnitude, plot_magnitude

    d = run.folder.selected_direction()
    recs = [(kind, r) for kind in ("harmful", "harmless") for r in judged.get(kind, {}).get("baseline", [])]
    if not recs:
        raise RefusalError("evaluate.magnitude needs the baseline conditions of the harmful and harmless prompts.",
                           "Keep {name: baseline, prompts: harmful/harmless} in generate.conditions.")
    out = {"test": magnitude(run.model, run.tokenizer, run.prompts([r for _, r in recs]), d,
                             labels=[bool(r["refused"]) for _, r in recs],
                             refusal_scores=[r["refusal_score"] for _, r in recs], kinds=[k for k, _ in recs])}
    plot_magnitude(out["test"], run.dir / "magnitude.png", title="Projection on the selected direction (test)")
    files = ["magnitude.json", "magnitude.png"]
    base = (over.get("harmful/baseline") or over.get("harmless/baseline") or {}).get("records")
    if base:
        out["contrast"] = magnitude(run.model, run.tokenizer, run.prompts([{"instruction": r["prompt"]} for r in base]),
                                    d, labels=[r["judgement"].get("label") == "refusal" for r in base],
                                    refusal_scores=[r["refusal_score"] for r in base],
                                    kinds=[str(r["label"]) for r in base])
        plot_magnitude(out["contrast"], run.dir / "magnitude_contrast.png",
                       title="Projection on the selected direction (contrast set)")
        files.append("magnitude_contrast.png")
    io.write_json(run.dir / "magnitude.json", out)
    return files


def _cross_entropy(run: Run, comps: dict, ev: EvaluateConfig) -> dict:
    """``{source name: {"prompt_set/condition": {loss, perplexity, tokens, sequences}}}``: CE under every
    condition's interventions (the model's own baseline completions to harmless prompts by default)."""
    from ..evaluation.cross_entropy import evaluate as ce_evaluate
    from ..evaluation.cross_entropy import prepare
    from ..interventions.hooks import apply

    directions = run_directions(run)
    rankings = _layer_rankings(run)
    conds = run.cfg.generate.conditions
    out: dict = {}
    for spec in ev.cross_entropy:
        source = spec["source"]
        mode: str | None
        if source == "completions":
            base = comps.get("harmless", {}).get("baseline")
            if not base:
                raise RefusalError("Cross-entropy on 'completions' needs a 'baseline' condition on harmless prompts.",
                                   "Add {name: baseline, prompts: harmless} to generate.conditions.")
            source, mode = [{"instruction": r["instruction"], "completion": r["completion"]} for r in base], \
                "completion"
        else:
            mode = spec.mode
        seqs = prepare(run.tokenizer, source, mode=mode, seq_len=spec.seq_len, max_tokens=spec.max_tokens,
                       allow_fewer=spec.allow_fewer, columns=spec.columns, system=run.cfg.system_prompt)
        res = {}
        for c in conds:
            with apply(run.model, condition_interventions(c, directions, rankings)):
                r = ce_evaluate(run.model, seqs, batch_size=run.ce_batch_size,
                                description=f"Cross-entropy {spec['name']} / {c.prompts} {c.name}")
            res[f"{c.prompts}/{c.name}"] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
        out[spec["name"]] = res
    return out
