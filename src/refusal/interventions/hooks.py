"""Interventions on a plain Hugging Face model, as composable context managers.

>>> with ablate(model, direction):            # remove the direction everywhere in the residual stream
...     model.generate(...)
>>> with add(model, direction, layer=12, coeff=-1.0):   # activation subtraction at one layer
...     model(...)

Hooks are installed on entry and always removed on exit, even on error; several interventions nest.
A direction of shape ``(d,)`` is one direction; ``(k, d)`` is a subspace (orthonormalised here). With
``per_row=True`` the tensor is ``(batch, d)``: one direction per batch row, which lets many candidate directions be
scored in a single forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.parts import find_parts


def _basis(direction: torch.Tensor) -> torch.Tensor:
    d = direction.float()
    if d.ndim == 1:
        return (d / d.norm()).unsqueeze(0)
    q, _ = torch.linalg.qr(d.T)  # (d, k) orthonormal columns spanning the rows of `direction`
    return q.T.contiguous()


def project_out(x: torch.Tensor, basis: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """``x`` minus its component in the span of ``basis`` (rows orthonormal); per-row: one unit row per batch row.

    One direction costs two fused kernels (a dot product and a multiply-subtract), not a matmul with an inner
    dimension of one."""
    b = basis.to(x.dtype)
    if per_row:
        b = b[:, None, :] if x.ndim == 3 else b
    elif b.shape[0] == 1:
        b = b[0]
    else:
        return x - (x @ b.T) @ b
    return torch.addcmul(x, torch.linalg.vecdot(x, b).unsqueeze(-1), b, value=-1)


def _edit_output(output, fn):
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    return fn(output)


def _edit_input(args, kwargs, fn):
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs


@contextmanager
def _hooks(register: Iterable) -> Iterator[None]:
    handles = []
    try:
        for h in register:
            handles.append(h())
        yield
    finally:
        for h in handles:
            h.remove()


def _layer_list(n: int, layers: int | Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        return [layers]
    return list(layers)


@contextmanager
def ablate(model: nn.Module, direction: torch.Tensor, *, layers: Iterable[int] | None = None, per_row: bool = False):
    """Directional ablation: project the direction (or subspace) out of the residual stream.

    At every chosen layer (default: all) the hook acts on the layer's input and on the outputs of its attention and
    MLP blocks, so no component along the direction is written back into the residual stream.
    """
    parts = find_parts(model)
    dev = parts.embed.weight.device
    if per_row:
        d = direction.float()
        basis = (d / d.norm(dim=-1, keepdim=True)).to(dev)
    else:
        basis = _basis(direction).to(dev)
    cache: dict = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        b = cache.get(x.device)
        if b is None:
            b = cache[x.device] = basis.to(device=x.device, dtype=x.dtype)
        return project_out(x, b, per_row)

    regs = []
    for i in _layer_list(parts.n_layers, layers):
        regs.append(lambda m=parts.layers[i]: m.register_forward_pre_hook(
            lambda _m, a, k: _edit_input(a, k, fn), with_kwargs=True))
        for block in (parts.attn[i], parts.mlp[i]):
            regs.append(lambda m=block: m.register_forward_hook(lambda _m, _a, out: _edit_output(out, fn)))
    with _hooks(regs):
        yield


@contextmanager
def add(model: nn.Module, vector: torch.Tensor, layer: int, *, coeff: float = 1.0, per_row: bool = False):
    """Activation addition: add ``coeff * vector`` to the residual stream at the input of ``layer``, all positions.

    The vector is used as given (the difference in means, not normalised), as in Arditi et al.
    """
    parts = find_parts(model)
    v = (coeff * vector.float()).to(parts.embed.weight.device)
    if per_row:
        v = v[:, None, :]

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x + v.to(device=x.device, dtype=x.dtype)

    reg = lambda m=parts.layers[layer]: m.register_forward_pre_hook(  # noqa: E731
        lambda _m, a, k: _edit_input(a, k, fn), with_kwargs=True)
    with _hooks([reg]):
        yield
