"""Decode-shaped GEMMs (a few rows of activations against a large weight) on the GPU: cuBLAS against a split-K Triton
kernel of our own, in TB/s of weight read, to see whether the 8B decode step's GEMMs can get closer to the HBM bound.

    python -m benchmarks.kernels.gemm_decode --arch llama3-8b --rows 64 --out FILE.json
    TRITON_INTERPRET=1 python -m benchmarks.kernels.gemm_decode --check   # the kernel's arithmetic on a CPU

Every timing is a CUDA graph of ``--repeat`` calls, each on another copy of the weight (copies enough to overflow
the L2 cache, so every call reads its weight from HBM, as a decode step does), replayed three times, best kept. The
Triton kernel splits K over ``split`` programs per column block when that fills the GPU better; partial sums are
added by a second small kernel, as cuBLAS's own split-K does. Each of its configurations is checked against
``F.linear`` before it is timed. The shapes are the step's: fused q/k/v, o, fused gate/up, down and lm_head.
"""

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


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def splitk_gemm(x, w, out, M, K, sxm, swn, K_PER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, N: tl.constexpr, PARTIAL: tl.constexpr):
        """out[pid_k] (fp32 partials, PARTIAL) or out (the input's dtype) = x[:, Kslice] @ w[Nblock, Kslice]^T."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k0 = pid_k * K_PER
        for kk in range(0, K_PER, BLOCK_K):
            ks = k0 + kk + rk
            a = tl.load(x + rm[:, None] * sxm + ks[None, :], mask=rm[:, None] < M, other=0.0)
            b = tl.load(w + rn[None, :] * swn + ks[:, None])  # (BLOCK_K, BLOCK_N): W^T's tile, K contiguous
            acc += tl.dot(a, b)
        offs = rm[:, None] * N + rn[None, :]
        if PARTIAL:
            tl.store(out + pid_k * M * N + offs, acc, mask=rm[:, None] < M)
        else:
            tl.store(out + offs, acc.to(out.dtype.element_ty), mask=rm[:, None] < M)

    @triton.jit
    def add_partials(part, out, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(SPLIT):
            acc += tl.load(part + s * MN + o, mask=o < MN, other=0.0)
        tl.store(out + o, acc.to(out.dtype.element_ty), mask=o < MN)

    return splitk_gemm, add_partials


def triton_linear(x: torch.Tensor, w: torch.Tensor, cfg: dict, kernels, out=None, part=None) -> torch.Tensor:
    """``F.linear(x, w)`` by the split-K kernel with ``cfg`` = {block_n, block_k, split, warps, stages}."""
    gemm, add = kernels
    m, k = x.shape
    n = w.shape[0]
    bn, bk, split = cfg["block_n"], cfg["block_k"], cfg["split"]
    assert n % bn == 0 and k % (bk * split) == 0 and m <= 64, (n, k, m, cfg)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    grid = (n // bn, split)
    kw = {"num_warps": cfg["warps"], "num_stages": cfg["stages"]}
    if split == 1:
        gemm[grid](x, w, out, m, k, x.stride(0), w.stride(0), K_PER=k, BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk, N=n,
                   PARTIAL=False, **kw)
        return out
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if part is None else part
    gemm[grid](x, w, part, m, k, x.stride(0), w.stride(0), K_PER=k // split, BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk,
               N=n, PARTIAL=True, **kw)
    add[(-(-m * n // 1024),)](part, out, m * n, SPLIT=split, BLOCK=1024)
    return out


def configs(n: int, k: int, sms: int) -> list[dict]:
    """Block shapes x the split of K that gives at least about two programs per SM (or none when the column blocks
    already do)."""
    out = []
    for bn in (32, 64, 128):
        for bk in (128, 256):
            if n % bn or k % bk:
                continue
            splits = [s for s in (1, 2, 4, 7, 8, 14, 16) if k % (bk * s) == 0]
            want = max(1, math.ceil(2 * sms / (n // bn)))
            near = sorted(splits, key=lambda s: (abs(math.log(s / want)), s))[:2]
            stages = max(2, min(5, 200_000 // ((64 * bk + bk * bn) * 2)))  # tiles in flight within shared memory
            for s in sorted(set(near) | ({1} if n // bn >= sms else set())):
                out.append({"block_n": bn, "block_k": bk, "split": s, "warps": 4, "stages": stages})
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
    import triton  # noqa: F401

    kernels = _kernels()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter (numpy) has no bfloat16
    for m, n, k, cfg in [(5, 64, 256, {"block_n": 32, "block_k": 128, "split": 1}),
                         (64, 128, 512, {"block_n": 64, "block_k": 128, "split": 2}),
                         (3, 96, 896, {"block_n": 32, "block_k": 128, "split": 7})]:
        x = torch.randn(m, k, device=dev).to(dtype)
        w = torch.randn(n, k, device=dev).to(dtype)
        got = triton_linear(x, w, {**cfg, "warps": 4, "stages": 2}, kernels).float()
        want = x.float() @ w.float().T
        err = (got - want).abs().max().item() / want.abs().max().item()
        print(f"m {m} n {n} k {k} {cfg}: max error {err:.2e} of the largest output")
        assert err < 2e-2, err


def _measure(n: int, k: int, a, kernels, sms: int) -> dict:
    """cuBLAS and every Triton configuration on one (N, K), weights in HBM (see the module's docstring)."""
    dev = torch.device("cuda")
    nbytes = n * k * 2
    copies = max(2, min(a.repeat, math.ceil(a.l2_mb * 1e6 / nbytes)))
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(a.rows, k, device=dev, dtype=torch.bfloat16)
    out = torch.empty(a.rows, n, device=dev, dtype=torch.bfloat16)
    t_cublas = graph_time(lambda i: torch.matmul(x, ws[i % copies].T, out=out), a.repeat)
    want = F.linear(x, ws[0]).float()
    row = {"N": n, "K": k, "weight_mb": round(nbytes / 1e6, 1), "copies": copies,
           "bound_us": round(nbytes / (a.hbm_tbps * 1e12) * 1e6, 2),
           "cublas_us": round(t_cublas * 1e6, 2), "cublas_tbps": round(nbytes / t_cublas / 1e12, 3), "triton": []}
    best = None
    for cfg in configs(n, k, sms):
        part = torch.empty(cfg["split"], a.rows, n, dtype=torch.float32, device=dev) if cfg["split"] > 1 else None

        def call(i, cfg=cfg, part=part):
            return triton_linear(x, ws[i % copies], cfg, kernels, out=out, part=part)
        try:
            got = call(0).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:
                raise AssertionError(f"max error {err:.2e}")
            t = graph_time(call, a.repeat)
        except Exception as exc:  # noqa: BLE001 -- a configuration that does not compile or fit is skipped
            row["triton"].append({**cfg, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        row["triton"].append({**cfg, "us": round(t * 1e6, 2), "tbps": round(nbytes / t / 1e12, 3),
                              "max_rel_error": round(err, 5)})
        if best is None or t < best[0]:
            best = (t, cfg)
    if best is not None:
        row["best_triton"] = {**best[1], "us": round(best[0] * 1e6, 2), "tbps": round(nbytes / best[0] / 1e12, 3)}
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels.gemm_decode")
    ap.add_argument("--arch", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--rows", type=int, default=64, help="rows of activations (the decode batch)")
    ap.add_argument("--repeat", type=int, default=24, help="calls per captured graph")
    ap.add_argument("--l2-mb", type=float, default=200, help="weight copies add up to at least this (MB)")
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--check", action="store_true", help="only check the kernel's arithmetic")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.check:
        check()
        return
    import triton

    kernels = _kernels()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": a.rows, "hbm_tbps": a.hbm_tbps, "sms": sms, "shapes": {}}
    for name, (n, k) in SHAPES[a.arch].items():
        row = res["shapes"][name] = _measure(n, k, a, kernels, sms)
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
