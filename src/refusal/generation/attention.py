"""Grouped-query attention for generation: query heads grouped over their shared K/V head (no ``repeat_kv``
copies).

:func:`grouped_attention` swaps it in for a model's SDPA or eager attention and restores the model's own on exit,
but only where it computes what the model's own attention computes: a probe forward records the keyword arguments
every attention layer passes, and any argument that changes the attention's math and that :func:`gqa_attention`
does not apply (gpt-oss's attention sinks ``s_aux``, Gemma-2's logit ``softcap``, anything unknown) leaves the whole
model on its own attention code; :func:`grouped_attention_misfit` says why, for the run's record.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .attention_kernel import KERNEL, decode_attention

GQA = "refusal_gqa"
PROBE = "refusal_gqa_probe"

# keyword arguments that change nothing :func:`gqa_attention` computes: bookkeeping, or (``sliding_window``) what the
# attention mask, built by transformers for this implementation with the window applied, already carries
PASSIVE = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions", "output_router_logits",
                     "output_hidden_states", "return_dict", "past_key_values", "past_key_value", "layer_idx",
                     "sliding_window", KERNEL})
# arguments it applies itself (``dropout`` only as 0: generation runs in eval mode)
HANDLED = frozenset({"scaling", "dropout"})


def _misfit(kwargs: dict) -> str | None:
    """Why :func:`gqa_attention` would not compute what the model's attention computes with ``kwargs``, or None."""
    odd = sorted(k for k, v in kwargs.items() if v is not None and v is not False and k not in PASSIVE | HANDLED)
    if odd:
        return f"its attention passes {', '.join(odd)}, which the grouped attention does not apply"
    if kwargs.get("dropout"):
        return "its attention runs dropout (training mode)"
    return None


def gqa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention that groups query heads over their shared K/V head instead of expanding K/V (``repeat_kv``).

    Same result as transformers' SDPA path; for decoding (one query token over a long static cache) it avoids
    materialising 4-8x copies of the cache every step. Inputs ``(batch, heads, q, dim)``; returns
    ``(batch, q, heads, dim)`` as transformers' attention functions do. ``refusal_kernel=True`` runs the attention
    of one query position under a boolean mask as one Triton kernel (:mod:`~refusal.generation.attention_kernel`; the
    caller checked that it can run).
    """
    why = _misfit({"dropout": dropout, **kwargs})
    if why is not None:  # the probe let this model through, but this call differs: never approximate silently
        raise RuntimeError(f"grouped attention called on a layer it does not compute exactly ({why})")
    b, h, q, d = query.shape
    hkv, dv = key.shape[1], value.shape[-1]  # values may be narrower than queries and keys (MLA)
    g = h // hkv
    scale = scaling if scaling is not None else d ** -0.5
    if (kwargs.get(KERNEL) and q == 1 and dv == d and attention_mask is not None
            and attention_mask.dtype == torch.bool):
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
    out = torch.matmul(probs, value).view(b, h, q, dv)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA, gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA, sdpa_mask)


def grouped_attention_misfit(model: Any) -> str | None:
    """Why :func:`grouped_attention` leaves ``model`` on its own attention (None when it swaps it in): another
    implementation than SDPA or eager (flash-attention, ...), or attention layers that pass arguments the grouped
    attention does not apply, found by one probe forward of three tokens with the model's hooks held off (cached
    on the model per attention implementation)."""
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        return f"its attention implementation is {impl!r}, not SDPA or eager"
    cached = getattr(model, "_refusal_gqa_misfit", None)
    if cached is not None and cached[0] == impl:
        return cached[1]
    why = _probe(model)
    model._refusal_gqa_misfit = (impl, why)
    return why


@torch.no_grad()
def _probe(model: Any) -> str | None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from ..models.parts import decoder, model_device

    seen: list[str] = []
    calls = [0]

    def record(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        calls[0] += 1
        why = _misfit(kwargs)
        if why is not None:
            seen.append(f"{why} ({type(module).__name__})")
        return gqa_attention(module, query, key, value, attention_mask,
                             **{k: v for k, v in kwargs.items() if k in HANDLED})

    AttentionInterface.register(PROBE, record)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PROBE, sdpa_mask)
    cfg, old = model.config, model.config._attn_implementation
    hooks = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()
             if m._forward_hooks or m._forward_pre_hooks]
    try:
        for m, _, _ in hooks:  # an intervention's per-row hooks must neither run on nor see the probe
            m._forward_hooks, m._forward_pre_hooks = type(m._forward_hooks)(), type(m._forward_pre_hooks)()
        cfg._attn_implementation = PROBE
        decoder(model)(input_ids=torch.tensor([[0, 1, 2]], device=model_device(model)), use_cache=False)
    except Exception as exc:  # noqa: BLE001 -- reported: the model keeps its own attention
        return f"the grouped attention's probe forward failed ({type(exc).__name__}: {str(exc)[:160]})"
    finally:
        cfg._attn_implementation = old
        for m, fwd, pre in hooks:
            m._forward_hooks, m._forward_pre_hooks = fwd, pre
    if seen:
        return "; ".join(dict.fromkeys(seen))
    if not calls[0]:
        return "none of its layers calls transformers' attention interface"
    return None


@contextmanager
def grouped_attention(model: Any) -> Iterator[bool]:
    """Run attention with :func:`gqa_attention` (same math as SDPA/eager, no copies of the grouped K/V heads), and
    restore the model's own on exit. Yields whether it is active: a model on another attention implementation
    (flash-attention, ...) or whose attention does something the grouped attention does not
    (:func:`grouped_attention_misfit`) keeps its own."""
    cfg = model.config
    old = cfg._attn_implementation
    active = grouped_attention_misfit(model) is None
    if active:
        _register()
        cfg._attn_implementation = GQA
    try:
        yield active
    finally:
        cfg._attn_implementation = old
