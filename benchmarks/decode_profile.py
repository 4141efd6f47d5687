"""Where a decode step's time goes: refusal's static-cache decoder on a random-weight model, profiled.

    python -m benchmarks.decode_profile --arch llama3-8b --batch 64 --new-tokens 128 [--mode reduce-overhead]

Builds the model as :mod:`benchmarks.pipeline` does, decodes ``--batch`` rows of ``--prompt-len`` random tokens
(the compile and CUDA-graph capture are the warm-up call), times a second call, then records the same call
 with :mod:`torch.profiler` and prints the kernels that took the GPU's time, the GPU time per step
against the wall time per step (a gap means the GPU waits for the host: launches, syncs, graph breaks), and the
HBM bound (weight bytes read per step / bandwidth). ``--out`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of the decode step")
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()

    from benchmarks.pipeline import build_model
    from refusal.generation.batched import _StaticDecoder

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args = argparse.Namespace(arch=a.arch, model=None, device_map=None, seed=a.seed)
    t0 = time.perf_counter()
    model, name = build_model(args, dev, dtype)
    build_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    ids = torch.randint(10, vocab, (a.batch, a.prompt_len), generator=g).to(dev)
    mask = torch.ones_like(ids)
    eos = torch.tensor([], dtype=torch.long, device=dev)
    dec = _StaticDecoder(model, compile=dev.type == "cuda", mode=a.mode)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def call(n):
        sync()
        t = time.perf_counter()
        dec(ids, mask, n, eos, 0)
        sync()
        return time.perf_counter() - t

    warm_s = call(a.new_tokens)
    prefill_s = min(call(1) for _ in range(3))
    total_s = call(a.new_tokens)
    step_ms = (total_s - prefill_s) / (a.new_tokens - 1) * 1e3
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    bound_ms = weight_bytes / (a.hbm_tbps * 1e12) * 1e3
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "model": name,
           "torch": torch.__version__, "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
           "mode": a.mode, "build_s": round(build_s, 2), "warmup_s": round(warm_s, 2),
           "prefill_s": round(prefill_s, 4), "total_s": round(total_s, 4), "ms_per_step": round(step_ms, 3),
           "bound_ms_per_step": round(bound_ms, 3), "bound_fraction": round(bound_ms / step_ms, 3)}
    print(json.dumps(res))

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    n = a.new_tokens  # the same cache length as the timed call: no new shape, so no recompile or re-capture
    sync()
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        dec(ids, mask, n, eos, 0)
        sync()
        wall = time.perf_counter() - t
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    gpu_us = sum(getattr(e, key) for e in events if e.device_type.name == ("CUDA" if dev.type == "cuda" else "CPU"))
    res["profile"] = {"wall_s_incl_prefill": round(wall, 4), "steps": n - 1,
                      "gpu_ms_total": round(gpu_us / 1e3, 3),
                      "top": [{"name": e.key[:120], "count": e.count, "ms": round(getattr(e, key) / 1e3, 3)}
                              for e in sorted(events, key=lambda e: -getattr(e, key))[:25]]}
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90))
    print(json.dumps(res["profile"], indent=1)[:200])
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
