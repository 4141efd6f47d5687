"""The decoding attention kernel (:mod:`refusal.generation.attention_kernel`) on a GPU: every launch configuration
against ``gqa_attention`` and against a floor, a kernel that only reads the same K/V.

    python -m benchmarks.kernels.decode_attention [--check] --out F.json   # on a GPU

The 8B decode shape mid-generation: batch 64, 32 query and 8 K/V heads of 128, a cache of 256 positions with rows
left-padded by 0..15 positions of a 72-wide prompt and 64 tokens generated. Each configuration is timed as 32 launches
(one K/V cache each, as a model's layers) replayed from a CUDA graph, in microseconds per layer.

What the H200 sweeps of 2026-12-02 found (``benchmarks/results/h200-2026-12-02/decode-attention-*.json``, in git
history at d505dfe (removed from the tree on 2026-12-06), made by earlier versions of this script that also held the
variants): the kernel, whose loop then ran over every block of the cache with loads masked past the span, took 17.4 us
a layer at 64 positions per block, 2 warps, 2 stages, ``gqa_attention`` 42 us eager; a kernel reading the visible K/V
alone (looping the same way) took 16.3 us. Variants that did not pay: flash-decoding splits of 16-128 positions with a
combining kernel (20.5-28.5 us), one program per query head without tensor cores (30.9 us), K loaded transposed (17.5
us, the same). The ninth session (``benchmarks/results/h200-2026-12-02-ninth/``, its sweeps in git history at d505dfe)
ended both loops at the span: the kernel 17.7 -> 13.9 us (32 positions a block, 2 warps, 2 stages, now the package's
constants), faster than the old read-only floor; the new floor (15.6 us) is a plain reduction, not tuned as the
kernel.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import cache
from pathlib import Path

import torch


@cache
def _read_kernel():
    """The floor: a kernel that reads the visible K and V of each row and K/V head (as the attention kernel does)
    and sums them."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(k, v, mask, out, skb, skh, skt, svb, svh, svt, smb, T: tl.constexpr, TP: tl.constexpr,
                    D: tl.constexpr, BLOCK_T: tl.constexpr):
        b = tl.program_id(0)
        kh = tl.program_id(1)
        d = tl.arange(0, D)
        tt = tl.arange(0, TP)
        row = tl.load(mask + b * smb + tt, mask=tt < T, other=0)
        n = tl.max(tl.where(row != 0, tt + 1, 0), 0)
        acc = tl.zeros((BLOCK_T, D), tl.float32)
        for i in range(0, n, BLOCK_T):  # the blocks of the span, as the attention kernel
            t = i + tl.arange(0, BLOCK_T)
            inside = t < n
            acc += tl.load(k + b * skb + kh * skh + t[:, None] * skt + d[None, :], mask=inside[:, None], other=0.0)
            acc += tl.load(v + b * svb + kh * svh + t[:, None] * svt + d[None, :], mask=inside[:, None], other=0.0)
        tl.store(out + (b * tl.num_programs(1) + kh) * D + d, tl.sum(acc, 0))

    def read_only(key, value, mask2d, block_t: int, num_warps: int, num_stages: int):
        bsz, hkv, total, dim = key.shape
        out = torch.empty(bsz, hkv, dim, dtype=torch.float32, device=key.device)
        read_kernel[(bsz, hkv)](key, value, mask2d, out, *key.stride()[:3], *value.stride()[:3], mask2d.stride(0),
                                T=total, TP=triton.next_power_of_2(total), D=dim, BLOCK_T=block_t,
                                num_warps=num_warps, num_stages=num_stages)
        return out

    return read_only


def check() -> dict:
    """On a GPU (the interpreter has no bfloat16): the kernel against ``gqa_attention`` in float32, for bf16, fp16
    and fp32 inputs and three head layouts, rows with padding, short spans and a single visible position."""
    from refusal.generation.attention import gqa_attention
    from refusal.generation.attention_kernel import decode_attention

    torch.manual_seed(0)
    errors = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for h, hkv, d in ((32, 8, 128), (12, 2, 128), (6, 3, 80)):
            q = torch.randn(5, h, 1, d, device="cuda", dtype=dt)
            k = torch.randn(5, hkv, 300, d, device="cuda", dtype=dt)
            v = torch.randn_like(k)
            m = torch.zeros(5, 300, dtype=torch.bool, device="cuda")
            for r, (a, b) in enumerate(((0, 290), (9, 200), (100, 104), (0, 1), (3, 64))):
                m[r, a:b] = True
            want = gqa_attention(None, q.float(), k.float(), v.float(), m[:, None, None], d ** -0.5)[0]
            err = (decode_attention(q, k, v, m, d ** -0.5).float() - want).abs().max().item()
            errors[f"{str(dt)[6:]} {h}/{hkv}x{d}"] = err
            print(f"{dt} heads {h}/{hkv} dim {d}: max abs difference {err:.2e}")
            assert err < (2e-2 if dt != torch.float32 else 1e-4), err
    return errors


def tune(out: str | None = None, layers: int = 32, batch: int = 64, heads: int = 32, kv_heads: int = 8,
         dim: int = 128, total: int = 256, width: int = 72, step: int = 64) -> dict:
    from benchmarks.kernels.gemm_decode import graph_time
    from refusal.generation import attention_kernel as AK
    from refusal.generation.attention import gqa_attention

    dev = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(batch, heads, 1, dim, device=dev, dtype=torch.bfloat16)
    ks = [torch.randn(batch, kv_heads, total, dim, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    vs = [torch.randn_like(k) for k in ks]
    mask = torch.zeros(batch, total, dtype=torch.bool, device=dev)
    for r in range(batch):
        mask[r, r % 16: width + step] = True
    scale = dim ** -0.5
    m4 = mask[:, None, None, :]

    def timed(fn) -> float:  # microseconds per layer: one launch on each layer's K/V, in one CUDA graph
        return round(graph_time(lambda i: fn(ks[i], vs[i]), layers) * 1e6, 2)

    want = gqa_attention(None, q, ks[0], vs[0], m4, scale)[0].float()
    visible = mask.sum().item() * kv_heads * dim * 2 * 2  # bytes of visible K and V per layer
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "shape": dict(batch=batch, heads=heads, kv_heads=kv_heads, dim=dim, cache=total,
                         visible_positions=round(mask.sum(1).float().mean().item(), 1)),
           "package_config": dict(block_t=AK.BLOCK_T, num_warps=AK.NUM_WARPS, num_stages=AK.NUM_STAGES),
           "gqa_attention_us": timed(lambda k, v: gqa_attention(None, q, k, v, m4, scale)), "configs": []}
    for bt, nw, ns in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)):
        cfg = dict(block=bt, num_warps=nw, num_stages=ns)
        err = (AK._launch(q, ks[0], vs[0], mask, scale, **cfg).float() - want).abs().max().item()
        us = timed(lambda k, v, cfg=cfg: AK._launch(q, k, v, mask, scale, **cfg))
        res["configs"].append({**cfg, "us": us, "tbps": round(visible / us / 1e6, 2), "max_abs_err": round(err, 4)})
        print(res["configs"][-1])
    read_only = _read_kernel()
    res["read_visible_us"] = min(timed(lambda k, v, c=c: read_only(k, v, mask, *c))
                                 for c in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)))
    full = torch.ones_like(mask)
    res["read_every_slot_us"] = min(timed(lambda k, v, c=c: read_only(k, v, full, *c))
                                    for c in ((64, 4, 2), (64, 8, 2), (128, 8, 2)))
    res["best"] = min(res["configs"], key=lambda c: c["us"])
    print(f"gqa_attention {res['gqa_attention_us']} us/layer; kernel best {res['best']}; reading the visible K/V "
          f"alone {res['read_visible_us']} us, every slot {res['read_every_slot_us']} us")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels.decode_attention")
    ap.add_argument("--out", default=None, help="the numbers as JSON")
    ap.add_argument("--check", action="store_true", help="only check the kernel's output")
    a = ap.parse_args()
    check()
    if not a.check:
        tune(a.out)
