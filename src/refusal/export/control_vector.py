"""Write a direction as a llama.cpp control vector (``--control-vector FILE.gguf``).

llama.cpp's convention (``common/common.cpp: common_control_vector_load_one``, ``src/llama-adapter.cpp``, and every
model graph's ``build_cvec(cur, il)``): a control-vector GGUF has ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (the model's llama.cpp architecture) and ``controlvector.layer_count``, and one F32
tensor ``direction.N`` of ``n_embd`` values per layer, ``N >= 1`` (``direction.0`` is rejected). The vector named
``N`` is added to every position of the **output of block N** (0-based, after the block's MLP residual add), i.e. to
the input of block ``N + 1``; llama.cpp never adds anything to the output of block 0 or to the embedding.

refusal's activation addition adds ``coeff · v`` at the **input of layer L** (0-based), which is the output of block
``L − 1``: it is written as ``direction.(L−1)``. So layers 2 .. n_layers−1 can be expressed; layer 0 (the
embedding output) and layer 1 (the output of block 0) cannot, and are refused. Like llama.cpp's
``cvector-generator``, the file holds ``direction.1`` .. ``direction.(n_layers−1)`` (zeros except the chosen layer)
and ``layer_count = n_layers − 1``.

Only additive interventions can be expressed this way: directional ablation subtracts each activation's own
component along the direction, which no fixed vector can do. Ablation is baked into the weights instead
(``refusal abliterate``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import io
from ..errors import RefusalError

if TYPE_CHECKING:
    from ..directions.base import Direction

__all__ = ["control_vector_tensors", "llama_cpp_index", "write_control_vector"]

_ADDITIVE = ("add", "addition", "actadd", "activation_addition")
_ABLATIVE = ("ablate", "ablation", "abliterate", "abliteration", "project", "project_out", "orthogonalize",
             "directional_ablation")


def llama_cpp_index(layer: int, n_layers: int) -> int:
    """The ``N`` of ``direction.N`` that adds at the input of refusal's layer ``layer`` (= output of block
    ``layer − 1``). Raises :class:`RefusalError` for the layers llama.cpp cannot steer."""
    if not 0 <= layer < n_layers:
        raise RefusalError(f"Layer {layer} is outside the model's {n_layers} layers.", "Use a layer of this model.")
    if layer == 0:
        raise RefusalError(
            "A vector added at the input of layer 0 (the embedding output) cannot be expressed as a llama.cpp control "
            "vector: llama.cpp adds control vectors only after a block (direction.N after block N).",
            "Use a direction from a later layer (2 or more).")
    if layer == 1:
        raise RefusalError(
            "A vector added at the input of layer 1 (the output of block 0) cannot be expressed as a llama.cpp "
            "control vector: llama.cpp never applies one after block 0 (it rejects direction.0).",
            "Use a direction from a later layer (2 or more).")
    return layer - 1


def _vector(direction: torch.Tensor | Direction) -> tuple[torch.Tensor, int | None]:
    if hasattr(direction, "vectors") and not isinstance(direction, torch.Tensor):  # a Direction
        v = direction.vectors
        if v.ndim != 2 or v.shape[0] != 1:
            raise RefusalError(f"A control vector holds one vector per layer; this direction is a basis of shape "
                               f"{tuple(v.shape)}.", "Use a single direction (k = 1).")
        return v[0].float(), direction.layer
    v = torch.as_tensor(direction).detach().float()
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1:
        raise RefusalError(f"A control vector needs one (d,) vector; got shape {tuple(v.shape)}.",
                           "Use a single direction.")
    return v, None


def control_vector_tensors(direction: torch.Tensor | Direction, n_layers: int, *, layer: int | None = None,
                           coeff: float = 1.0, intervention: str = "add") -> dict[str, np.ndarray]:
    """``{"direction.N": float32 (d,)}`` for N = 1 .. n_layers−1: ``coeff · v`` at the index that adds at the input
    of ``layer`` (default: the direction's own layer), zeros elsewhere."""
    kind = intervention.lower().replace("-", "_")
    if kind in _ABLATIVE:
        raise RefusalError(
            "Directional ablation cannot be written as a llama.cpp control vector: a control vector adds one fixed "
            "vector, while ablation removes each activation's own component along the direction. Only additive "
            "interventions (activation addition) can be expressed.",
            "Bake the ablation into the weights instead: `refusal abliterate RUN_DIR --out DIR` (add --gguf for a "
            "GGUF file).")
    if kind not in _ADDITIVE:
        raise RefusalError(f"Unknown intervention '{intervention}' for a control vector.",
                           "Use 'add' (activation addition), the only kind a control vector expresses.")
    v, own_layer = _vector(direction)
    layer = own_layer if layer is None else layer
    if layer is None:
        raise RefusalError("The direction has no layer to add it at.", "Pass layer=...")
    if not torch.isfinite(v).all():
        raise RefusalError("The direction holds NaN or infinite values.", "Recompute it.")
    idx = llama_cpp_index(int(layer), n_layers)
    d = v.numel()
    out = {f"direction.{n}": np.zeros(d, dtype=np.float32) for n in range(1, n_layers)}
    out[f"direction.{idx}"] = (float(coeff) * v).cpu().numpy().astype(np.float32)
    return out


def write_control_vector(direction: torch.Tensor | Direction, out: str | Path, *, n_layers: int, model_hint: str,
                         layer: int | None = None, coeff: float = 1.0, hidden_size: int | None = None,
                         intervention: str = "add", overwrite: bool = False) -> Path:
    """Write ``coeff · v``, added at the input of ``layer`` (default: the direction's layer), as a llama.cpp
    control-vector GGUF at ``out`` (atomically). ``model_hint`` is the model's llama.cpp architecture (``qwen2``,
    ``llama``, ...). Use it with ``llama-cli -m MODEL.gguf --control-vector out.gguf`` (or
    ``--control-vector-scaled out.gguf S`` to scale it again)."""
    import gguf

    out = Path(out)
    if out.exists() and not overwrite:
        raise RefusalError(f"'{out}' already exists.", "Pass overwrite=True (--overwrite) or choose another path.")
    tensors = control_vector_tensors(direction, n_layers, layer=layer, coeff=coeff, intervention=intervention)
    d = next(iter(tensors.values())).shape[0]
    if hidden_size is not None and d != hidden_size:
        raise RefusalError(f"The direction has size {d} but the model's hidden size is {hidden_size}: it comes from "
                           "another model.", "Use a direction extracted from this model.")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "controlvector")
        w.add_string("controlvector.model_hint", model_hint)
        w.add_int32("controlvector.layer_count", len(tensors))
        for name, arr in tensors.items():
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, io.FILE_MODE)  # mkstemp makes it 0600: the umask's permissions, as a plain open() gives
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
