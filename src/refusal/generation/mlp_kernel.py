"""A gated MLP's gate and up projections and its activation·mul as one Triton kernel while decoding.

In a decode step the MLP's input is a few rows, its gate/up weights are read once, and the activation is applied by a
separate elementwise kernel to the GEMM's output, a launch of its own in every layer. Here one kernel computes both
products for a block of output columns side by side and applies the activation·mul before its one store: the
intermediate ``(rows, 2 x intermediate)`` tensor is never written, and the activation costs no launch
(``benchmarks/kernels/mlp_kernel.py`` times it against cuBLAS's gate/up GEMM + SiLU·mul; numbers in
``docs/changelog.md``).

:func:`gated_mlp_kernel` swaps it into every MLP that has ``gate_proj``/``up_proj``/``down_proj`` linears without
bias and for which a check on random input gives the same output as the module's own forward (to rounding) with
one of the kernel's activations, SiLU (Llama, Qwen, Mistral) or GELU with the tanh approximation (Gemma): no model
family is named; an MLP with another activation or another structure fails the check and keeps its forward. It
applies to inputs of at most ``max_rows`` rows (decode steps); a prefill runs the module's own forward. Hooks on the
MLP module run as before (the check calls the module's forward without them); an MLP whose ``gate_proj``/``up_proj``
carry hooks of their own is left alone (the kernel does not call them). Like the decoding attention it is a
``torch.library`` op that ``torch.compile`` keeps and CUDA graphs capture, and on a CPU it runs only in Triton's
interpreter (tests). The SiLU and GELU forms differ only in the elementwise epilogue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import cache
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .attention_kernel import interpreting

if TYPE_CHECKING:
    from triton.runtime.jit import JITFunction

# the launch configuration (BLOCK_N, BLOCK_K, num_warps, num_stages): the fastest of benchmarks/kernels/mlp_kernel.py's
# sweep at the 8B decode shape (64 rows); rows come in blocks of up to 64
CONFIG = (32, 64, 4, 3)
# bytes of tiles in flight the launch may plan for: below the shared memory of one SM of compute capability 8.0 and
# later (164 KB on 8.0, 227 KB on 9.0)
SHARED_MEMORY = 160_000
ACTIVATIONS = ("silu", "gelu_tanh")  # the kernel's ACT 0, 1; the check tries them in this order
# above this many rows (a prefill, a large decode batch: closer to compute-bound, where cuBLAS's larger tiles win, and
# not measured) the module's own forward runs
MAX_ROWS = 64


@cache
def _kernel() -> JITFunction:
    from . import _triton_decode

    return _triton_decode.gate_up_act_kernel


def _launch(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act: int = 0,
            config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    import triton

    block_n, block_k, warps, stages = config or CONFIG
    m, k = x.shape
    n = w_gate.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if w_gate.stride(-1) != 1 or w_up.stride(-1) != 1:
        raise ValueError("gate_up_act needs weights with contiguous rows")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    block_k, stages = _fit(block_m, 2 * block_n, block_k, stages, x.element_size())  # float32 tiles: twice the room
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _kernel()[grid](x, w_gate, w_up, out, m, x.stride(0), w_gate.stride(0), w_up.stride(0), out.stride(0), N=n,
                        K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                        PRECISION="ieee" if x.dtype == torch.float32 else None, ACT=act, num_warps=warps,
                        num_stages=stages)
    return out


def _fit(block_m: int, width: int, block_k: int, stages: int, elsize: int) -> tuple[int, int]:
    """Stages, then BLOCK_K, reduced until ``stages`` tiles of x and of ``width`` weight rows fit SHARED_MEMORY."""
    while stages > 2 and (block_m + width) * block_k * elsize * stages > SHARED_MEMORY:
        stages -= 1
    while block_k > 32 and (block_m + width) * block_k * elsize * stages > SHARED_MEMORY:
        block_k //= 2
    return block_k, stages


@torch.library.custom_op("refusal::gate_up_act", mutates_args=())
def _gate_up_act_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act: int) -> torch.Tensor:
    return _launch(x, w_gate, w_up, act)


@_gate_up_act_op.register_fake
def _(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], w_gate.shape[0])


def gate_up_act(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(x @ w_gate.T) * (x @ w_up.T)`` for ``x (rows, in)`` and weights ``(out, in)``, as one kernel;
    ``activation`` one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"gate_up_act has no activation {activation!r}; it has {', '.join(ACTIVATIONS)}")
    return _gate_up_act_op(x, w_gate, w_up, ACTIVATIONS.index(activation))


def _projections(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """A candidate's gate, up and down projections (:func:`_candidate` checked that they are ``nn.Linear``)."""
    return cast(nn.Linear, mlp.gate_proj), cast(nn.Linear, mlp.up_proj), cast(nn.Linear, mlp.down_proj)


def _forward(mlp: nn.Module, max_rows: int, activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    own = type(mlp).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > max_rows:
            return own(mlp, x)
        gate, up, down = _projections(mlp)
        h = gate_up_act(x.reshape(rows, x.shape[-1]), gate.weight, up.weight, activation)
        return down(h.view(*x.shape[:-1], h.shape[-1]))
    return forward


def _candidate(mlp: nn.Module) -> bool:
    found = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    lins = [m for m in found if isinstance(m, nn.Linear)]
    if len(lins) != len(found) or any(m.bias is not None for m in lins) or "forward" in vars(mlp):
        return False
    gate, up, _ = lins
    return (gate.weight.shape == up.weight.shape and gate.weight.dtype == up.weight.dtype
            and gate.weight.device == up.weight.device and gate.weight.device.type != "meta"
            and not any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in (gate, up)))


@torch.no_grad()
def _activation(mlp: nn.Module) -> str | None:
    """The one of :data:`ACTIVATIONS` with which the kernel's forward gives the module's output (to rounding) on
    random rows of varied scale; None if none does.

    The tolerance is taken per scale of input, relative to the largest output at that scale: at a large scale the
    activations all tend to the identity or to zero (SiLU and tanh-GELU differ by a few percent of the largest
    output), so a tolerance relative to the largest output over every scale let SiLU pass for Gemma's tanh-GELU in
    bf16 (benchmarks/fidelity/static_toggles.py found it). Of the activations that pass, the closest wins."""
    w = _projections(mlp)[0].weight
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, w.shape[1], generator=g) * torch.tensor([0.5, 2.0, 8.0])[None, :, None]
    x = x.to(device=w.device, dtype=w.dtype)
    try:
        want = mlp.forward(x)  # the module's own computation, without its hooks (an intervention's, per batch row)
    except Exception:  # noqa: BLE001 -- another signature: not a plain gated MLP
        return None
    if not isinstance(want, torch.Tensor) or want.shape != x.shape:
        return None
    # the module rounds the activation and the product once each, as the kernel does, but its GEMMs may sum in
    # another order: a few roundings of the intermediate, summed over its width by the down projection
    tol = 1e-4 if w.dtype == torch.float32 else 8 * torch.finfo(w.dtype).eps
    scale = want.float().abs().amax(dim=(0, 2), keepdim=True)  # per input scale (dimension 1)
    best: tuple[float, str] | None = None
    for activation in ACTIVATIONS:
        got = _forward(mlp, x.numel(), activation)(x)
        if got.shape != want.shape or got.dtype != want.dtype:
            continue
        err = float(((got.float() - want.float()).abs() / (scale + 1e-30)).amax())
        if err <= tol and (best is None or err < best[0]):
            best = (err, activation)
    return None if best is None else best[1]


@contextmanager
def gated_mlp_kernel(mlps: list[nn.Module], max_rows: int = MAX_ROWS) -> Iterator[int]:
    """Run each of ``mlps`` that is a gated MLP the kernel can compute (see the module's docstring) with the kernel for
    inputs of at most ``max_rows`` rows; yields how many; every forward is restored on exit. The caller checked that
    the kernel can run on their device (:func:`~refusal.generation.attention_kernel.why_not`)."""
    swapped = []
    for m in mlps:
        activation = _activation(m) if _candidate(m) and (_projections(m)[0].weight.is_cuda or interpreting()) else None
        if activation is not None:
            swapped.append((m, activation))
    try:
        for m, activation in swapped:
            m.forward = _forward(m, max_rows, activation)
        yield len(swapped)
    finally:
        for m, _ in swapped:
            m.__dict__.pop("forward", None)
