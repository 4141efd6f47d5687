"""The Triton kernels of decoding: :mod:`refusal.generation.attention_kernel` and
:mod:`refusal.generation.mlp_kernel` (imported only when one
is first launched: this module imports triton). Module-level, as Triton resolves the functions a kernel calls among
its globals."""

import triton
import triton.language as tl

try:  # programmatic dependent launch (Hopper and later; Triton >= 3.3)
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover -- only launches with PDL use it
    gdc_wait = None


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
    for t0 in range(0, T, BLOCK):
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
def l2_prefetch(ptrs):
    """One PTX ``prefetch`` into L2 (kept there: evict_last) per pointer: no registers filled, nothing waited for."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch(w, sink, c, n_pre, PRE_PER: tl.constexpr, PRE_BLOCK: tl.constexpr, PRE_ASM: tl.constexpr,
             LINE: tl.constexpr):
    """Chunk ``c`` (``PRE_PER`` elements) of ``w`` brought into L2 and kept there (evict_last) for the GEMM that
    follows. ``PRE_ASM``: one PTX ``prefetch`` per 128-byte line (``LINE`` elements): no registers filled, nothing
    waited for; else (Triton's interpreter) loads, summed into ``sink`` so that they are not optimised away."""
    if PRE_ASM:
        for i in range(0, PRE_PER, PRE_BLOCK * LINE):
            l2_prefetch(w + tl.minimum(c * PRE_PER + i + tl.arange(0, PRE_BLOCK) * LINE, n_pre - 1))
    else:
        acc = tl.zeros((PRE_BLOCK,), tl.float32)
        for i in range(0, PRE_PER, PRE_BLOCK):
            o = c * PRE_PER + i + tl.arange(0, PRE_BLOCK)
            acc += tl.load(w + o, mask=o < n_pre, other=0.0, eviction_policy="evict_last").to(tl.float32)
        tl.store(sink + c, tl.sum(acc, 0))


@triton.jit
def decode_attention_kernel(q, k, v, mask, out, w, sink, n_pre, sqb, sqh, skb, skh, skt, svb, svh, svt, smb, sob,
                            soh, scale, T: tl.constexpr, TP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                            D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                            PRE_ROWS: tl.constexpr, PRE_PER: tl.constexpr, PRE_BLOCK: tl.constexpr,
                            PRE_ASM: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr = False):
    """Programs (row, K/V head); with ``PRE_ROWS``, the first ``PRE_ROWS`` rows of programs of every K/V head
    instead read a chunk of ``w`` (the output projection's weight) into L2 while the others attend."""
    pid = tl.program_id(0)
    kh = tl.program_id(1)
    if PDL:  # launched before the kernel that writes this step's K/V has finished: wait for it
        gdc_wait()
    if PRE_ROWS == 0:
        attend(q, k, v, mask, out, pid, kh, sqb, sqh, skb, skh, skt, svb, svh, svt, smb, sob, soh, scale,
               T, TP, G, GP, D, DP, BLOCK, PRECISION)
    else:
        if pid < PRE_ROWS:
            prefetch(w, sink, kh * PRE_ROWS + pid, n_pre, PRE_PER, PRE_BLOCK, PRE_ASM, LINE)
        else:
            attend(q, k, v, mask, out, pid - PRE_ROWS, kh, sqb, sqh, skb, skh, skt, svb, svh, svt, smb, sob,
                   soh, scale, T, TP, G, GP, D, DP, BLOCK, PRECISION)


@triton.jit
def gate_up_act_kernel(x, wg, wu, out, M, sxm, swg, swu, som, N: tl.constexpr, K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                       PDL: tl.constexpr = False, PRE_K: tl.constexpr = 0, LINE: tl.constexpr = 64):
    """``out = silu(x @ wg^T) * (x @ wu^T)`` for a block of ``BLOCK_N`` output columns (program 0) and ``BLOCK_M``
    rows (program 1): both products accumulate in float32 side by side, are rounded to the output's dtype (as two
    GEMMs' outputs would be), and SiLU·mul is applied in float32 before the one store."""
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if PDL:  # launched early: bring the first PRE_K columns of this block's weight rows into L2 (they do not depend
        # on the kernel before, which may still be running), then wait for that kernel (it writes x)
        if PRE_K > 0:
            lines = tl.arange(0, PRE_K // LINE) * LINE
            rows = tl.minimum(rn, N - 1)
            l2_prefetch(wg + rows[:, None] * swg + lines[None, :])
            l2_prefetch(wu + rows[:, None] * swu + lines[None, :])
        gdc_wait()
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
    y = g * tl.sigmoid(g) * u
    tl.store(out + rm[:, None] * som + rn[None, :], y.to(dtype), mask=(rm[:, None] < M) & (rn[None, :] < N))
