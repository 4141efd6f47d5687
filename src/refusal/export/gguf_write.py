"""Writing a GGUF file: the :class:`GGUFExport` result both export paths return, the tensor plan (:class:`_Tensor`:
name, shape, type, size and a function that produces its data) and :func:`_write`, which streams a GGUF to a
temporary file next to the target, one tensor in memory at a time, and renames it into place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import io
from ..errors import RefusalError

if TYPE_CHECKING:
    import gguf


@dataclass
class GGUFExport:
    """What an export wrote: the file, the edited tensors and the type each was written in, tensors added
    (an untied ``output.weight``), and writers left alone with the reason."""

    path: Path
    edited: dict[str, str] = field(default_factory=dict)  # tensor -> GGML type written
    added: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy (PyTorch) order; bytes shape for quantized data
    np_dtype: Any
    nbytes: int
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]
    endianess: gguf.GGUFEndian | None = None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise RefusalError(f"'{out}' already exists.", "Pass overwrite=True (--overwrite) or choose another path.")
    if out.exists() and out.is_dir():
        raise RefusalError(f"'{out}' is a folder; a GGUF export is one file.", "Give a path ending in .gguf.")


def _write(out: Path, arch: str, kv: Callable[[gguf.GGUFWriter], None], tensors: list[_Tensor],
           endianess: gguf.GGUFEndian | None = None, alignment: int | None = None) -> None:
    """Stream a GGUF to a temporary file next to ``out`` (one tensor in memory at a time), then rename it."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch, endianess=endianess or gguf.GGUFEndian.LITTLE)
        kv(w)
        if alignment:
            w.data_alignment = int(alignment)
        for t in tensors:
            w.add_tensor_info(t.name, t.shape, t.np_dtype, t.nbytes, t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            arr = t.produce()
            if arr.nbytes != t.nbytes:
                raise AssertionError(f"{t.name}: {arr.nbytes} bytes, expected {t.nbytes}")
            w.write_tensor_data(arr, tensor_endianess=t.endianess)
        w.close()
        os.chmod(tmp, io.FILE_MODE)  # mkstemp makes it 0600: the umask's permissions, as a plain open() gives
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
