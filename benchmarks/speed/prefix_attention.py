"""What a cached shared prefix costs: one bucket's forward with and without a prefix key/value cache.

    python -m benchmarks.speed.prefix_attention --arch llama3-8b

A bucket of ``--rows`` sequences whose full width is ``--prefix-len + --width`` is run (a) whole, (b) after a
cached prefix with the bucket as wide as its longest row (the attention mask then has an unaligned width), (c) the
same with the bucket padded so that prefix + bucket is a multiple of 8, and (d) after a prefix cache that ends in
masked, never-computed slots, so that the mask is aligned without computing any extra token.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from benchmarks.speed.pipeline import ARCHS, Clock, build_model


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed.prefix_attention")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama3-8b")
    ap.add_argument("--rows", type=int, default=1280)
    ap.add_argument("--reps", type=int, default=40, help="rows of the prefix cache (one per candidate)")
    ap.add_argument("--prefix-len", type=int, default=5)
    ap.add_argument("--width", type=int, default=21)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.model = None
    from refusal.models.parts import decoder

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, _ = build_model(args, dev, dtype)
    p, w, rows, reps = args.prefix_len, args.width, args.rows, args.reps
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    prefix = torch.randint(100, vocab, (p,), generator=g).to(dev)
    suffix = torch.randint(100, vocab, (rows, w + 8), generator=g).to(dev)
    clock = Clock(dev)
    dec = decoder(model)

    def prefix_cache(dummy: int):
        ids = torch.cat([prefix, prefix[:1].expand(dummy)])[None].expand(reps, -1)
        mask = torch.cat([torch.ones(p, device=dev), torch.zeros(dummy, device=dev)]).long()[None].expand(reps, -1)
        return dec(input_ids=ids, attention_mask=mask if dummy else None, use_cache=True).past_key_values

    def full():
        ids = torch.cat([prefix[None].expand(rows, -1), suffix[:, :w]], 1)
        return dec(input_ids=ids).last_hidden_state[:, p + w - 1]

    def cached(width: int, dummy: int = 0):
        cache = copy.deepcopy(prefix_cache(dummy))
        cache.batch_repeat_interleave(rows // reps)
        kw = {}
        if dummy:
            kv = p + dummy + width
            mask = torch.ones(kv, dtype=torch.long, device=dev)
            mask[p:p + dummy] = 0
            kw = {"attention_mask": mask[None].expand(rows, -1),
                  "position_ids": torch.arange(p, p + width, device=dev)[None],
                  "cache_position": torch.arange(p + dummy, kv, device=dev)}
        return dec(input_ids=suffix[:, :width], past_key_values=cache, use_cache=True, **kw).last_hidden_state[:, w - 1]

    aligned = w + (-(p + w)) % 8
    dummy = (-(p + w)) % 8
    cases = {
        f"(a) whole, {p + w} tokens/row, no cache": full,
        f"(b) prefix cache, {w} tokens/row, kv {p + w}": lambda: cached(w),
        f"(c) prefix cache, {aligned} tokens/row, kv {p + aligned}": lambda: cached(aligned),
        f"(d) prefix cache + {dummy} masked slots, {w} tokens/row, kv {p + dummy + w}": lambda: cached(w, dummy),
    }
    ref = full().float()
    for name, fn in cases.items():
        fn()
        times = [clock.time(fn)[0] for _ in range(args.repeat)]
        out = fn()
        err = float((out.float() - ref).abs().max())
        syncs = 0
        if dev.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                fn()
                torch.cuda.set_sync_debug_mode(0)
            syncs = len(caught)
        print(f"{name:60s} {1000 * min(times):8.2f} ms   last-row max|diff| {err:.3g}   syncs {syncs}")


if __name__ == "__main__":
    main()
