"""Decode-shaped GEMMs (a few rows of activations against a large weight) on the GPU: cuBLAS against the package's
Triton kernel (:mod:`refusal.generation.linear_kernel`: the whole of K in one program, no split and so no second
kernel), in TB/s of weight read.

    python -m benchmarks.gemm_decode --arch llama3-8b --rows 64 --out FILE.json [--only down,lm_head]
    TRITON_INTERPRET=1 python -m benchmarks.gemm_decode --check   # the kernel's arithmetic on a CPU (needs triton)

Every timing is a CUDA graph of ``--repeat`` calls, each on another copy of the weight (copies enough to overflow
the L2 cache, so every call reads its weight from HBM, as a decode step does), replayed three times, best kept;
cuBLAS's time includes its split-K reduction kernel where it picks one. Each launch configuration is checked against
``F.linear`` before it is timed. The shapes are the step's: fused q/k/v, o, fused gate/up, down and lm_head. (The
fifth session's version of this file timed a split-K Triton kernel instead: ``results/h200-2026-12-01-fifth``.)"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # name: (N, K) of y = x W^T, W of shape (N, K)
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                  "lm_head": (128256, 4096)},
}


def configs(name: str, n: int, k: int) -> list[tuple]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) whose tiles in flight fit in shared memory: narrow column blocks
    for the narrow weights (more programs than SMs), wide ones for lm_head."""
    widths = (64, 128) if name == "lm_head" else (16, 32, 64)
    out = []
    for bn in widths:
        for bk in (64, 128, 256):
            for warps in ((4, 8) if bn >= 64 else (4,)):
                for stages in (3, 4, 6):
                    if (64 + bn) * bk * 2 * stages <= 220_000 and not (name == "lm_head" and bk == 256):
                        out.append((bn, bk, warps, stages))
    return out


def graph_time(fn, repeat: int) -> float:
    """Seconds per call: ``fn(i)`` for i in range(repeat) captured in one CUDA graph, best of three replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(repeat):  # warm up (and compile) outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(repeat):
            fn(i)
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / repeat)
    return best


def check() -> None:
    """The kernel against F.linear on small shapes (``TRITON_INTERPRET=1`` runs it on a CPU)."""
    from refusal.generation.linear_kernel import _launch

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.bfloat16, torch.float16, torch.float32) if dev == "cuda" else (torch.float32,):
        for m, n, k, cfg in [(5, 96, 200, (32, 64, 4, 2)), (64, 6144, 4096, (16, 128, 4, 3)),
                             (64, 4096, 14336, (32, 128, 4, 4)), (3, 1000, 96, (64, 64, 4, 3))]:
            x = torch.randn(m, k, device=dev).to(dtype)
            w = (torch.randn(n, k, device=dev) / math.sqrt(k)).to(dtype)
            want = x.float() @ w.float().T
            err = ((_launch(x, w, cfg).float() - want).abs().max() / want.abs().max()).item()
            print(f"{dtype} m {m} n {n} k {k} {cfg}: max error {err:.2e} of the largest output")
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


def _measure(name: str, n: int, k: int, a) -> dict:
    """cuBLAS (with its split-K reduction, where it picks one) and every launch of the package's kernel on one
    (N, K), weights in HBM (see the module's docstring)."""
    from refusal.generation.linear_kernel import _launch

    dev = torch.device("cuda")
    nbytes = n * k * 2
    copies = max(2, min(a.repeat, math.ceil(a.l2_mb * 1e6 / nbytes)))
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k) for _ in range(copies)]
    x = torch.randn(a.rows, k, device=dev, dtype=torch.bfloat16)
    out = torch.empty(a.rows, n, device=dev, dtype=torch.bfloat16)
    t_cublas = graph_time(lambda i: torch.matmul(x, ws[i % copies].T, out=out), a.repeat)
    want = F.linear(x, ws[0]).float()
    row = {"N": n, "K": k, "weight_mb": round(nbytes / 1e6, 1), "copies": copies,
           "bound_us": round(nbytes / (a.hbm_tbps * 1e12) * 1e6, 2),
           "cublas_us": round(t_cublas * 1e6, 2), "cublas_tbps": round(nbytes / t_cublas / 1e12, 3), "triton": []}
    best = None
    for cfg in configs(name, n, k):
        def call(i, cfg=cfg):
            return _launch(x, ws[i % copies], cfg, out=out)
        try:
            err = ((call(0).float() - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:
                raise AssertionError(f"max error {err:.2e}")
            t = graph_time(call, a.repeat)
        except Exception as exc:  # noqa: BLE001 -- a configuration that does not compile or fit is skipped
            row["triton"].append({"config": list(cfg), "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        row["triton"].append({"config": list(cfg), "us": round(t * 1e6, 2), "tbps": round(nbytes / t / 1e12, 3),
                              "max_rel_error": round(err, 5)})
        if best is None or t < best[0]:
            best = (t, cfg)
    if best is not None:
        row["best_triton"] = {"config": list(best[1]), "us": round(best[0] * 1e6, 2),
                              "tbps": round(nbytes / best[0] / 1e12, 3)}
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gemm_decode")
    ap.add_argument("--arch", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--rows", type=int, default=64, help="rows of activations (the decode batch)")
    ap.add_argument("--repeat", type=int, default=24, help="calls per captured graph")
    ap.add_argument("--l2-mb", type=float, default=200, help="weight copies add up to at least this (MB)")
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--check", action="store_true", help="only check the kernel's arithmetic")
    ap.add_argument("--only", default="qkv,o,down,lm_head", help="comma-separated shapes to measure")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.check:
        check()
        return
    import triton

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": a.rows, "hbm_tbps": a.hbm_tbps, "sms": sms, "shapes": {}}
    for name, (n, k) in SHAPES[a.arch].items():
        if a.only and name not in a.only.split(","):
            continue
        row = res["shapes"][name] = _measure(name, n, k, a)
        best = row.get("best_triton")
        print(f"{name:8s} N {n:6d} K {k:5d}: cuBLAS {row['cublas_us']:7.1f} us ({row['cublas_tbps']:.2f} TB/s)"
              + (f", best Triton {best['us']:7.1f} us ({best['tbps']:.2f} TB/s) {best}" if best
                 else ", no Triton configuration ran"), flush=True)
        torch.cuda.empty_cache()
    layers = 32  # every shape but lm_head runs once per layer
    per_step = {key: sum(res["shapes"][s][f"{key}_us"] * (1 if s == "lm_head" else layers)
                         for s in res["shapes"]) / 1e3 for key in ("cublas", "bound")}
    per_step["best"] = sum(min(r["cublas_us"], r.get("best_triton", {}).get("us", math.inf))
                           * (1 if s == "lm_head" else layers) for s, r in res["shapes"].items()) / 1e3
    res["ms_per_decode_step"] = {k: round(v, 3) for k, v in per_step.items()}
    print(f"GEMMs of one decode step ({layers} layers + lm_head): cuBLAS {per_step['cublas']:.2f} ms, with the best "
          f"of both per shape {per_step['best']:.2f} ms, HBM bound {per_step['bound']:.2f} ms")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
