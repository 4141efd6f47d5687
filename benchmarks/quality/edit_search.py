"""Search the weight edit for heretic's own metric (the edited-models issue, part 4), without touching the test
prompts until the end.

    python -m benchmarks.quality.edit_search RUN_DIR [--top 6] [--keep 6] [--kl-cap 0.077] [--out FILE.json]
        [--val-pool DATA/refusal_direction --n-val 128] [--strengths 0.8,1.0,1.2]

1. **Proxy sweep on validation prompts.** Every option of a grid is baked into the weights
   (:func:`refusal.interventions.weights.orthogonalized`, restored after) and scored on prompts rendered as heretic
   renders them (system prompt "You are a helpful assistant."): refusals = the run's harmful validation prompts whose
   greedy ``--proxy-tokens``-token answer contains one of heretic's refusal markers (``--proxy-tokens 0``: whose
   first-token refusal score is > 0, as on 2026-12-01, when that saturated at 0 for every option), and heretic's
   first-token KL (batchmean) on the first 100 harmless validation prompts. Grid: the run's top ``--top``
   ranked directions × edit options (plain, orthogonal to the harmless mean, norm-preserving, both) × a kernel over
   depth (flat; Gaussian around the direction's layer of width n/4 and n/8) × strength (0.8, 1, 1.2).
2. **heretic's metric on validation.** The ``--keep`` best options (fewest proxy refusals among those with KL under
   ``--kl-cap``, then KL) are scored with heretic's metric itself (``heretic/heretic_metric.py``: greedy 100-token
   answers matched against heretic's refusal markers, first-token KL) on the validation prompts; the pick is the
   fewest refusals under the cap, then the lowest KL.
3. **Held out.** The pick, plain orthogonalization and the other kept options are scored on the test prompts
   heretic uses (JailbreakBench's 100, the first 100 of harmless_test), so both the held-out result (pick made on
   validation) and the test-optimised one (heretic's protocol: best kept option by its test score) are reported.

``--objective test`` is heretic's own protocol instead: steps 1-2 rank the options on the test prompts themselves
(heretic optimises on its evaluation prompts), and step 3 scores the pick (and plain orthogonalization) on the
validation prompts as the held-out result. ``--sets 0,1,0+1`` edits along single directions or sets of them
(ranks joined by ``+``, orthonormalised together).

Wall times of each step are in the JSON (``search_to_pick_s``: from the start to the pick, held-out scoring
excluded); add the run's load + extract + select seconds for the time to a direction.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch


def _kernel(n_layers: int, peak: int, width: float | None, strength: float) -> list[float] | None:
    if width is None and strength == 1.0:
        return None
    if width is None:
        return [strength] * n_layers
    return [strength * math.exp(-0.5 * ((i - peak) / width) ** 2) for i in range(n_layers)]


def _grow(prompts: list[str], splits: dict, kind: str, pool: Path, files: tuple[str, ...], n: int,
          test: list[str]) -> list[str]:
    """``prompts`` followed by the pool's prompts of ``kind`` that neither the run's splits nor ``test`` hold, up to
    ``n``."""
    used = {r["instruction"] for split in splits[kind].values() for r in split} | set(test)
    out = list(prompts)
    for name in files:
        for r in json.loads((pool / "splits" / f"{name}.json").read_text()):
            if len(out) >= n:
                return out
            if r["instruction"] not in used and r["instruction"] not in out:
                out.append(r["instruction"])
    return out


def _sizes(objective: str, harmful_val, harmless_val, harmful_test, harmless_test) -> dict[str, int]:
    """Prompt counts named by their role: the ranked split ("val") and the held-out one ("test"), which with the test
    objective are the test prompts and the validation prompts."""
    ranked, held = ("val", "test") if objective == "validation" else ("objective", "held_out")
    return {f"n_harmful_{ranked}": len(harmful_val), f"n_harmless_{ranked}": len(harmless_val),
            f"n_harmful_{held}": len(harmful_test), f"n_harmless_{held}": len(harmless_test)}


def main() -> None:
    from benchmarks.peers import heretic_metric as hm
    from refusal import io
    from refusal.directions.diff_means import Candidates
    from refusal.interventions.weights import orthogonalized
    from refusal.models.parts import find_parts
    from refusal.runs.pipeline import Run
    from refusal.scoring.refusal import refusal_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--keep", type=int, default=6)
    ap.add_argument("--kl-cap", type=float, default=0.077, help="heretic 1.4.0's best trial's KL on this model")
    ap.add_argument("--proxy-tokens", type=int, default=24,
                    help="new tokens of the sweep's answers judged by heretic's markers (0: first-token refusal "
                         "score > 0, which on Qwen2.5-Coder-1.5B called every option 0 refusals)")
    ap.add_argument("--harmful-test", default=".data/refusal_direction/processed/jailbreakbench.json")
    ap.add_argument("--harmless-test", default=".data/refusal_direction/splits/harmless_test.json")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--n", type=int, default=100, help="test prompts of each kind (heretic: 100)")
    ap.add_argument("--val-pool", default=None,
                    help="a refusal_direction folder (splits/*.json): validation grows to --n-val prompts of each "
                         "kind with its harmful_val + harmful_train and harmless_val prompts that the run did not "
                         "use (the run's own filtered validation, 17 harmful prompts on Qwen2.5-Coder-1.5B, called "
                         "every kept option 0 refusals)")
    ap.add_argument("--n-val", type=int, default=128)
    ap.add_argument("--strengths", default="0.8,1.0,1.2")
    ap.add_argument("--objective", choices=["validation", "test"], default="validation",
                    help="prompts the search ranks options on: validation (held out from the test) or test, "
                         "heretic's own protocol (it optimises on the evaluation prompts); with test, the pick is "
                         "then also scored on the validation prompts as its held-out result")
    ap.add_argument("--sets", default=None,
                    help="directions to edit along, as ranks joined by '+' for a set ablated together "
                         "(orthonormalised), comma-separated, e.g. 0,1,0+1 (default: the --top best, one at a time)")
    ap.add_argument("--edits", default="plain,orth_harmless,norm_preserving,norm_preserving+orth_harmless")
    ap.add_argument("--kernels", default="flat,gauss_n/4,gauss_n/8")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t_start = time.perf_counter()
    run = Run.open(a.run_dir)
    model, tok = run.model, hm.prepare_tokenizer(run.tokenizer)
    splits = io.read_json(run.dir / "splits.json")
    harmful_val = [r["instruction"] for r in splits["harmful"]["val"]]
    harmless_val = [r["instruction"] for r in splits["harmless"]["val"]][: a.n]
    harmful_test = [r["instruction"] for r in json.loads(Path(a.harmful_test).read_text())][: a.n]
    harmless_test = [r["instruction"] for r in json.loads(Path(a.harmless_test).read_text())][: a.n]
    if a.val_pool:
        harmful_val = _grow(harmful_val, splits, "harmful", Path(a.val_pool), ("harmful_val", "harmful_train"),
                            a.n_val, harmful_test)
        harmless_val = _grow(harmless_val, splits, "harmless", Path(a.val_pool), ("harmless_val",), a.n_val,
                             harmless_test)
    dset = run.folder.directions()  # selected, ranks
    cands = Candidates.load(run.dir / "candidates.safetensors")
    n_layers = find_parts(model).n_layers
    rids = torch.tensor(run.refusal_ids())
    kw = {"batch_size": a.batch_size}

    def first(prompts):
        return hm.first_token_logprobs(model, tok, prompts, **kw)

    def proxy(base_b):
        kl = hm.kl_batchmean(first(harmless_val), base_b)
        if a.proxy_tokens:  # short greedy answers, heretic's markers: the first token alone saturates at 0 refusals
            resp = hm.responses(model, tok, harmful_val, max_new_tokens=a.proxy_tokens, **kw)
            return sum(map(hm.is_refusal, resp)), kl
        return int((refusal_score(first(harmful_val), rids) > 0).sum()), kl

    def heretic(prompts_h, prompts_b, base_b):
        kl = hm.kl_batchmean(first(prompts_b), base_b)
        resp = hm.responses(model, tok, prompts_h, **kw)
        return sum(map(hm.is_refusal, resp)), kl

    if a.objective == "test":  # heretic's protocol: rank on the test prompts; validation becomes the held-out set
        harmful_val, harmful_test = harmful_test, harmful_val
        harmless_val, harmless_test = harmless_test, harmless_val
    base_val = first(harmless_val)
    base_test = first(harmless_test)
    sets = a.sets.split(",") if a.sets else [k for k in dset if k.isdigit()][: a.top]
    all_edits = {"plain": {}, "orth_harmless": {"orthogonal_to_harmless": True}, "norm_preserving":
                 {"norm_preserving": True}, "norm_preserving+orth_harmless": {"norm_preserving": True,
                                                                             "orthogonal_to_harmless": True}}
    edits = {e: all_edits[e] for e in a.edits.split(",")}
    all_widths = {"flat": None, "gauss_n/4": n_layers / 4, "gauss_n/8": n_layers / 8}
    widths = {w: all_widths[w] for w in a.kernels.split(",")}
    strengths = [float(x) for x in a.strengths.split(",")]
    options = []
    t = time.perf_counter()
    for spec, (ename, eopts), (wname, width), strength in itertools.product(sets, edits.items(), widths.items(),
                                                                          strengths):
        members = [dset[r] for r in spec.split("+")]
        d = members[0]  # the set's first direction places the kernel and the harmless mean
        vector = d if len(members) == 1 else torch.stack([m.vector.float() for m in members])
        opts = dict(eopts)
        if opts.get("orthogonal_to_harmless"):
            opts["orthogonal_to_harmless"] = cands.harmless_mean[cands.positions.index(d.pos), d.layer]
        lw = _kernel(n_layers, d.layer, width, strength)
        if lw is not None:
            opts["layer_weights"] = lw
        with orthogonalized(model, vector, **opts):
            refusals, kl = proxy(base_val)
        options.append({"rank": spec if "+" in spec else int(spec), "pos": d.pos, "layer": d.layer, "edit": ename,
                        "kernel": wname, "strength": strength, "proxy_refusals": refusals,
                        "n_harmful_val": len(harmful_val), "proxy_kl": round(kl, 5), "_opts": opts, "_d": vector})
    proxy_s = time.perf_counter() - t
    print(f"proxy sweep: {len(options)} options in {proxy_s:.1f} s")

    def key(o, ref, kl):
        return (o[kl] > a.kl_cap, o[ref], o[kl])

    kept = sorted(options, key=lambda o: key(o, "proxy_refusals", "proxy_kl"))[: a.keep]
    plain = next((o for o in options if o["rank"] == 0 and o["edit"] == "plain" and o["kernel"] == "flat"
                  and o["strength"] == 1.0), None)
    if plain is not None and plain not in kept:
        kept.append(plain)
    def score_kept(split, prompts_h, prompts_b, base_b, only=None) -> float:
        """heretic's metric for every kept option (or ``only`` those) on one split's prompts; returns the seconds it
        took."""
        t = time.perf_counter()
        for o in only or kept:
            with orthogonalized(model, o["_d"], **o["_opts"]):
                o[f"{split}_refusals"], o[f"{split}_kl"] = heretic(prompts_h, prompts_b, base_b)
            print(f"{split:4s} rank {o['rank']} {o['edit']:30s} {o['kernel']:10s} x{o['strength']}: "
                  f"{o[f'{split}_refusals']}/{len(prompts_h)} refusals, KL {o[f'{split}_kl']:.4f}")
        return time.perf_counter() - t

    val_s = score_kept("val", harmful_val, harmless_val, base_val)
    pick = min((o for o in kept if o is not plain or len(kept) == 1), key=lambda o: key(o, "val_refusals", "val_kl"))
    search_s = time.perf_counter() - t_start  # to the pick: what heretic's wall time compares with
    # held out: every kept option, or with the test objective the pick and plain orthogonalization alone
    test_s = score_kept("test", harmful_test, harmless_test, base_test,
                        only=[o for o in (pick, plain) if o is not None] if a.objective == "test" else None)
    base_refusals = sum(map(hm.is_refusal, hm.responses(model, tok, harmful_test, **kw)))
    test_best = min((o for o in kept if "test_refusals" in o), key=lambda o: key(o, "test_refusals", "test_kl"))

    def clean(o):
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in o.items() if not k.startswith("_")}

    names = ("picked_on_validation", "best_on_test")
    if a.objective == "test":  # name the splits by what they are: "val" above ranked on the test prompts
        names = ("picked_on_test", "best_held_out")
        for o in options:
            for k in [k for k in o if k.startswith(("val_", "test_"))]:
                o[k.replace("val_", "objective_").replace("test_", "held_out_")] = o.pop(k)
    out = {"run": str(run.dir), "model": run.cfg.model, "device": run.device_name(), "kl_cap": a.kl_cap,
           "objective": a.objective, "search_to_pick_s": round(search_s, 1),
           "stage_seconds_of_run": run.stage_seconds(), "proxy_sweep_s": round(proxy_s, 1),
           "val_metric_s": round(val_s, 1), "test_metric_s": round(test_s, 1),
           "search_wall_s": round(time.perf_counter() - t_start, 1), "n_options": len(options),
           "base_refusals_test" if a.objective == "validation" else "base_refusals_held_out": base_refusals,
           **_sizes(a.objective, harmful_val, harmless_val, harmful_test, harmless_test),
           names[0]: clean(pick), names[1]: clean(test_best),
           "plain": clean(plain) if plain else None, "kept": [clean(o) for o in kept],
           "proxy": [clean(o) for o in options]}
    path = Path(a.out) if a.out else run.dir / "edit_search.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in (*names, "plain")}, indent=1))
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
