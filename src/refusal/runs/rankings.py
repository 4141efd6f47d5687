"""The select stage's rankings and picks beyond the paper's rule: components ranked locally and globally (with the
Spearman correlation of the two rankings), INLP's best component, and a judge as the selection objective."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, cast

import torch

from ..batching import console
from ..directions.base import Direction, DirectionSet
from ..errors import RefusalError
from ..generation.batched import generate as generate_completions

if TYPE_CHECKING:
    from ..directions.diff_means import Candidates
    from ..scoring.selection import Scores
    from .pipeline import Run


def judge_objective(run: Run, cands: Candidates, top: list[tuple[int, int]], harmful_val: list[dict]) -> dict:
    """Judge short completions of the harmful validation prompts under each candidate's ablation (all candidates in
    one batched generation) and pick the lowest judged refusal rate (ties: the better refusal score, i.e. rank)."""
    from ..evaluation.judges import make_judge
    from ..evaluation.stats import Rate
    from ..interventions.hooks import Plan, ablation

    judge = make_judge(run.cfg.select.objective)
    if judge.kind != "refusal":
        raise RefusalError(f"select.objective's judge '{judge.name}' gives {judge.kind} verdicts.",
                           "Use a refusal judge (substring, refusal_score, llm or openai with the refusal rubric).")
    prompts = run.prompts(harmful_val)
    rows = [[ablation(cands.direction(p, la))] for p, la in top for _ in prompts]
    # with refusal_ids, generate returns the texts and their first-token refusal scores
    texts, first = cast(tuple[list[str], torch.Tensor], generate_completions(
        run.model, run.tokenizer, prompts * len(top), max_new_tokens=run.cfg.select.judge_max_new_tokens,
        batch_size=run.generate_batch_size, plan=Plan.rows(run.model, rows), refusal_ids=run.refusal_ids(),
        description="Judging the best candidates"))
    items = [{"instruction": r["instruction"], "completion": t, "refusal_score": float(f)}
             for r, t, f in zip(harmful_val * len(top), texts, first.tolist())]
    verdicts = judge.judge(items)
    out: list[dict[str, Any]] = []
    n = len(prompts)
    for j, (p, la) in enumerate(top):
        vs = verdicts[j * n:(j + 1) * n]
        out.append({"pos": p, "layer": la, "rank": j,
                    "refusal": Rate.of(sum(v.refused for v in vs), n).to_json(), "failed": sum(v.failed for v in vs)})
    best = min(out, key=lambda c: (c["refusal"]["rate"], c["rank"]))
    console.print(f"Judge objective ({judge.name}): picked position {best['pos']}, layer {best['layer']} (judged "
                  f"refusal {best['refusal']['rate']:.2f} on {n} validation prompts; rank {best['rank']} by the "
                  "refusal score)")
    return {"judge": judge.name, "max_new_tokens": run.cfg.select.judge_max_new_tokens, "candidates": out,
            "pick": {"pos": best["pos"], "layer": best["layer"]}}


def _by_layer(bypass: dict[tuple[int, int], float]) -> list[int]:
    """Layers best first, each by the lowest bypass of its positions."""
    best: dict[int, float] = {}
    for (_, layer), v in bypass.items():
        best[layer] = min(best.get(layer, float("inf")), v)
    return sorted(best, key=lambda la: best[la])


def _ranking_summary(comps: list[tuple[int, int]], local: list[float] | None, glob: list[float] | None) -> dict:
    from ..scoring.plans import spearman

    main = glob if glob is not None else local or []
    out = {"components": [{"pos": p, "layer": la} for p, la in comps],
           "layers": _by_layer({c: v for c, v in zip(comps, main)})}
    if local is not None:
        out["local_bypass"] = [round(v, 5) for v in local]
    if glob is not None:
        out["global_bypass"] = [round(v, 5) for v in glob]
    if local is not None and glob is not None and len(comps) > 1:
        out["spearman_local_global"] = round(spearman(local, glob), 4)
    return out


def rank_diff_means(run: Run, scores: Scores, cands: Candidates, layers: list[int], hv: list[str],
                    bv: list[str]) -> dict:
    """The paper's (global) bypass of every candidate; with select.ranking local/both also its bypass when ablated
    at its source layer only, and the Spearman correlation of the two rankings."""
    from ..interventions.hooks import ablation
    from ..scoring.plans import score_interventions

    comps = [(p, la) for la in layers for p in cands.positions
             if not math.isnan(float(scores.bypass[cands.positions.index(p), la]))]
    glob = [float(scores.bypass[cands.positions.index(p), la]) for p, la in comps]
    local = None
    if run.cfg.select.ranking in ("local", "both") and comps:
        cand = [[ablation(cands.direction(p, la), layers=[la])] for p, la in comps]
        t = time.perf_counter()
        res = score_interventions(run.model, run.tokenizer, hv, cand, run.refusal_ids(),
                                  batch_size=run.score_batch_size, description="Ranking diff-in-means locally")
        local = res.mean()[0].tolist()
        console.print(f"Local ranking of {len(comps)} candidates: {time.perf_counter() - t:.1f} s")
    return _ranking_summary(comps, local, glob if run.cfg.select.ranking != "local" else None)


def rank_inlp(run: Run, cands: Candidates, hv: list[str], bv: list[str], ranked_set: DirectionSet) -> dict:
    """Score every INLP component's nullspace projection (locally at its layer and/or globally at every layer),
    pick the one with the lowest bypass among KL < the threshold, and add to the direction set: ``inlp`` (its
    subspace) and ``inlp_first`` (its first classifier direction rescaled to the diff-in-means norm there)."""
    from ..directions.inlp import InlpResult
    from ..interventions.hooks import ablation
    from ..scoring.plans import score_interventions

    res = InlpResult.load(run.dir / "inlp.safetensors")
    comps = [(p, la) for p in res.positions for la in res.layers if int(res.rank[res.index(p, la)]) > 0]
    if not comps:
        raise RefusalError("INLP found no separating direction at any component.",
                           "Lower extract.inlp.min_accuracy, use more training prompts, or drop inlp from "
                           "extract.methods.")
    mode = run.cfg.select.ranking
    t = time.perf_counter()
    got: dict[str, tuple[list[float], list[float]]] = {}
    for which in (("local", "global") if mode == "both" else (mode,)):
        cand = [[ablation(res.direction(p, la), layers=[la] if which == "local" else "all")] for p, la in comps]
        sc = score_interventions(run.model, run.tokenizer, list(hv) + list(bv), cand, run.refusal_ids(),
                                 batch_size=run.score_batch_size, description=f"Ranking INLP ({which})")
        nh = len(hv)
        got[which] = (sc.mean(slice(0, nh))[0].tolist(), sc.mean(slice(nh, None))[1].tolist())
    seconds = time.perf_counter() - t
    main = "global" if "global" in got else "local"
    bypass, kl = got[main]
    ok = [i for i, v in enumerate(kl) if v < run.cfg.select.kl_threshold]
    if not ok:
        raise RefusalError(f"No INLP component's nullspace projection kept the KL below {run.cfg.select.kl_threshold} "
                           f"(lowest {min(kl):.3f}).", "Raise select.kl_threshold, or look at rankings.json.")
    best = min(ok, key=lambda i: bypass[i])
    p, la = comps[best]
    sub = res.direction(p, la)
    dm = cands.direction(p, la)
    first = res.first_direction(p, la)
    scores = {"bypass": bypass[best], "kl": kl[best]}
    ranked_set["inlp"] = Direction(sub.vectors, la, p, res.model, "inlp", scores, sub.data_digest, sub.extra)
    ranked_set["inlp_first"] = Direction(first * dm.vector.norm(), la, p, res.model, "inlp_first", scores,
                                         extra={"rescaled_to": "diff_means norm at the same component"})
    cos = float(torch.nn.functional.cosine_similarity(first, dm.vector, dim=0))
    cos_sel = float(torch.nn.functional.cosine_similarity(first, ranked_set["selected"].vector, dim=0))
    console.print(f"INLP: selected position {p}, layer {la} (rank {sub.k}, bypass {bypass[best]:.3f}, KL "
                  f"{kl[best]:.4f}); cosine of its first direction with diff-in-means there {cos:.3f}, with the "
                  f"selected diff-in-means direction {cos_sel:.3f}")
    from ..directions.inlp import plot_accuracy

    plot_accuracy(res, p, la, run.dir / "inlp_selected_accuracy.png")  # the chosen component's rounds
    out = _ranking_summary(comps, got.get("local", (None,))[0], got.get("global", (None,))[0])
    out.update({"selected": {"pos": p, "layer": la, "rank": sub.k, "bypass": bypass[best], "kl": kl[best]},
                "kl": [round(v, 5) for v in kl], "cosine_first_vs_diff_means_same_component": round(cos, 4),
                "cosine_first_vs_selected_diff_means": round(cos_sel, 4), "seconds": round(seconds, 2)})
    return out
