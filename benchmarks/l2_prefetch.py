"""An experiment for the 8B decode step: does loading the o projection's weight into L2, on a side stream while the
attention runs, make the attention + o pair of a layer faster?

    python -m benchmarks.l2_prefetch --out FILE.json        # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.l2_prefetch --check   # the prefetch kernel's arithmetic on a CPU

Why: with the Triton decoding attention the step is 5.4 ms against the 3.13 ms bound; the attention reads its K/V at
~1.9 TB/s (latency, not bandwidth, bounds it) and the o GEMM that follows reads its 33.5 MB weight at 2.7 TB/s (a
short kernel that spends much of its time ramping up). The weight does not depend on the attention's output, so it
could be on its way during the attention; the H200's L2 (50 MB) holds it. Per layer, on rotating K/V caches and
weights (so every read starts in HBM, as in decoding), each timed as a CUDA graph:

- ``attn`` the attention alone, ``o`` the GEMM alone, ``prefetch`` the prefetch alone;
- ``attn+o``: one after the other (today's step);
- ``attn+o, prefetched``: the prefetch forked onto a second stream when the attention starts, joined before the GEMM;
- ``attn+o, in-kernel prefetch``: extra programs of the attention's own launch read the weight (what
  ``StaticDecoder(prefetch=True)`` does; ``python -m benchmarks.profile_generate --variants default,prefetch``
  measures it in the whole step).

If the last beats ``attn+o`` by several microseconds a layer, wiring it into the decoder is worth it (32 layers:
5 us a layer = 0.16 ms a step); if not, the idea is closed. Not yet run: prepared for the next GPU session.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import cache
from pathlib import Path

import torch


@cache
def _prefetch_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch(w, sink, n, PER: tl.constexpr, BLOCK: tl.constexpr):
        """Read ``PER`` elements of ``w`` per program, keeping them in L2 (evict_last); the sum goes to ``sink`` so
        the loads are not optimised away."""
        start = tl.program_id(0) * PER
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(0, PER, BLOCK):
            o = start + i + tl.arange(0, BLOCK)
            acc += tl.load(w + o, mask=o < n, other=0.0, eviction_policy="evict_last").to(tl.float32)
        tl.store(sink + tl.program_id(0), tl.sum(acc, 0))

    def run(w: torch.Tensor, sink: torch.Tensor, programs: int, block: int = 4096, num_warps: int = 8):
        n = w.numel()
        per = -(-n // programs)
        per = -(-per // block) * block
        prefetch[(programs,)](w, sink, n, PER=per, BLOCK=block, num_warps=num_warps)
        return sink

    return run


def check() -> None:
    run = _prefetch_kernel()
    w = torch.randn(1000, 70).half()
    sink = torch.zeros(7)
    run(w, sink, 7, block=256, num_warps=1)
    err = (sink.sum() - w.float().sum()).abs().item()
    print(f"prefetch kernel's sum against torch's: {err:.2e}")
    assert err < 1e-2 * w.numel() ** 0.5, err


def _graph_us(body, layers: int) -> float:
    """Microseconds per layer: ``body(i)`` for every layer captured in one CUDA graph."""
    from benchmarks.gemm_decode import graph_time

    return round(graph_time(body, layers) * 1e6, 2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.l2_prefetch")
    ap.add_argument("--layers", type=int, default=16, help="rotating K/V caches and weights (enough to overflow L2)")
    ap.add_argument("--programs", default="66,132,264", help="prefetch grid sizes to try")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.check:
        check()
        return
    from refusal.generation.attention_kernel import decode_attention

    dev = torch.device("cuda")
    torch.manual_seed(0)
    b, h, hkv, d, total, hidden = 64, 32, 8, 128, 256, 4096
    q = torch.randn(b, h, 1, d, device=dev, dtype=torch.bfloat16)
    ks = [torch.randn(b, hkv, total, d, device=dev, dtype=torch.bfloat16) for _ in range(a.layers)]
    vs = [torch.randn_like(k) for k in ks]
    ws = [torch.randn(hidden, h * d, device=dev, dtype=torch.bfloat16) / 64 for _ in range(a.layers)]
    mask = torch.zeros(b, total, dtype=torch.bool, device=dev)
    for r in range(b):
        mask[r, r % 16: 136] = True
    out = torch.empty(b, hidden, device=dev, dtype=torch.bfloat16)
    sink = torch.empty(1024, device=dev)
    prefetch = _prefetch_kernel()
    side = torch.cuda.Stream()
    attn_out: list = [None]

    def attn(i):
        attn_out[0] = decode_attention(q, ks[i], vs[i], mask, d ** -0.5)

    def o(i):
        x = attn_out[0].reshape(b, h * d) if attn_out[0] is not None else q.reshape(b, h * d)
        torch.matmul(x, ws[i].T, out=out)

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers,
           "shape": dict(batch=b, heads=h, kv_heads=hkv, dim=d, cache=total, visible=128, o_weight_mb=33.6),
           "us_per_layer": {}}
    r = res["us_per_layer"]
    r["attn"] = _graph_us(attn, a.layers)
    r["o"] = _graph_us(o, a.layers)
    r["attn+o"] = _graph_us(lambda i: (attn(i), o(i)), a.layers)
    for programs in map(int, a.programs.split(",")):
        r[f"prefetch ({programs} programs)"] = _graph_us(lambda i, p=programs: prefetch(ws[i], sink, p), a.layers)

        def layer(i, p=programs):
            main = torch.cuda.current_stream()
            side.wait_stream(main)  # fork: the weight starts loading with the attention
            with torch.cuda.stream(side):
                prefetch(ws[i], sink, p)
            attn(i)
            main.wait_stream(side)  # join before the GEMM (and before the capture ends)
            o(i)
        r[f"attn+o, prefetched ({programs} programs)"] = _graph_us(layer, a.layers)
    from refusal.generation import attention_kernel as AK

    # the package's way: extra programs of the attention's own launch, issuing PTX prefetches (asm) or loads
    for rows, asm in itertools.product((4, 8, 16, 32, 64), (True, False)):
        def attn_pre(i, rows=rows, asm=asm):
            attn_out[0] = AK._launch(q, ks[i], vs[i], mask, d ** -0.5, prefetch=ws[i], prefetch_rows=rows,
                                     prefetch_asm=asm)
        how = f"{rows * hkv} programs, {'PTX prefetch' if asm else 'loads'}"
        r[f"attn with in-kernel prefetch ({how})"] = _graph_us(attn_pre, a.layers)
        r[f"attn+o, in-kernel prefetch ({how})"] = _graph_us(lambda i, f=attn_pre: (f(i), o(i)), a.layers)
    for key, us in r.items():
        print(f"{key:60s} {us:7.2f} us/layer")
    best = min(v for k, v in r.items() if k.startswith(("attn+o, prefetched", "attn+o, in-kernel")))
    res["saved_us_per_layer"] = round(r["attn+o"] - best, 2)
    print(f"best prefetched pair against attn+o: {res['saved_us_per_layer']:+.2f} us/layer "
          f"({32 * res['saved_us_per_layer'] / 1e3:+.3f} ms per 32-layer step)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
