"""The attention of one new token over a static KV cache as one Triton kernel per layer.

:func:`~refusal.generation.attention.gqa_attention` runs decoding attention as three kernels (QK^T, softmax, PV)
that read every slot of the cache, written or not. This kernel visits, for each row and K/V head, only the blocks of
the span up to the row's last visible position (its loop ends there), with that head's query heads grouped (one K/V
read serves them) and an online softmax, in one launch: slots past a row's span are never read, and no
``(batch, heads, positions)`` score tensor is written between kernels. ``benchmarks/kernels/decode_attention.py``
times it against ``gqa_attention`` and against a kernel that only reads the same K/V; its measurements, and the
variants that did not pay (flash-decoding splits, one program per query head, K loaded transposed, extra programs
bringing the next GEMM's weight into L2, programmatic dependent launch), are in ``docs/changelog.md``.

It is a ``torch.library`` op with a fake version, so ``torch.compile`` keeps it inside a compiled step and CUDA
graphs capture it. The static decoder asks for it through the ``refusal_kernel`` keyword argument of the model's
forward (transformers hands it to the attention function); :func:`why_not` says when it cannot run. On a CPU it runs
only in Triton's interpreter (``TRITON_INTERPRET=1``, for tests). The Triton code itself is in
:mod:`refusal.generation._triton_decode`.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from triton.runtime.jit import JITFunction

KERNEL = "refusal_kernel"  # keyword argument of the forward: decode attention with this kernel
# the launch configuration (positions per block, warps, pipeline stages): the fastest of
# benchmarks/kernels/decode_attention.py's sweep at the 8B decode shape
BLOCK_T, NUM_WARPS, NUM_STAGES = 32, 2, 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def why_not(device: torch.device) -> str | None:
    """Why the kernel cannot decode on ``device`` (None when it can)."""
    if device.type != "cuda" and not interpreting():
        return f"it runs on CUDA devices, not {device.type}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (a CUDA build of torch on Linux brings it)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "it needs a GPU of compute capability 8.0 or later (bfloat16 tensor cores)"
    return None


@cache
def _kernel() -> tuple[ModuleType, JITFunction]:
    """Triton and the jitted kernel (imported on first use; Triton's interpreter, if chosen, is chosen then)."""
    import triton

    from . import _triton_decode

    return triton, _triton_decode.decode_attention_kernel


def _launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask2d: torch.Tensor, scale: float,
            block: int = BLOCK_T, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    triton, kernel = _kernel()
    bsz, h, _, dim = query.shape
    hkv, total = key.shape[1], key.shape[2]
    g = h // hkv
    out = torch.empty(bsz, 1, h, dim, dtype=query.dtype, device=query.device)  # (b, q, h, d), as transformers
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1 or mask2d.stride(-1) != 1:
        key, value, query, mask2d = key.contiguous(), value.contiguous(), query.contiguous(), mask2d.contiguous()
    strides = (*query.stride()[:2], *key.stride()[:3], *value.stride()[:3], mask2d.stride(0), out.stride(0),
               out.stride(2))
    # triton launches on the current device; a model spread over GPUs has layers on others
    with torch.cuda.device(query.device) if query.is_cuda else nullcontext():
        kernel[(bsz, hkv)](query, key, value, mask2d, out, *strides, scale, T=total, TP=triton.next_power_of_2(total),
                           G=g, GP=max(16, triton.next_power_of_2(g)), D=dim, DP=max(16, triton.next_power_of_2(dim)),
                           BLOCK=block,
                           # float32 models: full-precision products, as torch's matmul (not TF32)
                           PRECISION="ieee" if query.dtype == torch.float32 else None,
                           num_warps=num_warps, num_stages=num_stages)
    return out


# an opaque op: torch.compile calls it as it is (its fake version gives the output's shape), CUDA graphs capture it
@torch.library.custom_op("refusal::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask2d: torch.Tensor,
                         scale: float) -> torch.Tensor:
    return _launch(query, key, value, mask2d, scale)


@_decode_attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask2d: torch.Tensor, scale: float) -> torch.Tensor:
    bsz, h, _, dim = query.shape
    return query.new_empty(bsz, 1, h, dim)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask2d: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of one query position: ``query (b, h, 1, d)``, ``key``/``value (b, hkv, T, d)`` (``h`` a multiple
    of ``hkv``), ``mask2d (b, T)`` boolean (True = visible); returns ``(b, 1, h, d)`` as transformers' attention
    functions do. A row with no visible position gets zeros."""
    if mask2d.dtype != torch.bool:
        raise TypeError(f"decode_attention takes a boolean mask, not {mask2d.dtype}")
    return _decode_attention_op(query, key, value, mask2d, float(scale))
