"""Export an abliterated model as GGUF (llama.cpp, Ollama, LM Studio, transformers with ``gguf_file=``).

Two paths:

:func:`edit_gguf` (the model came as a GGUF file; :mod:`.gguf_edit`)
    Writes a copy in which only the residual writers are edited (``token_embd`` and, per block, ``attn_output``,
    ``ffn_down``, ``ffn_down_exps``, ``ffn_down_shexp``); every other tensor is copied byte for byte, still
    quantized, and every metadata key/value is copied. Edited tensors are written back in their own type where
    gguf-py can quantize it, else as Q8_0 or F16 (:mod:`.gguf_quant`).

:func:`write_gguf` (a plain Hugging Face model; :mod:`.gguf_from_hf`)
    Writes llama and qwen2 models (and their fine-tunes) with a byte-level BPE tokenizer (:mod:`.gguf_tokenizer`).
    Other architectures are refused with a :class:`RefusalError` that names them; export a Hugging Face folder and
    use llama.cpp's converter for those.

Both stream the file through :mod:`.gguf_write` and return a :class:`GGUFExport`. :func:`export_gguf` (here) picks
the path and bakes the ablation in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..interventions.weights import EditOptions, _check_weights, orthogonalized, prepare_bases
from .gguf_edit import edit_gguf
from .gguf_from_hf import _hf_arch, write_gguf
from .gguf_write import GGUFExport, _check_out

if TYPE_CHECKING:
    from ..interventions.weights import DirectionLike

__all__ = ["GGUFExport", "edit_gguf", "export_gguf", "write_gguf"]


def export_gguf(
    model: Any,
    tokenizer: Any,
    direction: DirectionLike,
    out: str | Path,
    *,
    source_gguf: str | Path | None = None,
    overwrite: bool = False,
    norm_preserving: bool = False,
    orthogonal_to_harmless: torch.Tensor | None = None,
    layer_weights: Sequence[float] | None = None,
    dtype: str = "auto",
) -> GGUFExport:
    """Write the abliterated model as GGUF at ``out``.

    With ``source_gguf`` (the file the model was loaded from) the file is edited directly (:func:`edit_gguf`,
    quantization kept; ``model`` and ``tokenizer`` may be None); else the Hugging Face ``model`` is orthogonalized
    for the duration of the write and written with :func:`write_gguf` (llama / qwen2). ``dtype`` is the type of the
    edited tensors (:func:`edit_gguf`'s ``edited_type``) or of all matrices (:func:`write_gguf`)."""
    options: EditOptions = {"norm_preserving": norm_preserving, "orthogonal_to_harmless": orthogonal_to_harmless,
               "layer_weights": layer_weights}
    if source_gguf is not None:
        return edit_gguf(source_gguf, direction, out, overwrite=overwrite, edited_type=dtype, **options)
    from ..models.parts import find_parts

    _check_out(Path(out), overwrite)
    _hf_arch(model)
    parts = find_parts(model)
    prepare_bases(direction, parts.hidden_size, parts.n_layers, orthogonal_to_harmless)
    _check_weights(layer_weights, parts.n_layers)
    with orthogonalized(model, direction, **options):
        return write_gguf(model, tokenizer, out, overwrite=overwrite, dtype=dtype)
