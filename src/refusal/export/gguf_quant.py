"""Requantization for GGUF writing: which GGML types gguf-py can write (many it can only read), whether a row fits
a type's block size, and encoding float32 data in a type (:func:`_planned` makes the :class:`_Tensor` for it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .gguf_write import _Tensor

if TYPE_CHECKING:
    import gguf

_QUANTIZABLE: dict[gguf.GGMLQuantizationType, bool] = {}


def _can_quantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether gguf-py can write ``qtype`` (many types it can only read)."""
    import gguf
    from gguf.quants import quantize

    if qtype not in _QUANTIZABLE:
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        try:
            quantize(np.zeros((1, block * 8), dtype=np.float32), qtype)
            _QUANTIZABLE[qtype] = True
        except (NotImplementedError, Exception):  # noqa: BLE001 -- any failure means "cannot write this type"
            _QUANTIZABLE[qtype] = False
    return _QUANTIZABLE[qtype]


def _encode(arr: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    import gguf
    from gguf.quants import quantize

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return np.ascontiguousarray(quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype))


def _planned(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType,
             produce: Callable[[], np.ndarray]) -> _Tensor:
    """A tensor of float ``shape`` (numpy order) to be written as ``qtype``; ``produce`` returns float32."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    if qtype == gguf.GGMLQuantizationType.F32:
        return _Tensor(name, shape, np.float32, 4 * math.prod(shape), qtype, lambda: _encode(produce(), qtype))
    if qtype == gguf.GGMLQuantizationType.F16:
        return _Tensor(name, shape, np.float16, 2 * math.prod(shape), qtype, lambda: _encode(produce(), qtype))
    bshape = tuple(quant_shape_to_byte_shape(shape, qtype))
    return _Tensor(name, bshape, np.uint8, math.prod(bshape), qtype, lambda: _encode(produce(), qtype))


def _fits(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> bool:
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return shape[-1] % block == 0
