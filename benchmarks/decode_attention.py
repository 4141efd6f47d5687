"""An experiment for the 8B decode step: the attention of one new token over the static cache as one Triton kernel
per layer (query heads grouped over their K/V head, online softmax, blocks of the cache that hold no visible
position skipped), in place of the three kernels of :func:`refusal.generation.attention.gqa_attention` (QK^T,
softmax, PV) that read every slot of the cache.

    python -m benchmarks.profile_generate --arch llama3-8b --variants default,graphs+fuse+tattn   # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.decode_attention   # the kernel against gqa_attention, on a CPU

:func:`enabled` swaps it in for decoding (one query position, CUDA tensors, a boolean mask) inside
``grouped_attention``; every other call goes to ``gqa_attention`` unchanged. It is registered as a
``torch.library.custom_op``, so ``torch.compile`` keeps it inside the compiled step and CUDA graphs capture it.
Not wired into the package: first it has to show that it pays (``docs/results.md`` says what the step spends).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_OP = None


def _build():
    """The kernel and its torch op (built on first use: triton is imported only then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(q, k, v, mask, out, sqb, sqh, skb, skh, skt, svb, svh, svt, smb, sob, soh, scale,
                                T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                                BLOCK_T: tl.constexpr):
        b = tl.program_id(0)
        kh = tl.program_id(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        heads = kh * G + g
        qv = tl.load(q + b * sqb + heads[:, None] * sqh + d[None, :], mask=g[:, None] < G, other=0.0)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid = tl.load(mask + b * smb + t, mask=t < T, other=0) != 0
            # masked loads fetch nothing: positions not yet written (or padding) cost no memory traffic
            kv = tl.load(k + b * skb + kh * skh + t[:, None] * skt + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(qv, tl.trans(kv)).to(tl.float32) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = tl.load(v + b * svb + kh * svh + t[:, None] * svt + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv).to(tl.float32)
            m_i = m_new
        o = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
        tl.store(out + b * sob + heads[:, None] * soh + d[None, :], o.to(out.dtype.element_ty), mask=g[:, None] < G)

    def launch(query, key, value, mask2d, scale: float) -> torch.Tensor:
        bsz, h, _, dim = query.shape
        hkv, total = key.shape[1], key.shape[2]
        g = h // hkv
        out = torch.empty(bsz, 1, h, dim, dtype=query.dtype, device=query.device)  # (b, q, h, d), as transformers
        strides = (*query.stride()[:2], *key.stride()[:3], *value.stride()[:3], mask2d.stride(0), out.stride(0),
                   out.stride(2))
        decode_attention_kernel[(bsz, hkv)](query, key, value, mask2d, out, *strides, scale, T=total, G=g,
                                            GP=max(16, triton.next_power_of_2(g)), D=dim, BLOCK_T=32)
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
    got = decode_attention(q, k, v, mask, d ** -0.5).float()
    err = (got - want).abs().max().item()
    print(f"max abs difference from gqa_attention: {err:.2e}")
    assert err < 2e-2, err
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

if __name__ == "__main__":
    check()
