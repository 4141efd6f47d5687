"""Where a decode step of static-cache generation spends its time: per-step time, and the top GPU kernels.

    python -m benchmarks.profile_generate --arch llama3-8b --batch 64

Uses the random-weight model and prompts of :mod:`benchmarks.pipeline`; the direction is orthogonalized into the
weights, as the pipeline's generation does. ``--modes`` times other torch.compile modes (compile time included
in the warm-up, which is printed).
"""

from __future__ import annotations

import argparse
import random

import torch

from benchmarks.pipeline import (
    ARCHS,
    FIRST_ID,
    TEMPLATE_OPENING,
    Clock,
    IdTokenizer,
    build_model,
    length_sampler,
    make_prompts,
)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_generate")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama3-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--round-to", type=int, default=128, help="static cache length rounding")
    ap.add_argument("--modes", default="reduce-overhead", help="torch.compile modes to time, comma-separated")
    ap.add_argument("--kernels", type=int, default=20, help="top kernels of the first mode (0: no profile)")
    ap.add_argument("--lengths", choices=["builtin", "uniform"], default="builtin")
    ap.add_argument("--min-len", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=56)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.model, args.dtype = None, None
    from refusal.generation.batched import _StaticDecoder
    from refusal.interventions.weights import orthogonalized
    from refusal.templates import tokenize

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, _ = build_model(args, dev, dtype)
    vocab = model.config.vocab_size
    rng = random.Random(args.seed)
    opening = [rng.randrange(FIRST_ID, vocab) for _ in range(TEMPLATE_OPENING.get(args.arch, 5))]
    suffix = [rng.randrange(FIRST_ID, vocab) for _ in range(5)]
    table = make_prompts(rng, "gen", args.batch, vocab, length_sampler(args, rng, "harmful"), opening, suffix)
    tok = IdTokenizer(table)
    b = tokenize(tok, list(table), dev)
    eos, pad = torch.tensor([], device=dev, dtype=torch.long), 0
    clock = Clock(dev)
    direction = torch.randn(model.config.hidden_size)
    with orthogonalized(model, direction):
        for i, mode in enumerate(args.modes.split(",")):
            dec = _StaticDecoder(model, compile=dev.type == "cuda", round_to=args.round_to, mode=mode)
            run = lambda dec=dec: dec(b.input_ids, b.attention_mask, args.new_tokens, eos, pad)  # noqa: E731
            warm, _ = clock.time(run)
            s = min(clock.time(run)[0] for _ in range(3))
            print(f"{mode:28s} {1e3 * s / args.new_tokens:6.2f} ms/step  {args.batch * args.new_tokens / s:8.0f} tok/s"
                  f"  (warm-up {warm:.1f} s, batch {args.batch}, prompt width {b.input_ids.shape[1]})")
            if i == 0 and args.kernels and dev.type == "cuda":
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    clock.time(run)
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.kernels,
                                                max_name_column_width=60))


if __name__ == "__main__":
    main()
