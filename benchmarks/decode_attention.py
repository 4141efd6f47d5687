"""An experiment for the 8B decode step: the attention of one new token over the static cache as one Triton kernel
per layer (query heads grouped over their K/V head, online softmax, blocks of the cache that hold no visible
position skipped), in place of the three kernels of :func:`refusal.generation.attention.gqa_attention` (QK^T,
softmax, PV) that read every slot of the cache.

    python -m benchmarks.decode_attention --tune --out F.json   # on a GPU: launch configurations, timed
    python -m benchmarks.profile_generate --arch llama3-8b --variants default,graphs+fuse+tattn   # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.decode_attention   # the kernel against gqa_attention, on a CPU

:func:`enabled` swaps it in for decoding (one query position, CUDA tensors, a boolean mask) inside
``grouped_attention``; every other call goes to ``gqa_attention`` unchanged. It is registered as a
``torch.library.custom_op``, so ``torch.compile`` keeps it inside the compiled step and CUDA graphs capture it.
Not wired into the package: first it has to show that it pays (``docs/results.md`` says what the step spends).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

_OP = None
# launch configuration: positions per block, warps and pipeline stages of the main kernel, and cache positions per
# program (flash-decoding: 0 = the whole cache in one program per row and K/V head; else the splits' partial
# results are combined by a second kernel). TATTN="block_t,num_warps,num_stages,split" overrides it; ``--tune``
# sweeps them.
KEYS = ("block_t", "num_warps", "num_stages", "split")
CONFIG = dict(zip(KEYS, map(int, os.environ.get("TATTN", "64,4,2,0").split(","))))


def _build():
    """The kernel and its torch op (built on first use: triton is imported only then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(q, k, v, mask, out, part_m, part_l, part_acc, sqb, sqh, skb, skh, skt, svb, svh,
                                svt, smb, sob, soh, scale, T: tl.constexpr, TP: tl.constexpr, G: tl.constexpr,
                                GP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT: tl.constexpr,
                                S: tl.constexpr):
        b = tl.program_id(0)
        kh = tl.program_id(1)
        sp = tl.program_id(2)  # which SPLIT positions of the cache (flash-decoding); S of them
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        heads = kh * G + g
        qv = tl.load(q + b * sqb + heads[:, None] * sqh + d[None, :], mask=g[:, None] < G, other=0.0)
        # the row's visible span ends at its last visible position: one load of the mask row, before the loop, so
        # the loop's K/V loads depend on nothing loaded inside it (they pipeline); slots past the end (not yet
        # written) are never read
        tt = tl.arange(0, TP)
        row = tl.load(mask + b * smb + tt, mask=tt < T, other=0)
        n = tl.max(tl.where(row != 0, tt + 1, 0), 0)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        for i in range(0, SPLIT, BLOCK_T):
            t = sp * SPLIT + i + tl.arange(0, BLOCK_T)
            inside = t < n
            kv = tl.load(k + b * skb + kh * skh + t[:, None] * skt + d[None, :], mask=inside[:, None], other=0.0)
            vv = tl.load(v + b * svb + kh * svh + t[:, None] * svt + d[None, :], mask=inside[:, None], other=0.0)
            valid = tl.load(mask + b * smb + t, mask=inside, other=0) != 0  # padding inside the span
            s = tl.dot(qv, tl.trans(kv)).to(tl.float32) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv).to(tl.float32)
            m_i = m_new
        real = g < G
        if S == 1:  # the whole cache in one program: the output itself
            o = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
            tl.store(out + b * sob + heads[:, None] * soh + d[None, :], o.to(out.dtype.element_ty),
                     mask=real[:, None])
        else:  # this split's running max, sum and weighted values, for the combining kernel
            row_h = (b * G * tl.num_programs(1) + heads) * S + sp  # partials laid out (batch, head, split)
            tl.store(part_m + row_h, m_i, mask=real)
            tl.store(part_l + row_h, l_i, mask=real)
            tl.store(part_acc + row_h[:, None] * D + d[None, :], acc, mask=real[:, None])

    @triton.jit
    def combine_kernel(part_m, part_l, part_acc, out, sob, soh, H: tl.constexpr, S: tl.constexpr,
                       SP: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        j = tl.arange(0, SP)
        d = tl.arange(0, D)
        base = (b * H + h) * S
        m = tl.load(part_m + base + j, mask=j < S, other=float("-inf"))
        ls = tl.load(part_l + base + j, mask=j < S, other=0.0)
        acc = tl.load(part_acc + (base + j)[:, None] * D + d[None, :], mask=(j < S)[:, None], other=0.0)
        top = tl.max(m, 0)
        w = tl.exp(m - tl.where(top == float("-inf"), 0.0, top))
        total = tl.sum(w * ls, 0)
        o = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0, 1.0, total)
        tl.store(out + b * sob + h * soh + d, o.to(out.dtype.element_ty))

    def launch(query, key, value, mask2d, scale: float) -> torch.Tensor:
        bsz, h, _, dim = query.shape
        hkv, total = key.shape[1], key.shape[2]
        g = h // hkv
        out = torch.empty(bsz, 1, h, dim, dtype=query.dtype, device=query.device)  # (b, q, h, d), as transformers
        strides = (*query.stride()[:2], *key.stride()[:3], *value.stride()[:3], mask2d.stride(0), out.stride(0),
                   out.stride(2))
        cfg = CONFIG
        split = cfg["split"] or triton.next_power_of_2(total)
        n_split = triton.cdiv(total, split)
        f32 = dict(dtype=torch.float32, device=query.device)
        part_m = part_l = part_acc = out  # unused by a single split
        if n_split > 1:
            part_m, part_l = torch.empty(bsz, h, n_split, **f32), torch.empty(bsz, h, n_split, **f32)
            part_acc = torch.empty(bsz, h, n_split, dim, **f32)
        decode_attention_kernel[(bsz, hkv, n_split)](
            query, key, value, mask2d, out, part_m, part_l, part_acc, *strides, scale, T=total,
            TP=triton.next_power_of_2(total), G=g, GP=max(16, triton.next_power_of_2(g)), D=dim,
            BLOCK_T=min(cfg["block_t"], split), SPLIT=split, S=n_split, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
        if n_split > 1:
            combine_kernel[(bsz, h)](part_m, part_l, part_acc, out, out.stride(0), out.stride(2), H=h, S=n_split,
                                     SP=triton.next_power_of_2(n_split), D=dim, num_warps=1)
        return out

    # an opaque op: torch.compile calls it as it is (from its fake version it knows the output's shape), and a
    # CUDA graph captures its launch
    @torch.library.custom_op("refusal_bench::decode_attention", mutates_args=())
    def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask2d: torch.Tensor,
                         scale: float) -> torch.Tensor:
        return launch(query, key, value, mask2d, scale)

    @decode_attention.register_fake
    def _(query, key, value, mask2d, scale):
        bsz, h, _, dim = query.shape
        return query.new_empty(bsz, 1, h, dim)

    return decode_attention


def _ops():
    global _OP
    if _OP is None:
        _OP = _build()
    return _OP


def decode_attention(query, key, value, mask2d, scale):
    """Attention of one query position: ``query (b, h, 1, d)``, ``key``/``value (b, hkv, T, d)``, ``mask2d (b, T)``
    (non-zero = visible); returns ``(b, 1, h, d)``."""
    return _ops()(query, key, value, mask2d, scale)


@contextmanager
def enabled(cpu: bool = False):
    """Inside: decoding attention of ``grouped_attention`` runs the Triton kernel (one query position on a GPU, a
    boolean 4-D mask); everything else runs :func:`gqa_attention` as before. ``cpu``: on CPU tensors too (the
    interpreter's check)."""
    from transformers import AttentionInterface

    from refusal.generation import attention as A

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        decoding = query.shape[2] == 1 and attention_mask is not None and attention_mask.dtype == torch.bool
        if decoding and (query.is_cuda or cpu) and kwargs.get(A.VISIBLE) is None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            mask2d = attention_mask[:, 0, -1, : key.shape[2]]
            return decode_attention(query, key, value, mask2d, scale), None
        return A.gqa_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    _ops()  # built (and registered as an op) before anything is compiled
    A._register()
    AttentionInterface.register(A.GQA, attention)
    try:
        yield
    finally:
        AttentionInterface.register(A.GQA, A.gqa_attention)


def check() -> None:
    """The kernel against ``gqa_attention`` (interpreted on a CPU, where numpy has no bfloat16: float16 there)."""
    from refusal.generation.attention import gqa_attention

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16
    b, h, hkv, d, total = 3, 8, 2, 64, 80
    q = torch.randn(b, h, 1, d, device=dev).to(dtype)
    k = torch.randn(b, hkv, total, d, device=dev).to(dtype)
    v = torch.randn(b, hkv, total, d, device=dev).to(dtype)
    mask = torch.zeros(b, total, dtype=torch.bool, device=dev)
    mask[0, :50] = True
    mask[1, 7:50] = True  # left padding
    mask[2, 30:50] = True  # more padding: its first block holds nothing visible
    want = gqa_attention(None, q.float(), k.float(), v.float(), mask[:, None, None, :], d ** -0.5)[0]
    global CONFIG
    keep = CONFIG
    for split in (0, 16, 32):  # the whole cache per program; flash-decoding splits (the first ones empty in row 2)
        CONFIG = {**keep, "split": split, "block_t": min(keep["block_t"], split or keep["block_t"])}
        got = decode_attention(q, k, v, mask, d ** -0.5).float()
        err = (got - want).abs().max().item()
        print(f"split {split}: max abs difference from gqa_attention: {err:.2e}")
        assert err < 2e-2, err
    CONFIG = keep
    if dev == "cpu":  # and inside a model's decoding: the static decoder's tokens with and without the kernel
        from refusal.generation.static import StaticDecoder
        from tests.conftest import build_model

        model = build_model("llama", 300, n_layers=2)
        ids = torch.randint(5, 300, (3, 9))
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # left padding
        eos = torch.tensor([], dtype=torch.long)
        want = StaticDecoder(model, compile=False)(ids, mask, 6, eos, 0)[0]
        with StaticDecoder(model, compile=False) as dec, enabled(cpu=True):
            got = dec(ids, mask, 6, eos, 0)[0]
        print(f"3 rows x 6 tokens decoded with the kernel, the same as without: {bool(torch.equal(got, want))}")
        assert torch.equal(got, want)

def tune(out: str | None = None, layers: int = 32, batch: int = 64, heads: int = 32, kv_heads: int = 8,
         dim: int = 128, total: int = 256, width: int = 72, step: int = 64) -> dict:
    """On a GPU: every launch configuration, timed as ``layers`` launches (one K/V cache each, as a model's layers)
    replayed from a CUDA graph, against ``gqa_attention`` the same way; the 8B decode shape mid-generation (rows
    left-padded by 0..15 positions of a ``width``-wide prompt, ``step`` tokens generated, a cache of ``total``).
    Sets :data:`CONFIG` to the fastest whose output matches."""
    import itertools
    import json

    from refusal.generation.attention import gqa_attention

    global CONFIG
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

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for k, v in zip(ks, vs):
                fn(k, v)
        graph.replay()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 10 / layers * 1e3)
        return best  # microseconds per layer

    want = gqa_attention(None, q, ks[0], vs[0], m4, scale)[0].float()
    visible = mask.sum().item() * kv_heads * dim * 2 * 2  # bytes of visible K and V per layer
    res = {"device": torch.cuda.get_device_name(), "shape": dict(batch=batch, heads=heads, kv_heads=kv_heads,
           dim=dim, cache=total, visible_positions=int(mask.sum(1).float().mean().item())),
           "gqa_attention_us": round(timed(lambda k=ks[0], v=vs[0]: gqa_attention(None, q, k, v, m4, scale)), 2),
           "configs": []}
    launch = _ops()
    grid = [c for c in itertools.product((16, 32, 64, 128), (2, 4), (1, 2), (0, 16, 32, 64, 128))
            if not c[3] or c[0] <= c[3]]
    for c in grid:
        CONFIG = dict(zip(KEYS, c))
        try:
            err = (launch(q, ks[0], vs[0], mask, scale).float() - want).abs().max().item()
            us = timed(lambda k=ks[0], v=vs[0]: launch(q, k, v, mask, scale))
        except Exception as exc:  # noqa: BLE001 -- a configuration the compiler refuses (shared memory)
            res["configs"].append({**CONFIG, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
            continue
        res["configs"].append({**CONFIG, "us": round(us, 2), "tbps": round(visible / us / 1e6, 2),
                               "max_abs_err": round(err, 4)})
        print(res["configs"][-1])
    ok = [c for c in res["configs"] if "us" in c and c["max_abs_err"] < 2e-2]
    best = min(ok, key=lambda c: c["us"])
    CONFIG = {k: best[k] for k in KEYS}
    res["best"] = best
    print(f"gqa_attention {res['gqa_attention_us']} us/layer; best {best}")
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode_attention")
    ap.add_argument("--tune", action="store_true", help="sweep the launch configurations (a GPU)")
    ap.add_argument("--out", default=None, help="the sweep's numbers as JSON")
    a = ap.parse_args()
    check()
    if a.tune:
        best = tune(a.out)["best"]
        print("TATTN=" + ",".join(str(best[k]) for k in KEYS))
