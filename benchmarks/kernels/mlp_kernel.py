"""The gated MLP's gate/up projections + SiLU·mul as one Triton kernel (:mod:`refusal.generation.mlp_kernel`) against
cuBLAS's fused gate/up GEMM followed by SiLU·mul, at a decode shape, on the GPU.

    python -m benchmarks.kernels.mlp_kernel --arch llama3-8b --rows 64 --out F.json  # sweep of launch configurations
    python -m benchmarks.kernels.mlp_kernel --check                               # against torch (SiLU, tanh-GELU)
    python -m benchmarks.kernels.mlp_kernel --use-best FILE.json -- -m MODULE ARGS...     # MODULE with the sweep's best

Timed as :mod:`benchmarks.kernels.gemm_decode` times GEMMs: a CUDA graph of ``--repeat`` calls, each on another copy
of the weights (enough copies to overflow the L2 cache, so every call reads HBM as a decode step does), best of
three replays. The baseline is what the compiled decode step ran before the kernel: one cuBLAS GEMM over the
concatenated gate/up weight, then SiLU·mul as one compiled elementwise kernel. Every configuration is checked against
torch before it is timed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.kernels.gemm_decode import graph_time

SHAPES = {"llama3-8b": (14336, 4096), "qwen2.5-1.5b": (8960, 1536)}  # (intermediate, hidden)


def _reference(x, wg, wu, act: int = 0):
    g = x.float() @ wg.float().T
    return (F.silu(g) if act == 0 else F.gelu(g, approximate="tanh")) * (x.float() @ wu.float().T)


def check() -> None:
    from refusal.generation.mlp_kernel import _launch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, n, k in ((64, 14336, 4096), (3, 8960, 1536), (100, 200, 96)):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            wg, wu = (torch.randn(n, k, device=dev, dtype=dtype) / math.sqrt(k) for _ in range(2))
            for act, name in enumerate(("SiLU", "tanh-GELU")):
                want = _reference(x, wg, wu, act)
                err = ((_launch(x, wg, wu, act).float() - want).abs().max() / want.abs().max()).item()
                print(f"{dtype} {name} rows {m} ({n}, {k}): max difference {err:.2e} of the largest output")
                assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


def configs() -> list[tuple]:
    out = []
    for bn in (32, 64, 128):
        for bk in (64, 128, 256):
            for warps in (4, 8):
                for stages in (3, 4, 5):
                    if (64 * bk + 2 * bk * bn) * 2 * stages <= 220_000:  # tiles in flight fit in shared memory
                        out.append((bn, bk, warps, stages))
    return out


def use_best(path: str, rest: list[str]) -> None:
    """Run ``-m MODULE ARGS...`` in this process with the package's launch configuration set to the best of a sweep."""
    import runpy
    import sys

    from refusal.generation import mlp_kernel

    swept = json.loads(Path(path).read_text())
    if swept.get("best") is not None:
        mlp_kernel.CONFIG = tuple(swept["best"]["config"])
    print(f"MLP kernel configuration {mlp_kernel.CONFIG}", flush=True)
    if len(rest) < 2 or rest[0] != "-m":
        raise SystemExit("usage: --use-best FILE.json -- -m MODULE ARGS...")
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


def main(argv=None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--use-best"]:
        use_best(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels.mlp_kernel")
    ap.add_argument("--arch", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=24)
    ap.add_argument("--l2-mb", type=float, default=200)
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.check:
        check()
        return
    from refusal.generation.mlp_kernel import CONFIG, _launch

    dev = torch.device("cuda")
    n, k = SHAPES[a.arch]
    nbytes = 2 * n * k * 2
    copies = max(2, min(a.repeat, math.ceil(a.l2_mb * 1e6 / nbytes)))
    ws = [torch.randn(2 * n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k) for _ in range(copies)]
    x = torch.randn(a.rows, k, device=dev, dtype=torch.bfloat16)
    gu = torch.empty(a.rows, 2 * n, device=dev, dtype=torch.bfloat16)
    act = torch.compile(lambda y: F.silu(y[:, :n]) * y[:, n:])

    def baseline(i):
        torch.matmul(x, ws[i % copies].T, out=gu)
        return act(gu)
    t_gemm = graph_time(lambda i: torch.matmul(x, ws[i % copies].T, out=gu), a.repeat)
    t_base = graph_time(baseline, a.repeat)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "arch": a.arch, "rows": a.rows,
           "intermediate": n, "hidden": k, "weight_mb": round(nbytes / 1e6, 1), "copies": copies,
           "bound_us": round(nbytes / (a.hbm_tbps * 1e12) * 1e6, 2), "cublas_gemm_us": round(t_gemm * 1e6, 2),
           "cublas_gemm_then_silu_mul_us": round(t_base * 1e6, 2), "package_config": list(CONFIG), "triton": []}
    print(f"bound {res['bound_us']} us; cuBLAS gate/up GEMM {t_gemm * 1e6:.2f} us, + SiLU·mul {t_base * 1e6:.2f} us")
    want = _reference(x, ws[0][:n], ws[0][n:])
    best = None
    for cfg in configs():
        def call(i, cfg=cfg):
            w = ws[i % copies]
            return _launch(x, w[:n], w[n:], config=cfg)
        try:
            err = ((call(0).float() - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:
                raise AssertionError(f"max error {err:.2e}")
            t = graph_time(call, a.repeat)
        except Exception as exc:  # noqa: BLE001 -- a configuration that does not compile or fit is skipped
            res["triton"].append({"config": list(cfg), "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        res["triton"].append({"config": list(cfg), "us": round(t * 1e6, 2), "tbps": round(nbytes / t / 1e12, 3)})
        print(f"{cfg}: {t * 1e6:.2f} us ({nbytes / t / 1e12:.2f} TB/s)")
        if best is None or t < best[0]:
            best = (t, cfg)
    if best is not None:
        res["best"] = {"config": list(best[1]), "us": round(best[0] * 1e6, 2)}
        print(f"best {best[1]}: {best[0] * 1e6:.2f} us against {t_base * 1e6:.2f} us")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
