"""How well the keep-refusal condition tells released from kept prompts, on prompts it never saw: the shipped design
(``refusal.directions.condition``: ridge on the prompt's mean residual stream, cross-validated, threshold for a
target kept-release rate) against the design it replaced (a nearest-centroid rule on the prompt's last token, fitted
on train, layer by val balanced accuracy), and the two halves of the change on their own (ridge on the last token;
nearest centroid on the mean).

The prompts are split exactly as ``refusal run`` splits them (``make_splits``, the run's seed and sizes): the
condition learns from the harmful train and val prompts (the nearest-centroid design from train, its layer from val,
as it did) and is scored on the held-out test prompts, and on JailbreakBench with its categories mapped onto
StrongREJECT's (``JBB_TO_SR``; a category with no counterpart counts as released). One forward pass per pool reads
every prompt at every candidate layer; the fits take seconds.

    python -m benchmarks.quality.keep_condition --model /tmp/m/hf --data .data/refusal_direction \
        --out benchmarks/results/keep-condition-cpu.json [--device cpu --dtype float32]
    DRY=1 python -m benchmarks.quality.keep_condition --data ../shared/datasets/refusal_direction --out /tmp/kc.json

Writes OUT (JSON: command, date, device, model, split sizes, per design: the layer, the fit's record, and on each
test set the ROC AUC, the share of released prompts released and of kept prompts released with Wilson intervals,
and the share released per category).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality.keep_refusal import JBB_TO_SR, device_name, tiny_model

KEEP = ("Sexual content", "Violence")


def centroid_rule(x: torch.Tensor, released: torch.Tensor, shrinkage: float = 0.5) -> tuple[torch.Tensor, float]:
    """The replaced design's rule at one layer: nearest centroid after centring and per-dimension scaling (diagonal
    LDA, equal priors) as a linear rule ``x·w > b`` (released)."""
    from refusal.directions.condition import standardise

    mean, scale = standardise(x.float(), shrinkage)
    z = (x - mean) / scale
    c_r, c_k = z[released].mean(0), z[~released].mean(0)
    w = (c_r - c_k) / scale.squeeze(0)
    b = float((c_r.pow(2).sum() - c_k.pow(2).sum()) / 2 + mean.squeeze(0) @ w)
    return w, b


def balanced(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred[y].float().mean() + (~pred[~y]).float().mean()) / 2)


def fit_centroid(feats: torch.Tensor, cats: list[str], n_train: int, layers: list[int]) -> dict[str, Any]:
    """Fit on the first ``n_train`` prompts at every layer, the layer with the best balanced accuracy on the rest
    (ties to the earlier one), as the replaced design did."""
    y = torch.tensor([c not in KEEP for c in cats])
    best = None
    for j in range(len(layers)):
        w, b = centroid_rule(feats[j, :n_train], y[:n_train])
        acc = balanced(feats[j, n_train:] @ w > b, y[n_train:])
        if best is None or acc > best[0] + 1e-12:
            best = (acc, j, w, b)
    assert best is not None
    acc, j, w, b = best
    return {"layer": layers[j], "j": j, "weight": w, "threshold": b, "record": {"val_balanced_accuracy":
                                                                               round(acc, 4)}}


def score(feats: torch.Tensor, cats: list[str], design: dict) -> dict[str, Any]:
    """ROC AUC, release rates of released and kept prompts (Wilson intervals) and per category, on ``feats`` (the
    design's layer already taken)."""
    from refusal.directions.condition import auc
    from refusal.evaluation.stats import Rate

    s = feats.float() @ design["weight"].float() - design["threshold"]
    pred = s > 0
    y = torch.tensor([c not in KEEP for c in cats])
    by_cat: dict[str, list[bool]] = {}
    for c, p in zip(cats, pred.tolist()):
        by_cat.setdefault(c, []).append(bool(p))
    return {"n": {"released": int(y.sum()), "kept": int((~y).sum())}, "auc": round(auc(s, y), 4),
            "released_released": Rate.of(int(pred[y].sum()), int(y.sum())).to_json(),
            "kept_released": Rate.of(int(pred[~y].sum()), int((~y).sum())).to_json(),
            "balanced_accuracy": round(balanced(pred, y), 4),
            "released_by_category": {c: {"released": sum(v), "n": len(v)} for c, v in by_cat.items()}}


def random_splits(feats: torch.Tensor, cats: list[str], layers: list[int], released: list[str], skip: int,
                  n_fit: int, n: int, max_kept_release: float) -> dict[str, Any]:
    """The shipped design refitted on ``n`` random splits (seeds 0..n-1) of the StrongREJECT prompts into ``n_fit``
    to fit and the rest to test: how its threshold, set for ``max_kept_release`` out of fold, holds on new prompts."""
    import random

    from refusal.directions.condition import fit_keep_condition

    rows = []
    for seed in range(n):
        idx = list(range(len(cats)))
        random.Random(seed).shuffle(idx)
        fit, test = idx[:n_fit], idx[n_fit:]
        c = fit_keep_condition(feats[:, fit], [cats[i] for i in fit], layers, list(KEEP), released, pool="mean",
                               skip=skip, max_kept_release=max_kept_release, seed=seed)
        r = score(feats[layers.index(c.layer)][test], [cats[i] for i in test],
                  {"weight": c.weight, "threshold": c.threshold})
        rows.append({"seed": seed, "layer": c.layer, "penalty": c.info["penalty"],
                     "out_of_fold_kept_released": c.info["out_of_fold"]["kept_released"],
                     "test_kept_released": r["kept_released"], "test_released_released": r["released_released"],
                     "test_auc": r["auc"]})
    kept = [r["test_kept_released"]["rate"] for r in rows]
    rel = [r["test_released_released"]["rate"] for r in rows]
    return {"n": n, "n_fit": n_fit, "target": max_kept_release, "rows": rows,
            "test_kept_released": {"mean": round(sum(kept) / n, 4), "min": min(kept), "max": max(kept)},
            "test_released_released": {"mean": round(sum(rel) / n, 4), "min": min(rel), "max": max(rel)}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder (not needed with DRY=1: a tiny random Qwen2)")
    ap.add_argument("--data", default=".data/refusal_direction", help="the refusal_direction folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--seed", type=int, default=42, help="the run's data.seed (default 42)")
    ap.add_argument("--n-train", type=int, default=140, help="the keep_refusal benchmark's data.n_train")
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--max-kept-release", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--splits", type=int, default=0,
                    help="also refit the shipped design on this many random splits of StrongREJECT (the run's sizes) "
                         "and report its kept-release and released rates on each split's held-out prompts")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    from refusal.data.sources import load_source, make_splits
    from refusal.directions.condition import fit_keep_condition, prompt_activations
    from refusal.models.loading import load_model
    from refusal.templates import format_prompts, pre_instruction_length

    data = Path(a.data)
    tiny = os.environ.get("DRY") == "1"
    if tiny:
        work = Path(tempfile.mkdtemp(prefix="keep-condition-"))
        tiny_model(work / "tiny")
        a.model = str(work / "tiny")
    if not a.model:
        sys.exit("error: --model is required (or DRY=1)")
    sr = load_source(str(data / "processed/strongreject.json"), "harmful")
    n_test = len(sr.splits["all"]) - a.n_train - a.n_val
    splits = make_splits(sr, {"train": a.n_train, "val": a.n_val, "test": n_test}, a.seed, "harmful")
    jbb = [{**r, "category": JBB_TO_SR.get(r["category"], r["category"])}
           for r in json.loads((data / "processed/jailbreakbench.json").read_text("utf-8"))]
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype)
    from refusal.models.parts import find_parts

    n_layers = find_parts(model).n_layers
    layers = [i for i in range(n_layers) if i < int(0.8 * n_layers)] or [0]  # select's defaults: stride 1, 0.8
    sets = {"fit": splits["train"] + splits["val"], "test": splits["test"], "jailbreakbench": jbb}
    rows = [r for s in sets.values() for r in s]
    prompts = format_prompts(tok, [r["instruction"] for r in rows])
    skip = pre_instruction_length(tok)
    cats = [str(r["category"]) for r in rows]
    feats = {pool: prompt_activations(model, tok, prompts, layers, pool=pool, skip=skip, batch_size=a.batch_size,
                                      description=f"{pool} pool, {len(prompts)} prompts")
             for pool in ("mean", "last")}
    n_fit, n_test = len(sets["fit"]), len(sets["test"])
    cut = {"test": slice(n_fit, n_fit + n_test), "jailbreakbench": slice(n_fit + n_test, len(rows))}
    released = sorted({c for c in cats[:n_fit] if c not in KEEP})
    designs: dict[str, dict] = {}
    for pool in ("mean", "last"):
        f = feats[pool]
        c = fit_keep_condition(f[:, :n_fit], cats[:n_fit], layers, list(KEEP), released, pool=pool, skip=skip,
                               max_kept_release=a.max_kept_release, seed=a.seed)
        designs[f"ridge-cv, {pool} pool" + (" (shipped)" if pool == "mean" else "")] = {
            "layer": c.layer, "j": layers.index(c.layer), "weight": c.weight, "threshold": c.threshold,
            "record": {k: c.info[k] for k in ("penalty", "out_of_fold", "folds", "max_kept_release")}}
        designs[f"nearest centroid, {pool} pool" + (" (replaced)" if pool == "last" else "")] = fit_centroid(
            f[:, :n_fit], cats[:n_fit], a.n_train, layers)
    results = {}
    for name, d in designs.items():
        f = feats["mean" if "mean pool" in name else "last"][d["j"]]
        results[name] = {"layer": d["layer"], "fit": d["record"],
                         **{s: score(f[sl], cats[sl], d) for s, sl in cut.items()}}
        print(f"{name:38s} layer {d['layer']:2d}  test AUC {results[name]['test']['auc']:.3f}  kept released "
              f"{results[name]['test']['kept_released']['rate']:.2f}  released released "
              f"{results[name]['test']['released_released']['rate']:.2f}  | JBB AUC "
              f"{results[name]['jailbreakbench']['auc']:.3f}")
    splits_out = random_splits(feats["mean"][:, :n_fit + n_test], cats[:n_fit + n_test], layers, released, skip,
                               n_fit, a.splits, a.max_kept_release) if a.splits else None
    import transformers

    out = {
        "command": "python -m benchmarks.quality.keep_condition " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dry": tiny,
        "device": device_name() if str(next(model.parameters()).device).startswith("cuda") else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": a.model, "dtype": str(next(model.parameters()).dtype), "layers": layers, "skip": skip,
        "kept": list(KEEP), "released": released, "seed": a.seed,
        "sizes": {"fit (train + val)": n_fit, "train (centroid fit)": a.n_train, "val (centroid layer)": a.n_val,
                  "test": n_test, "jailbreakbench": len(jbb)}, "jbb_mapping": JBB_TO_SR,
        "designs": results, "random_splits": splits_out, "wall_s": round(time.perf_counter() - t0, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
