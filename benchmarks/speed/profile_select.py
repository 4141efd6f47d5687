"""Where candidate selection spends its time: each variant of ``score_candidates`` timed, and the top GPU kernels.

    python -m benchmarks.speed.profile_select --arch llama3-8b --layers 8

Uses the prompts and random-weight model of :mod:`benchmarks.speed.pipeline` (same flags for lengths and template).
Variants: plain (one left-padded batch per set), buckets only, shared prefix only, both (the default).
"""

from __future__ import annotations

import argparse
import random
import traceback
import warnings
from collections import Counter

import torch

from benchmarks.speed.pipeline import (
    ARCHS,
    FIRST_ID,
    TEMPLATE_OPENING,
    Clock,
    IdTokenizer,
    build_model,
    length_sampler,
    make_prompts,
)


def time_phases() -> None:
    """Print the time of each ``in_batches`` loop of ``score_candidates`` (its phases), synchronised."""
    import time

    import refusal.scoring.engine as sel

    inner = sel.in_batches
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(fn, items, batch_size, description="", **kw):
        sync()
        t = time.perf_counter()
        out = inner(fn, items, batch_size, description, **kw)
        sync()
        print(f"    {description or 'batches'}: {len(items)} items in packs of {batch_size}, "
              f"{time.perf_counter() - t:.3f} s")
        return out

    sel.in_batches = timed


def find_syncs(fn) -> Counter:
    """Where ``fn()`` makes the host wait for the GPU: counts by the innermost calling line in refusal or
    transformers (CUDA's sync debug mode warns at each synchronising operation)."""
    counts: Counter = Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/refusal/" in f.filename or "/transformers/" in f.filename]
        where = frames[-1] if frames else None
        counts[f"{where.filename.split('/src/')[-1]}:{where.lineno} {where.line}" if where else filename] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = show
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed.profile_select")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=8, help="layers scored (spread over the depth)")
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--n-positions", type=int, default=5)
    ap.add_argument("--lengths", choices=["builtin", "uniform"], default="builtin")
    ap.add_argument("--min-len", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=56)
    ap.add_argument("--prefix-len", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--min-prefix", type=int, default=4, help="score_candidates' min_prefix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernels", type=int, default=25, help="top kernels to list (0: no profile)")
    ap.add_argument("--variants", default="plain,buckets,prefix,both", help="variants to time, comma-separated")
    ap.add_argument("--profile", default="both", help="variants to profile, comma-separated")
    ap.add_argument("--phases", action="store_true", help="time each phase (induce, bypass + KL) of each call")
    ap.add_argument("--syncs", action="store_true", help="list where the default variant waits for the GPU")
    args = ap.parse_args(argv)
    args.model, args.dtype = None, None
    from refusal.batching import Batching
    from refusal.directions.diff_means import extract
    from refusal.scoring.engine import score_candidates

    quiet = Batching(quiet=True)  # passed to every refusal call below
    if args.phases:
        time_phases()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, _ = build_model(args, dev, dtype)
    if args.prefix_len is None:
        args.prefix_len = TEMPLATE_OPENING.get(args.arch, 5)
    vocab = model.config.vocab_size
    rng = random.Random(args.seed)
    suffix = [rng.randrange(FIRST_ID, vocab) for _ in range(args.n_positions)]
    opening = [rng.randrange(FIRST_ID, vocab) for _ in range(args.prefix_len)]
    table = {}
    sets = {}
    for name, kind in (("vh", "harmful"), ("vb", "harmless")):
        p = make_prompts(rng, name, args.n_val, vocab, length_sampler(args, rng, kind), opening, suffix)
        table.update(p)
        sets[kind] = list(p)
    tok = IdTokenizer(table)
    rids = sorted(rng.sample(range(FIRST_ID, vocab), 8))
    cands = extract(model, tok, sets["harmful"], sets["harmless"], args.n_positions, batch_size=64, batching=quiet)
    n_layers = cands.n_layers
    layers = sorted({round(i * (n_layers - 1) / max(1, args.layers - 1)) for i in range(args.layers)})
    clock = Clock(dev)

    def run(**kw):
        return score_candidates(model, tok, cands, sets["harmful"], sets["harmless"], rids, layers=layers,
                                batch_size=args.batch, batching=quiet, min_prefix=args.min_prefix, **kw)

    variants = {"plain": dict(share_prefix=False, max_buckets=1), "buckets": dict(share_prefix=False),
                "prefix": dict(max_buckets=1), "both": {}}
    ref = None
    for name in args.variants.split(","):
        kw = variants[name]
        run(**kw)
        s, scores = clock.time(lambda kw=kw: run(**kw))
        if ref is None:
            ref = scores
        err = float((scores.bypass - ref.bypass).abs().nan_to_num().max())
        print(f"{name:8s} {s:7.3f} s   max |bypass - plain| {err:.2e}")
    if args.syncs and dev.type == "cuda":
        print("host-device syncs in one call, by caller:")
        for where, n in find_syncs(run).most_common(15):
            print(f"{n:6d}  {where}")
    if args.kernels and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name in args.profile.split(","):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                s, _ = clock.time(lambda kw=variants[name]: run(**kw))
            print(f"== {name}: {s:.3f} s wall under the profiler (GPU busy: 'Self CUDA time total' below)")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.kernels,
                                            max_name_column_width=50))


if __name__ == "__main__":
    main()
