"""A decode step's linear layers (a few rows of input against a large weight) as one Triton kernel each.

cuBLAS runs the 8B decode step's down projection (``(64, 14336) @ (14336, 4096)``) as a split-K GEMM followed by a
reduction kernel of its own, and the lm_head at 3.9 TB/s. This kernel gives each program a block of output columns
and the whole of K (no partial sums, no second launch); ``benchmarks/gemm_decode.py`` times it against cuBLAS at
the step's shapes, with weights in HBM. :func:`decode_linears` swaps it, while decoding, into the ``nn.Linear``
modules without bias of the roles asked for (``o``: each attention block's output projection, ``down``: each MLP's,
``lm_head``: the output embedding), for inputs of at most ``max_rows`` rows. Only ``forward`` is replaced, so hooks
on those modules (an intervention's) still run around it. Like the other decoding kernels it is a ``torch.library``
op that ``torch.compile`` keeps and CUDA graphs capture, and on a CPU it runs only in Triton's interpreter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from ..models.parts import find_parts
from .attention_kernel import interpreting

ROLES = ("o", "down", "lm_head")
# launch configuration per role: (BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = {"o": (32, 128, 4, 4), "down": (32, 128, 4, 4), "lm_head": (128, 128, 4, 4)}
DEFAULT_ROLES = ("down", "lm_head")  # the roles a decoder swaps unless told otherwise
MAX_ROWS = 64
SHARED_MEMORY = 160_000  # as refusal.generation.mlp_kernel


@cache
def _kernel():
    from . import _triton_decode

    return _triton_decode.linear_kernel


def _launch(x: torch.Tensor, w: torch.Tensor, config=None, out: torch.Tensor | None = None) -> torch.Tensor:
    import triton

    from .mlp_kernel import _fit

    block_n, block_k, warps, stages = config or CONFIGS["down"]
    m, k = x.shape
    n = w.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if w.stride(-1) != 1:
        raise ValueError("the linear kernel needs a weight with contiguous rows")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    block_k, stages = _fit(block_m, block_n, block_k, stages, x.element_size())
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _kernel()[grid](x, w, out, m, x.stride(0), w.stride(0), out.stride(0), N=n, K=k, BLOCK_M=block_m,
                        BLOCK_N=block_n, BLOCK_K=block_k, PRECISION="ieee" if x.dtype == torch.float32 else None,
                        num_warps=warps, num_stages=stages)
    return out


@torch.library.custom_op("refusal::linear", mutates_args=())
def _linear_op(x: torch.Tensor, w: torch.Tensor, config: list[int]) -> torch.Tensor:
    return _launch(x, w, tuple(config))


@_linear_op.register_fake
def _(x, w, config):
    return x.new_empty(x.shape[0], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor, role: str = "down") -> torch.Tensor:
    """``x @ w.T`` for ``x (rows, in)`` and ``w (out, in)`` as one kernel, launched as :data:`CONFIGS` says for
    ``role``."""
    return _linear_op(x, w, list(CONFIGS[role]))


def _forward(m: nn.Linear, role: str, max_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > max_rows:
            return F.linear(x, m.weight)
        return linear(x.reshape(rows, x.shape[-1]), m.weight, role).view(*x.shape[:-1], m.weight.shape[0])
    return forward


def _modules(model: nn.Module, roles: Sequence[str]) -> list[tuple[str, nn.Module]]:
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"no linear role {', '.join(sorted(unknown))}; the roles are {', '.join(ROLES)}")
    parts = find_parts(model)
    found: list[tuple[str, nn.Module]] = []
    for role in roles:
        if role == "lm_head":
            found.append((role, model.get_output_embeddings()))
            continue
        for i in range(parts.n_layers):
            try:
                found.append((role, parts.attn_out_proj(i) if role == "o" else parts.mlp_out_proj(i)))
            except Exception:  # noqa: BLE001 -- a block without one Linear output projection keeps its forward
                continue
    return found


def _swappable(m: nn.Module) -> bool:
    return (isinstance(m, nn.Linear) and m.bias is None and "forward" not in vars(m) and not hasattr(m, "_hf_hook")
            and m.weight.device.type != "meta" and m.weight.stride(-1) == 1
            and (m.weight.is_cuda or interpreting()))


@contextmanager
def decode_linears(model: nn.Module, roles: Sequence[str] | None = None, max_rows: int = MAX_ROWS) -> Iterator[int]:
    """Run the ``nn.Linear`` modules of ``roles`` (see :data:`ROLES`; None: :data:`DEFAULT_ROLES`) that have no
    bias with the kernel for inputs of at most ``max_rows`` rows; yields how many; every forward is restored on
    exit. The caller checked that the kernel can run on their device
    (:func:`~refusal.generation.attention_kernel.why_not`)."""
    swapped, seen = [], set()
    for role, m in _modules(model, DEFAULT_ROLES if roles is None else roles):
        if _swappable(m) and id(m) not in seen:
            seen.add(id(m))
            swapped.append((role, m))
    try:
        for role, m in swapped:
            m.forward = _forward(m, role, max_rows)
        yield len(swapped)
    finally:
        for _, m in swapped:
            m.__dict__.pop("forward", None)
