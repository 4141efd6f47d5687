"""The Triton kernels of decoding: :mod:`refusal.generation.attention_kernel` and :mod:`refusal.generation.mlp_kernel`
(imported only when one is first launched: this module imports triton). Module-level, as Triton resolves the
functions a kernel calls among its globals."""

import triton
import triton.language as tl


@triton.jit
def attend(q, k, v, mask, out, b, kh, sqb, sqh, skb, skh, skt, svb, svh, svt, smb, sob, soh, scale,
           T: tl.constexpr, TP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
           DP: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    g = tl.arange(0, GP)  # the query heads of K/V head kh (padded to a tensor-core tile)
    d = tl.arange(0, DP)  # the head dimension (padded to a power of two)
    heads = kh * G + g
    real = (g[:, None] < G) & (d[None, :] < D)
    qv = tl.load(q + b * sqb + heads[:, None] * sqh + d[None, :], mask=real, other=0.0)
    # the row's span ends at its last visible position: one load of the mask row before the loop, so the loop's
    # K/V loads depend on nothing loaded inside it (they pipeline) and slots past the end are never read
    tt = tl.arange(0, TP)
    row = tl.load(mask + b * smb + tt, mask=tt < T, other=0)
    n = tl.max(tl.where(row != 0, tt + 1, 0), 0)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)
    for t0 in range(0, n, BLOCK):  # only the blocks of the span: none past its end is even visited
        t = t0 + tl.arange(0, BLOCK)
        inside = (t[:, None] < n) & (d[None, :] < D)
        kv = tl.load(k + b * skb + kh * skh + t[:, None] * skt + d[None, :], mask=inside, other=0.0)
        vv = tl.load(v + b * svb + kh * svh + t[:, None] * svt + d[None, :], mask=inside, other=0.0)
        valid = tl.load(mask + b * smb + t, mask=t < n, other=0) != 0  # padding inside the span
        s = tl.dot(qv, tl.trans(kv), input_precision=PRECISION).to(tl.float32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION).to(tl.float32)
        m_i = m_new
    o = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]  # a row with nothing visible: zeros
    tl.store(out + b * sob + heads[:, None] * soh + d[None, :], o.to(out.dtype.element_ty), mask=real)

@triton.jit
def decode_attention_kernel(q, k, v, mask, out, sqb, sqh, skb, skh, skt, svb, svh, svt, smb, sob, soh, scale,
                            T: tl.constexpr, TP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                            DP: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (row, K/V head)."""
    attend(q, k, v, mask, out, tl.program_id(0), tl.program_id(1), sqb, sqh, skb, skh, skt, svb, svh, svt, smb, sob,
           soh, scale, T, TP, G, GP, D, DP, BLOCK, PRECISION)


@triton.jit
def gate_up_act_kernel(x, wg, wu, out, M, sxm, swg, swu, som, N: tl.constexpr, K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                       ACT: tl.constexpr = 0):
    """``out = act(x @ wg^T) * (x @ wu^T)`` for a block of ``BLOCK_N`` output columns (program 0) and ``BLOCK_M``
    rows (program 1): both products accumulate in float32 side by side and are rounded to the output's dtype (as two
    GEMMs' outputs would be); the activation is computed in float32 and rounded to the dtype too, and the product of
    the two rounded values in float32, rounded at the store: the roundings of the module's own ``act(gate) * up``
    (an elementwise kernel each, computing in float32 for bf16/fp16 inputs), so no intermediate is more precise than
    the model's (in bf16, Gemma's head drifted by up to 3 logits over 8 steps without the activation's rounding,
    against 1.3 for the model's own two attention implementations: benchmarks/fidelity/static_toggles.py). ``ACT``
    0: SiLU; 1: GELU with the tanh approximation, written as ``g * sigmoid(2 c (g + 0.044715 g^3))``
    (= ``0.5 g (1 + tanh(c (...)))``)."""
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        a = tl.load(x + rm[:, None] * sxm + ks[None, :], mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        inside = (rn[None, :] < N) & (ks[:, None] < K)
        bg = tl.load(wg + rn[None, :] * swg + ks[:, None], mask=inside, other=0.0)  # (BLOCK_K, BLOCK_N) of wg^T
        bu = tl.load(wu + rn[None, :] * swu + ks[:, None], mask=inside, other=0.0)
        g += tl.dot(a, bg, input_precision=PRECISION)
        u += tl.dot(a, bu, input_precision=PRECISION)
    dtype = out.dtype.element_ty
    g = g.to(dtype).to(tl.float32)
    u = u.to(dtype).to(tl.float32)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    else:
        a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))  # 2 sqrt(2 / pi)
    y = a.to(dtype).to(tl.float32) * u
    tl.store(out + rm[:, None] * som + rn[None, :], y.to(dtype), mask=(rm[:, None] < M) & (rn[None, :] < N))
