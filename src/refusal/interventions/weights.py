"""Weight orthogonalization: directional ablation baked into the weights of every block that writes to the
residual stream (embedding, attention and MLP output projections, their biases)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..models.parts import find_parts


def _orthogonalize_linear(lin: nn.Linear, d: torch.Tensor) -> None:
    w = lin.weight.data
    dd = d.to(device=w.device, dtype=torch.float32)
    w.sub_((dd[:, None] * (dd @ w.float())[None, :]).to(w.dtype))
    if lin.bias is not None:
        b = lin.bias.data
        b.sub_((dd * (dd @ b.float())).to(b.dtype))


def orthogonalize_(model: nn.Module, direction: torch.Tensor) -> None:
    """Edit the weights in place so that no block can write ``direction`` into the residual stream.

    The embedding and every attention and MLP output projection are projected; a tied output embedding is untied
    first so the logits do not change. The result equals hook-based :func:`ablate` at all layers.
    """
    parts = find_parts(model)
    d = direction.float()
    d = d / d.norm()
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is parts.embed.weight:
        out_emb.weight = nn.Parameter(parts.embed.weight.data.clone(), requires_grad=False)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
    e = parts.embed.weight.data
    dd = d.to(device=e.device)
    e.sub_(((e.float() @ dd)[:, None] * dd[None, :]).to(e.dtype))
    for i in range(parts.n_layers):
        _orthogonalize_linear(parts.attn_out_proj(i), d)
        _orthogonalize_linear(parts.mlp_out_proj(i), d)


@contextmanager
def orthogonalized(model: nn.Module, direction: torch.Tensor):
    """:func:`orthogonalize_` for the duration of a block; the original weights come back on exit."""
    parts = find_parts(model)
    mods = [parts.embed] + [parts.attn_out_proj(i) for i in range(parts.n_layers)] + [
        parts.mlp_out_proj(i) for i in range(parts.n_layers)]
    saved = [(m, m.weight.data.clone(), None if getattr(m, "bias", None) is None else m.bias.data.clone())
             for m in mods]
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is parts.embed.weight
    tie_cfg = getattr(model.config, "tie_word_embeddings", None)
    try:
        orthogonalize_(model, direction)
        yield
    finally:
        for m, w, b in saved:
            m.weight.data.copy_(w)
            if b is not None:
                m.bias.data.copy_(b)
        if tied:
            out_emb.weight = parts.embed.weight
            if tie_cfg is not None:
                model.config.tie_word_embeddings = tie_cfg
