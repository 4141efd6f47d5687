"""Candidate selection on a real chat model with real prompts: full sweep, pruned sweep, and the naive loop.

    python -m benchmarks.speed.select_real --model DIR --data refusal_direction/ [--out FILE]

Random weights give meaningless refusal scores, so the pruned sweep (bypass and KL only for candidates whose induce
score passes the filter) can only be measured on a real model. Prompts: 128 + 128 train and 32 + 32 val from a
folder laid out like the paper's splits, seed 42, no filtering. Candidates: every position × layers below 80 % of
depth, as in ``refusal run``. Checks that the full, pruned and plain (one padded batch per set) sweeps pick the
same direction, and how far the full and plain scores differ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.speed.pipeline import Clock, naive_select
from refusal import format_prompts, load_model, post_instruction_ids, refusal_token_ids
from refusal.data import load_source, make_splits
from refusal.directions.diff_means import extract
from refusal.errors import RefusalError
from refusal.layout import layout
from refusal.scoring.engine import score_candidates
from refusal.scoring.selection import choose


def _pick(scores, n_layers):
    try:
        sel = choose(scores, n_layers=n_layers)
    except RefusalError:  # e.g. a random model: nothing passes the filters
        return None
    return {"pos": sel.pos, "layer": sel.layer}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="folder with splits/harmful_train.json etc.")
    ap.add_argument("--batch", type=int, default=4096, help="sequences per forward")
    ap.add_argument("--naive-candidates", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    model, tok = load_model(a.model)
    dev = next(model.parameters()).device
    clock = Clock(dev)
    sizes = {"train": 128, "val": 32}
    sp = {k: make_splits(load_source(a.data, k), sizes, 42, k) for k in ("harmful", "harmless")}

    def prompts(kind, split):
        return format_prompts(tok, [r["instruction"] for r in sp[kind][split]])

    n_pos = len(post_instruction_ids(tok))
    cands = extract(model, tok, prompts("harmful", "train"), prompts("harmless", "train"), n_pos)
    n_layers = cands.n_layers
    layers = list(range(int(0.8 * n_layers)))
    hv, bv, rids = prompts("harmful", "val"), prompts("harmless", "val"), refusal_token_ids(tok)

    def sweep(prune, **kw):
        return score_candidates(model, tok, cands, hv, bv, rids, layers=layers, batch_size=a.batch,
                                prune_induce_below=0.0 if prune else None, **kw)

    sweep(False)  # warm-up
    full_s, full = clock.time(lambda: sweep(False))
    pruned_s, pruned = clock.time(lambda: sweep(True))
    # the same sweep with one padded batch per set (no shared prefix, no length buckets): the scores must agree
    plain_kw = {"share_prefix": False, "max_buckets": 1}
    sweep(False, **plain_kw)
    plain_s, plain = clock.time(lambda: sweep(False, **plain_kw))
    pick_full, pick_pruned, pick_plain = _pick(full, n_layers), _pick(pruned, n_layers), _pick(plain, n_layers)
    max_diff = {k: round(float((getattr(full, k) - getattr(plain, k)).abs().nan_to_num().max()), 5)
                for k in ("bypass", "induce", "kl")}

    diffs = cands.diffs.to(dev)
    units = diffs / diffs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cand = [(p, layer) for layer in layers for p in range(n_pos) if not full.induce[p, layer].isnan()]
    naive = naive_select(model, tok, clock, units, diffs, cand, hv, bv, torch.tensor(rids, device=dev),
                         a.naive_candidates)
    res = {
        "device_name": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "model": a.model, "dtype": str(model.dtype), "n_layers": n_layers, "candidates": len(cand),
        "candidates_passing_induce": int((full.induce > 0).sum()),
        "shared_prefix_tokens": layout(tok, hv + bv, "cpu").prefix_len,
        "select_full_s": round(full_s, 3), "select_pruned_s": round(pruned_s, 3),
        "select_plain_s": round(plain_s, 3), "max_abs_diff_full_vs_plain": max_diff,
        "select_naive_s": round(naive["select_naive_s"], 3), "naive_candidates_timed": naive["naive_candidates_timed"],
        "speedup_full_vs_naive": round(naive["select_naive_s"] / full_s, 2),
        "speedup_pruned_vs_naive": round(naive["select_naive_s"] / pruned_s, 2),
        "selected_full": pick_full, "selected_pruned": pick_pruned, "selected_plain": pick_plain,
        "same_pick": pick_full == pick_pruned == pick_plain,
    }
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
