"""Weight orthogonalization: directional ablation baked into the weights of every matrix that writes to the
residual stream (:func:`refusal.models.writers.residual_writers`: the embedding, every attention and MLP output
projection, every expert's and shared expert's output projection, and their biases).

With the defaults the edit is the plain projection of Arditi et al., ``W ← W − B̂ᵀB̂ W`` along each writer's
residual axis (``B̂`` the orthonormal basis of the direction or subspace), and the edited model equals hook-based
:func:`~refusal.interventions.hooks.ablate` at every layer. Options:

``layer_weights``
    One factor per layer: ``W ← W − w_l B̂ᵀB̂ W`` for the writers of layer ``l`` (the embedding uses ``w_0``), so a
    kernel over depth can weight the edit; all ones is the plain edit, 0 leaves a layer alone.
``orthogonal_to_harmless``
    The harmless mean activation (``(d,)``): the direction is first made orthogonal to it, ``r ← r − (r·ĥ)ĥ``, so
    the edit does not remove the harmless mean's component ("biprojection", heretic's ``orthogonalize_direction``).
``norm_preserving``
    Magnitude-preserving orthogonal ablation as in heretic (``row_normalization = "full"``, after grimjim's
    norm-preserving biprojected abliteration): for every residual coordinate ``i`` the weights that write it
    (row ``W[i, :]`` of a Linear, the column ``E[:, i]`` of the embedding, ``W[e, i, :]`` of expert ``e``) are
    normalised to unit norm along the input axis, the weighted projection is applied to that normalised matrix,
    the rows are normalised again and multiplied by their original norms. Every row keeps its norm; the direction
    is no longer removed exactly (the rescaling reintroduces a little of it), so this does *not* equal hook
    ablation. Biases get the plain (weighted) projection.

A direction may be ``(d,)``, a ``(k, d)`` subspace (orthonormalised here), a per-layer ``(n_layers, k, d)`` basis
(layer ``l``'s writers use basis ``l``; the embedding basis 0), a list of per-layer tensors, or a
:class:`~refusal.directions.base.Direction`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn

from ..errors import RefusalError
from ..linalg import orthonormalize
from ..models.parts import find_parts, module_device, output_embeddings, resident_tensor
from ..models.writers import Writer, residual_writers

if TYPE_CHECKING:
    from ..directions.base import Direction

    # a direction as the edit takes it: (d,), (k, d), (n_layers, k, d), one tensor per layer, or a Direction
    DirectionLike = torch.Tensor | Sequence[torch.Tensor] | Direction

__all__ = ["EditOptions", "edit_matrix", "orthogonalize_", "orthogonalized", "prepare_bases"]


class EditOptions(TypedDict):
    """The options of :func:`orthogonalize_` (see the module), as the exports pass them on."""

    norm_preserving: bool
    orthogonal_to_harmless: torch.Tensor | None
    layer_weights: Sequence[float] | None


def _orthonormal(rows: torch.Tensor) -> torch.Tensor:
    return orthonormalize(rows)


def _as_tensor(direction: DirectionLike) -> torch.Tensor:
    if hasattr(direction, "vectors") and not isinstance(direction, torch.Tensor):  # a Direction
        direction = direction.vectors
    if isinstance(direction, (list, tuple)):
        rows = [torch.as_tensor(r).float() for r in direction]
        rows = [r[None] if r.ndim == 1 else r for r in rows]
        if len({r.shape for r in rows}) != 1:
            raise RefusalError("The per-layer directions have different shapes.",
                               "Give one (d,) or (k, d) tensor per layer, all of one shape.")
        return torch.stack(rows)
    return torch.as_tensor(direction).detach().float()


def prepare_bases(direction: DirectionLike, hidden_size: int, n_layers: int,
                  orthogonal_to_harmless: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One orthonormal ``(k, d)`` basis per layer (float32, CPU), after checking the shape against the model.

    Raises :class:`RefusalError` for a hidden size or a per-layer layer count that does not match the model."""
    d = _as_tensor(direction).cpu()
    if d.ndim not in (1, 2, 3) or d.numel() == 0:
        raise RefusalError(f"A direction must have shape (d,), (k, d) or (n_layers, k, d); got {tuple(d.shape)}.",
                           "Pass one vector, a subspace or one basis per layer.")
    if d.shape[-1] != hidden_size:
        raise RefusalError(f"The direction has size {d.shape[-1]} but the model's hidden size is {hidden_size}: it "
                           "comes from another model.", "Use a direction extracted from this model.")
    if d.ndim == 3 and d.shape[0] != n_layers:
        raise RefusalError(f"The per-layer direction has one basis for each of {d.shape[0]} layers but the model "
                           f"has {n_layers}.", "Use a direction extracted from this model.")
    if not torch.isfinite(d).all():
        raise RefusalError("The direction holds NaN or infinite values.", "Recompute it.")
    if orthogonal_to_harmless is not None:
        h = torch.as_tensor(orthogonal_to_harmless).detach().float().cpu().reshape(-1)
        if h.numel() != hidden_size:
            raise RefusalError(f"The harmless mean has size {h.numel()}, not the hidden size {hidden_size}.",
                               "Pass the harmless mean activation of this model (at the direction's layer).")
        h = h / h.norm().clamp_min(1e-30)
        d = d - (d @ h).unsqueeze(-1) * h
    layers = [d] * n_layers if d.ndim < 3 else list(d)
    bases = []
    for i, rows in enumerate(layers):
        b = _orthonormal(rows)
        if b.shape[0] == 0:
            raise RefusalError(f"The direction for layer {i} is zero (or lies in the harmless mean's span).",
                               "Use a non-zero direction.")
        bases.append(b)
    return bases


def _check_weights(layer_weights: Sequence[float] | None, n_layers: int) -> list[float]:
    if layer_weights is None:
        return [1.0] * n_layers
    w = [float(x) for x in layer_weights]
    if len(w) != n_layers:
        raise RefusalError(f"layer_weights has {len(w)} entries but the model has {n_layers} layers.",
                           "Give one weight per layer.")
    return w


def _edit_rows(x: torch.Tensor, basis: torch.Tensor, scale: float, norm_preserving: bool) -> torch.Tensor:
    """``x`` is ``(n, d)``: one row per input index, in residual space; float32. Returns the edited rows."""
    if not norm_preserving:
        return x - scale * (x @ basis.T) @ basis
    # per residual coordinate (a column here), the norm over the input axis (the rows)
    norms = x.norm(dim=0, keepdim=True)
    xn = x / norms.clamp_min(1e-30)
    xn = xn - scale * (xn @ basis.T) @ basis
    xn = xn / xn.norm(dim=0, keepdim=True).clamp_min(1e-30)
    return xn * norms


def edit_matrix(w: torch.Tensor, basis: torch.Tensor, axis: int, *, scale: float = 1.0,
                norm_preserving: bool = False) -> torch.Tensor:
    """The edited copy (float32) of a weight whose residual axis is ``axis``: ``W − scale·B̂ᵀB̂W`` along that axis
    (``basis`` ``(k, d)`` orthonormal), or heretic's norm-preserving variant. A 3-D weight (fused experts, leading
    axis = expert) is edited expert by expert."""
    basis = basis.to(device=w.device, dtype=torch.float32)
    axis = axis % w.ndim
    if w.ndim == 3:
        if axis == 0:
            raise ValueError("the leading axis of a fused expert weight is the expert axis")
        return torch.stack([edit_matrix(w[e], basis, axis - 1, scale=scale, norm_preserving=norm_preserving)
                            for e in range(w.shape[0])])
    if w.ndim == 1:
        x = w.float()
        return x - scale * (basis.T @ (basis @ x))
    x = w.float().movedim(axis, -1)  # (n_in, d)
    return _edit_rows(x, basis, scale, norm_preserving).movedim(-1, axis)


def _edit_bias(b: torch.Tensor, basis: torch.Tensor, scale: float) -> torch.Tensor:
    x = b.float()
    basis = basis.to(device=b.device, dtype=torch.float32)
    return x - scale * (x @ basis.T) @ basis


def _untie_output(model: nn.Module, embed: nn.Embedding) -> bool:
    """Give the output embedding its own copy of a tied input embedding (so editing the input leaves the logits
    alone). Returns whether it was tied."""
    out_emb = output_embeddings(model)
    if out_emb is None or out_emb.weight is not embed.weight:
        return False
    dev = module_device(out_emb, embed.weight.device)  # where the head computes (a device map may split them)
    out_emb.weight = nn.Parameter(embed.weight.data.clone().to(dev), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, _text_config(model))}.values():
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


def _text_config(model: Any) -> Any:  # the transformers config (untyped)
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _resident(writers: list[Writer]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each writer's weight and bias as the tensors that hold their values, on their own devices (the in-memory copy
    of a weight that accelerate offloaded); a :class:`RefusalError` for weights offloaded to disk."""
    return [(resident_tensor(wr.module, wr.attr, wr.name),
             None if wr.bias_attr is None else resident_tensor(wr.module, wr.bias_attr)) for wr in writers]


def _apply(writers: list[Writer], bases: list[torch.Tensor], weights: list[float], norm_preserving: bool) -> None:
    tensors = _resident(writers)  # checks every writer before any is edited
    for wr, (p, b) in zip(writers, tensors):
        i = 0 if wr.layer is None else wr.layer
        s = weights[i]
        if s == 0.0:
            continue
        if wr.fused:  # expert by expert, so the float32 copy is one expert's size
            for e in range(p.shape[0]):
                p.data[e].copy_(edit_matrix(p.data[e], bases[i], wr.axis - 1, scale=s,
                                            norm_preserving=norm_preserving).to(p.dtype))
        else:
            p.data.copy_(edit_matrix(p.data, bases[i], wr.axis, scale=s, norm_preserving=norm_preserving).to(p.dtype))
        if b is not None:
            b.data.copy_(_edit_bias(b.data, bases[i], s).to(b.dtype))


@torch.no_grad()
def orthogonalize_(model: nn.Module, direction: DirectionLike, *, norm_preserving: bool = False,
                   orthogonal_to_harmless: torch.Tensor | None = None,
                   layer_weights: Sequence[float] | None = None) -> None:
    """Edit the weights in place so that no block can write ``direction`` into the residual stream.

    Every residual writer is projected (see the module doc for the options); a tied output embedding is untied
    first so the logits do not change. With the defaults the result equals hook-based
    :func:`~refusal.interventions.hooks.ablate` at all layers."""
    parts = find_parts(model)
    bases = prepare_bases(direction, parts.hidden_size, parts.n_layers, orthogonal_to_harmless)
    weights = _check_weights(layer_weights, parts.n_layers)
    writers = residual_writers(model)
    _resident(writers)  # a weight offloaded to disk is refused before anything changes
    if weights[0] != 0.0:
        _check_untiable(model, parts.embed)
        _untie_output(model, parts.embed)
    _apply(writers, bases, weights, norm_preserving)


def _check_untiable(model: nn.Module, embed: nn.Embedding) -> None:
    """An offloaded input embedding whose storage the output head shares cannot be untied (accelerate refills both
    from one offloaded tensor): refuse rather than edit the logits too."""
    out_emb = output_embeddings(model)
    if out_emb is None or embed.weight.device.type != "meta":
        return
    try:
        shared = resident_tensor(out_emb, "weight").data_ptr() == resident_tensor(embed, "weight").data_ptr()
    except RefusalError:
        shared = out_emb.weight is embed.weight
    if shared:
        raise RefusalError("The input embedding is tied to the output head and offloaded by accelerate, so "
                           "orthogonalization cannot untie them.",
                           "Load the model without offloading its embedding (more GPU memory or a device map that "
                           "keeps it on a GPU), or use hook-based ablation.")


@contextmanager
def orthogonalized(model: nn.Module, direction: DirectionLike, **options: Any) -> Iterator[nn.Module]:
    """:func:`orthogonalize_` for the duration of a block; the original weights (and tying) come back on exit.

    Only the residual writers are copied (not the whole model)."""
    parts = find_parts(model)
    writers = residual_writers(model)
    saved = [(w, w.data.clone(), None if b is None else (b, b.data.clone())) for w, b in _resident(writers)]
    out_emb = output_embeddings(model)
    tied_head = out_emb if out_emb is not None and out_emb.weight is parts.embed.weight else None
    cfgs = {id(c): c for c in (model.config, _text_config(model))}.values()
    tie_cfg = [(c, c.tie_word_embeddings) for c in cfgs if hasattr(c, "tie_word_embeddings")]
    try:
        orthogonalize_(model, direction, **options)
        yield model
    finally:
        with torch.no_grad():
            for p, w, bias in saved:
                p.data.copy_(w)
                if bias is not None:
                    bias[0].data.copy_(bias[1])
        if tied_head is not None:
            tied_head.weight = parts.embed.weight
        for c, v in tie_cfg:
            c.tie_word_embeddings = v
