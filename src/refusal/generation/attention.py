"""Grouped-query attention for generation: query heads grouped over their shared K/V head (no ``repeat_kv``
copies), and, while decoding from a static cache, only the filled part of the cache read.

:func:`grouped_attention` swaps it in for a model's SDPA or eager attention and restores the model's own on exit.
The static decoder passes ``refusal_visible=L`` through the model's forward (transformers hands unknown keyword
arguments down to the attention function): keys at cache positions ``>= L`` are not yet written, so they are left
out instead of being read and masked. ``L`` is an int or the length of a 1-D tensor (which torch.compile can treat
as a dynamic size from the first compile, so one compiled step serves every length).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .attention_kernel import KERNEL, decode_attention

GQA = "refusal_gqa"
VISIBLE = "refusal_visible"  # keyword argument: how many leading cache positions the attention reads


def gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that groups query heads over their shared K/V head instead of expanding K/V (``repeat_kv``).

    Same result as transformers' SDPA path; for decoding (one query token over a long static cache) it avoids
    materialising 4-8x copies of the cache every step. Inputs ``(batch, heads, q, dim)``; returns
    ``(batch, q, heads, dim)`` as transformers' attention functions do. ``refusal_visible=L`` (an int or a 1-D tensor
    of that length) reads only the first ``L`` key/value positions (the caller vouches that the rest are masked out
    for every query). ``refusal_kernel=True`` runs the attention of one query position under a boolean mask as one
    Triton kernel (:mod:`~refusal.generation.attention_kernel`; the caller checked that it can run).
    """
    visible = kwargs.get(VISIBLE)
    if visible is not None:
        n = visible if isinstance(visible, int) else visible.shape[0]
        key, value = key[:, :, :n], value[:, :, :n]
    b, h, q, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    scale = scaling if scaling is not None else d ** -0.5
    if kwargs.get(KERNEL) and q == 1 and attention_mask is not None and attention_mask.dtype == torch.bool:
        # decoding, asked for by the static decoder: one Triton kernel that reads only the visible span
        return decode_attention(query, key, value, attention_mask[:, 0, -1, : key.shape[2]], scale), None
    qg = query.reshape(b, hkv, g * q, d)  # heads j*g .. j*g+g-1 share K/V head j (repeat_kv's order)
    scores = torch.matmul(qg, key.transpose(-1, -2)).float() * scale  # (b, hkv, g*q, k)
    scores = scores.view(b, hkv, g, q, -1)
    k = scores.shape[-1]
    if attention_mask is not None:
        m = attention_mask[:, :, None, :, :k]  # (b, 1, 1, q, k)
        # a finite minimum, as eager attention uses: rows that are all padding then stay finite (their output is unused)
        scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min) if m.dtype == torch.bool else scores + m
    elif q > 1:  # no mask means plain causal attention (SDPA's is_causal): in the static decoder that is the
        # prefill, whose queries sit at cache positions 0..q-1, ahead of the cache's unfilled slots
        causal = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(0)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b, hkv, g * q, -1)
    out = torch.matmul(probs, value).view(b, h, q, d)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA, gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA, sdpa_mask)


@contextmanager
def grouped_attention(model):
    """Run attention with :func:`gqa_attention` (same math as SDPA/eager, no copies of the grouped K/V heads: on an
    H200, ``repeat_kv`` copies were a fifth of the decode step at batch 512), and restore the model's own on exit.
    Yields whether it is active (a model on another attention implementation, flash-attention for one, keeps it)."""
    cfg = model.config
    old = cfg._attn_implementation
    active = old in ("sdpa", "eager")
    if active:
        _register()
        cfg._attn_implementation = GQA
    try:
        yield active
    finally:
        cfg._attn_implementation = old
