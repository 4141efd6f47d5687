"""Fused RMS norms: run each norm as one kernel where a check shows the same output."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn


def _eps(module: nn.Module) -> Any:  # the module's epsilon attribute, whatever it holds
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def _weight(module: nn.Module) -> torch.Tensor:
    """A candidate norm's weight (:func:`fused_norms` checked that it is a tensor)."""
    return cast(torch.Tensor, module.weight)


def _rms_norm_forward(module: nn.Module, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    shape = tuple(_weight(module).shape)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(hidden_states, shape, _weight(module), eps)
    return forward


@torch.no_grad()
def _same_as_rms_norm(module: nn.Module, eps: float) -> bool:
    """Whether ``module`` computes ``rms_norm(x) * weight`` (normalised in float32, rounded to the input's dtype, then
    scaled), checked on random inputs with a non-zero mean and spread-out scales."""
    w = _weight(module)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(3, 5, w.shape[0], generator=g) * torch.tensor([0.5, 4.0, 60.0])[:, None, None] + 1.0)
    x = x.to(device=w.device, dtype=w.dtype)
    try:
        want = module.forward(x)  # its own computation, without hooks (side effects on a random input)
    except Exception:  # noqa: BLE001 -- a module with another signature is simply not a plain norm
        return False
    got = _rms_norm_forward(module, eps)(x)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        return False
    tol = 1e-5 if w.dtype == torch.float32 else 2 * torch.finfo(w.dtype).eps  # two roundings either way
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max())))


@contextmanager
def fused_norms(model: nn.Module) -> Iterator[int]:
    """Run the model's RMS norms as torch's one-kernel ``rms_norm`` instead of its several elementwise kernels, for
    each norm where a check on random input shows the same output (to rounding); others are left alone. Yields the
    number replaced; everything is restored on exit.

    No model family is named: a candidate is any module with a 1-D ``weight``, no ``bias`` and an ``eps`` or
    ``variance_epsilon``; the check rejects LayerNorms, Gemma's ``(1 + weight)`` and anything else."""
    swapped = []
    if hasattr(torch.nn.functional, "rms_norm"):
        for m in model.modules():
            w, eps = getattr(m, "weight", None), _eps(m)
            if (not isinstance(w, torch.Tensor) or w.ndim != 1 or getattr(m, "bias", None) is not None
                    or not isinstance(eps, float) or "forward" in m.__dict__):  # accelerate keeps its wrapper there
                continue
            if _same_as_rms_norm(m, eps):
                swapped.append(m)
    try:
        for m in swapped:
            m.forward = _rms_norm_forward(m, _eps(m))
        yield len(swapped)
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)


def with_fused_norms(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn(model, ...)`` under :func:`fused_norms`."""
    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with fused_norms(model):
            return fn(model, *args, **kwargs)
    return wrapper
