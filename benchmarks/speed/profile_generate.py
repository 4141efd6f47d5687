"""Where a decode step of static-cache generation spends its time: per-step time of decoder variants, and the
top GPU kernels.

    python -m benchmarks.speed.profile_generate --arch llama3-8b --batch 64 [--variants compiled,full] [--out FILE.json]

Uses the random-weight model and prompts of :mod:`benchmarks.speed.pipeline`; the direction is orthogonalized into the
weights, as the pipeline's generation does. Each variant is a :class:`refusal.generation.static.StaticDecoder`
configuration (``VARIANTS``; those with benchmark-only knobs run :class:`benchmarks.speed.decoder_variants.LabDecoder`),
compiled afresh; it is timed as the best of three calls after a warm-up call (whose
time, compile included, is printed), with the prefill timed apart as a one-new-token call, so ms per decode step =
(call - prefill) / (new tokens - 1). Each variant's tokens are compared with the first variant's, and checked
against the model itself (:func:`greedy_deficit`: one plain forward over prompt + the variant's tokens, so a
variant whose tokens differ from the first's can be told apart from one that computes wrongly). ``--out`` writes
every variant's numbers, the HBM bound (weight bytes read per step / ``--hbm-tbps``) and the top kernels of the
``--profile`` variant (the last) with their GPU ms per step.
"""

from __future__ import annotations

import argparse
import random

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

VARIANTS = {  # StaticDecoder keyword arguments (LabDecoder's where one of LAB_KEYS is given)
    "compiled": {"graphs": False, "kv_bucket": 0, "fuse": False},
    "graphs": {"graphs": True, "steps_per_graph": 1, "kv_bucket": 0, "fuse": False},
    "graphs+fuse": {"graphs": True, "steps_per_graph": 1, "kv_bucket": 0, "fuse": True},
    "graphs+kv+fuse": {"graphs": True, "steps_per_graph": 1, "kv_bucket": 32, "fuse": True},
    "graphs16+kv+fuse": {"graphs": True, "steps_per_graph": 16, "kv_bucket": 32, "fuse": True},
    "graphs4+kv+fuse": {"graphs": True, "steps_per_graph": 4, "kv_bucket": 32, "fuse": True},
    "default": {},  # graphs of 1 step, fused projections, the Triton decoding attention and MLP kernels, combo kernels
    "combo-off": {"combo_kernels": False},  # inductor's kernels one by one, as before 2026-12-02
    "mlp-kernel-off": {"mlp_kernel": False},  # the MLP's gate/up GEMM (cuBLAS) and SiLU·mul apart, as before
    # programmatic dependent launch for inductor's kernels (each waits before its first read of a buffer and lets the
    # next launch after its loads); measured on the H200 on 2026-12-02: no gain
    "pdl": {"inductor": {"triton.enable_pdl": True}},
    # GEMMs autotuned against Triton templates (minutes of compile), and Triton's pointwise and reduction kernels tuned
    # by coordinate descent ("inductor" items patch torch._inductor.config for the variant); both slower (2026-12-01)
    "graphs+fuse+autotune": {"graphs": True, "fuse": True, "mode": "max-autotune-no-cudagraphs"},
    "graphs+fuse+cdt": {"graphs": True, "fuse": True, "inductor": {"coordinate_descent_tuning": True}},
    # the cache rounded to 16 positions instead of --round-to (the attention reads fewer unwritten slots)
    "graphs+fuse+r16": {"graphs": True, "fuse": True, "round_to": 16},
    "graphs+fuse+autotune+r16": {"graphs": True, "fuse": True, "mode": "max-autotune-no-cudagraphs", "round_to": 16},
    # generate.static_cache: graphs -- the eager step (nothing compiled) captured into CUDA graphs
    "eager-graphs": {"compile": False, "graphs": True, "fuse": True},
    "eager-graphs+r16": {"compile": False, "graphs": True, "fuse": True, "round_to": 16},
    # inductor's more aggressive vertical fusion (no gain on 2026-12-02; its horizontal fusion, combo kernels, is the
    # default since then: see combo-off)
    "aggressive": {"inductor": {"aggressive_fusion": True}},
    # torch's attention in the decode step instead of the Triton kernel the decoder uses on a GPU by default
    "torch-attention": {"attention_kernel": False},
    "eager-graphs+torch-attention": {"compile": False, "graphs": True, "fuse": True, "attention_kernel": False},
}
BENCH_KEYS = ("inductor",)  # variant keys for this script, not StaticDecoder arguments
LAB_KEYS = ("steps_per_graph", "kv_bucket", "combo_kernels", "mode")  # knobs only LabDecoder has


@torch.no_grad()
def copy_bandwidth(dev: torch.device, gib: float = 2.0, repeats: int = 20) -> dict:
    """The GPU's memory bandwidth as a large device-to-device copy sees it: ``gib`` GiB copied ``repeats`` times
    (after a warm-up), each copy reading and writing every byte; the best of three timings."""
    n = int(gib * 2**30)
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize(dev)
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            y.copy_(x)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del x, y
    return {"tbps": round(2 * n * repeats / best / 1e12, 3), "bytes_per_copy": n, "repeats": repeats,
            "method": "torch copy_ of a uint8 buffer, read + write counted, best of 3"}


def kv_cache_bytes(config, batch: int, positions: float, dtype: torch.dtype) -> float:
    """K and V bytes one decode step reads at ``positions`` cached positions (the mean over a generation)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * batch * kv_heads * head_dim * positions * torch.finfo(dtype).bits / 8


def greedy_deficit(model, input_ids, attention_mask, tokens, eos_ids=None) -> dict:
    """How far a decoder's greedy tokens are from greedy under one plain forward of the model over prompt + tokens
    (teacher-forced, the decoder's own positions: left padding excluded): per token, the largest logit minus the
    chosen token's. A correct decoder gives 0 for most tokens and bfloat16 rounding for the rest (near ties); a
    decoder that computes something else (a lost cache write, a wrong rotation) gives deficits of whole logits.

    ``eos_ids`` (the decoder's stop tokens): a row's tokens after its first stop token are not checked. A decoder
    writes padding there, which is no greedy choice: counting it gave deficits of whole logits to a correct decoder
    (and to ``model.generate``'s own tokens) whenever a row ended early. ``tokens_checked`` says how many counted.

    The positions are 2-D (``cumsum(mask) - 1``): for a text-only prompt they are what ``model.generate`` uses on every
    model, multimodal RoPE included (Qwen2-VL's family expands 2-D ids to its three sections, as its own generate does
    for text with zero ``rope_deltas``)."""
    n = tokens.shape[1]
    ids = torch.cat([input_ids, tokens[:, :-1]], 1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(tokens.shape[0], n - 1)], 1)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=n).logits.float()
    deficit = logits.max(-1).values - logits.gather(-1, tokens[..., None]).squeeze(-1)
    live = live_tokens(tokens, eos_ids)
    deficit = deficit[live]
    spread = (logits.max(-1).values - logits.mean(-1))[live].mean().item()
    return {"tokens_checked": int(live.sum().item()),
            "tokens_greedy": round((deficit == 0).float().mean().item(), 4),
            "deficit_mean": round(deficit.mean().item(), 5), "deficit_max": round(deficit.max().item(), 4),
            "deficit_p99": round(deficit.flatten().quantile(0.99).item(), 4),
            "logit_max_minus_mean": round(spread, 3)}


def live_tokens(tokens: torch.Tensor, eos_ids=None) -> torch.Tensor:
    """Per token of ``tokens`` ``(batch, n)``, whether its row had not ended before it (a stop token ends a row and is
    itself live): True everywhere without ``eos_ids``."""
    if eos_ids is None or len(eos_ids) == 0:
        return torch.ones_like(tokens, dtype=torch.bool)
    ended = torch.isin(tokens, torch.as_tensor(eos_ids, device=tokens.device)).long().cumsum(1)
    return torch.cat([torch.ones_like(tokens[:, :1], dtype=torch.bool), ended[:, :-1] == 0], 1)


def _profile(res: dict, name: str, run, clock, args) -> None:
    """torch.profiler over one more call of ``run``: the top kernels by GPU time, per decode step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        clock.time(run)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.kernels, max_name_column_width=60))
    events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                    key=lambda e: -e.self_device_time_total)[: args.kernels]
    res["kernels_of"] = name
    res["kernels"] = [{"name": e.key[:120], "count": e.count,
                       "ms_per_step": round(e.self_device_time_total / 1e3 / (args.new_tokens - 1), 4)}
                      for e in events]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed.profile_generate")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama3-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--round-to", type=int, default=128, help="static cache length rounding")
    ap.add_argument("--variants", default="default",
                    help=f"comma-separated, of {', '.join(VARIANTS)}; NAME#2 runs NAME again (a repeat)")
    ap.add_argument("--kernels", type=int, default=20, help="top kernels of the profiled variant (0: no profile)")
    ap.add_argument("--profile", default=None, help="the variant whose kernels are listed (default: the last)")
    ap.add_argument("--lengths", choices=["builtin", "uniform"], default="builtin")
    ap.add_argument("--min-len", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=56)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hbm-tbps", type=float, default=4.8, help="bandwidth of the bound (H200: 4.8, H100 SXM: 3.35)")
    ap.add_argument("--measure-bandwidth", action="store_true",
                    help="measure the GPU's bandwidth with a large device-to-device copy and use it for the bounds")
    ap.add_argument("--out", default=None, help="write the numbers as JSON")
    args = ap.parse_args(argv)
    args.model, args.dtype = None, None
    from refusal.generation.static import StaticDecoder
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
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    measured = copy_bandwidth(dev) if args.measure_bandwidth and dev.type == "cuda" else None
    if measured is not None:
        args.hbm_tbps = measured["tbps"]
    bound_ms = weight_bytes / (args.hbm_tbps * 1e12) * 1e3
    kv_bytes = kv_cache_bytes(model.config, args.batch, b.input_ids.shape[1] + args.new_tokens / 2, dtype)
    bound_kv_ms = (weight_bytes + kv_bytes) / (args.hbm_tbps * 1e12) * 1e3
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "arch": args.arch,
           "torch": torch.__version__, "batch": args.batch, "new_tokens": args.new_tokens,
           "prompt_width": b.input_ids.shape[1], "round_to": args.round_to, "hbm_tbps": args.hbm_tbps,
           "bound_ms_per_step": round(bound_ms, 3), "bandwidth_measured": measured,
           "kv_bytes_mean_per_step": int(kv_bytes), "bound_with_kv_ms_per_step": round(bound_kv_ms, 3),
           "variants": {}}
    torch._dynamo.config.cache_size_limit = 64  # variants and their buckets: never fall back to eager
    names = args.variants.split(",")
    profiled = args.profile or names[-1]
    best, first_tokens = None, None
    with orthogonalized(model, direction):
        for name in names:
            variant = VARIANTS[name.split("#")[0]]
            torch._dynamo.reset()
            opts = {"compile": dev.type == "cuda", "round_to": args.round_to,
                    **{k: v for k, v in variant.items() if k not in BENCH_KEYS}}
            if dev.type != "cuda":  # a CPU check of the plumbing: no graphs to capture
                opts["graphs"] = False
            if any(k in opts for k in LAB_KEYS):
                from benchmarks.speed.decoder_variants import LabDecoder

                dec = LabDecoder(model, **opts)
            else:  # the package's own decoder, as a run constructs it
                dec = StaticDecoder(model, **opts)
            run = lambda dec=dec: dec(b.input_ids, b.attention_mask, args.new_tokens, eos, pad)  # noqa: E731
            tuning = torch._inductor.config.patch(**variant.get("inductor", {}))
            # set up once: the timed calls replay the warm-up's graphs
            with dec, tuning:
                # prefill alone (eager, nothing compiled): one new token; first, since its shorter cache replaces the
                # decoder's buffers
                prefill = min(clock.time(lambda dec=dec: dec(b.input_ids, b.attention_mask, 1, eos, pad))[0]
                              for _ in range(3))
                try:
                    warm, (tokens, _) = clock.time(run)
                except Exception as exc:  # noqa: BLE001 -- keep the other variants' numbers
                    res["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    print(f"{name}: failed: {res['variants'][name]['error']}")
                    continue
                s = min(clock.time(run)[0] for _ in range(3))
                if name == profiled and args.kernels and dev.type == "cuda":
                    _profile(res, name, run, clock, args)
            step_ms = 1e3 * (s - prefill) / (args.new_tokens - 1)
            if first_tokens is None:
                first_tokens = tokens
            same = (tokens == first_tokens).all(-1).float().mean().item()
            check = greedy_deficit(model, b.input_ids, b.attention_mask, tokens)
            res["variants"][name] = {"options": variant, "warmup_s": round(warm, 2), "s": round(s, 4),
                                     "prefill_s": round(prefill, 4), "ms_per_step": round(step_ms, 3),
                                     "bound_fraction": round(bound_ms / step_ms, 3),
                                     "bound_with_kv_fraction": round(bound_kv_ms / step_ms, 3),
                                     "rows_same_tokens_as_first_variant": round(same, 3), "greedy_check": check}
            print(f"{name:20s} {step_ms:6.2f} ms/step ({bound_ms / step_ms:.0%} of the {bound_ms:.2f} ms bound, "
                  f"{bound_kv_ms / step_ms:.0%} of {bound_kv_ms:.2f} ms with the KV cache)  "
                  f"{args.batch * args.new_tokens / s:8.0f} tok/s  (warm-up {warm:.1f} s, prefill {prefill:.3f} s, "
                  f"batch {args.batch}, prompt width {b.input_ids.shape[1]}, rows as the first variant {same:.0%})")
            print(f"{'':20s} against a plain forward: {check}")
            if best is None or step_ms < best[1]:
                best = (name, step_ms)
    if best is not None:
        res.update(best_variant=best[0], ms_per_step=round(best[1], 3), bound_fraction=round(bound_ms / best[1], 3))
    if args.out:
        import json
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
