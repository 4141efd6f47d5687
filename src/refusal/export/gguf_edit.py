"""Edit a GGUF file: :func:`edit_gguf` bakes the ablation into the residual writers of a copy
and copies everything else as it is (the path :func:`~refusal.export.gguf.export_gguf` takes when the model came
as a GGUF file).

Reads the file with ``gguf.GGUFReader`` and writes a copy in which only the residual writers are edited:
``token_embd.weight`` and, per block, ``attn_output``, ``ffn_down``, ``ffn_down_exps`` (all experts),
``ffn_down_shexp`` (shared expert) weights and biases. Every other tensor is copied byte for byte, still
quantized, and every metadata key/value is copied, so the output is about the input's size. An edited tensor is
dequantized (``gguf.quants.dequantize``), edited in float32 and written back in its own type when ``gguf.quants``
can quantize it (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, ...), else as Q8_0 (K- and I-quants, which
gguf-py can only dequantize), or F16 where a row is not a multiple of 32.

Layout: a GGUF tensor lists its dimensions fastest first (``ne``); gguf-py hands it over as a numpy array in
the reversed, PyTorch order, which is exactly the layout transformers loads: ``token_embd`` is
``(vocab, hidden)`` (residual axis last), ``attn_output`` / ``ffn_down`` ``(hidden, in)`` and ``ffn_down_exps``
``(n_experts, hidden, in)`` (residual axis second to last). The size of that axis is checked against
``{arch}.embedding_length`` for every tensor.

A tied output head (no ``output.weight``) would see the edited embedding; the untouched embedding is then
added as ``output.weight`` (raw bytes, same type), which llama.cpp and transformers read as an untied head.
llama.cpp's Gemma architectures always take the head from ``token_embd``; there the embedding is left unedited
(reported in :attr:`~.gguf_write.GGUFExport.skipped`) unless ``edit_embedding=True``, which is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import RefusalError
from ..interventions.weights import _check_weights, edit_matrix, prepare_bases
from .gguf_quant import _can_quantize, _fits, _planned
from .gguf_write import GGUFExport, _check_out, _Tensor, _write

if TYPE_CHECKING:
    import gguf

    from ..interventions.weights import DirectionLike

_BLOCK_WRITER = re.compile(r"^blk\.(\d+)\.(attn_output|ffn_down|ffn_down_exps|ffn_down_shexp)\.(weight|bias)$")
# tensors of llama.cpp architectures that also write to the residual stream and that this edit does not cover
_OTHER_WRITERS = ("ssm_out", "time_mix_output", "channel_mix_value", "shortconv.out_proj", "per_layer_proj",
                  "altup", "laurel", "ffn_down_chexp")
# llama.cpp architectures whose output head is always token_embd (an output.weight tensor would be rejected)
_HEAD_IS_EMBEDDING = re.compile(r"^gemma")


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _edited_type(orig: gguf.GGMLQuantizationType, shape: tuple[int, ...], edited_type: str
                 ) -> gguf.GGMLQuantizationType:
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    if edited_type == "f32":
        return Q.F32
    if edited_type == "f16":
        return Q.F16
    if edited_type == "q8_0":
        return Q.Q8_0 if _fits(shape, Q.Q8_0) else Q.F16
    if edited_type != "auto":
        raise RefusalError(f"Unknown type '{edited_type}' for edited tensors.", "Use auto, f32, f16 or q8_0.")
    if orig in (Q.F32, Q.F16):
        return orig
    if _can_quantize(orig) and _fits(shape, orig):
        return orig
    return Q.Q8_0 if _fits(shape, Q.Q8_0) else Q.F16


def _open(src: Path, out: Path, overwrite: bool) -> gguf.GGUFReader:
    """The reader of ``src``, after checking that ``out`` may be written and is not ``src``."""
    import gguf

    if not src.is_file():
        raise RefusalError(f"The GGUF file '{src}' does not exist.", "Check the path.")
    _check_out(out, overwrite)
    if out.resolve() == src.resolve():
        raise RefusalError("The output GGUF would replace its own input.", "Write to another path.")
    try:
        return gguf.GGUFReader(src, "r")
    except Exception as exc:  # noqa: BLE001 -- gguf-py raises many types for a bad file
        raise RefusalError(f"'{src}' cannot be read as GGUF ({type(exc).__name__}: {exc}).",
                           "Check that the file is a complete GGUF model.") from None


def _dimensions(reader: gguf.GGUFReader, src: Path) -> tuple[str, int, int]:
    """``(architecture, hidden size, layer count)`` from the metadata; a split file or a non-decoder is refused."""
    arch = _field(reader, "general.architecture")
    if (_field(reader, "split.count") or 1) > 1:
        raise RefusalError(f"'{src}' is one part of a split GGUF.",
                           "Merge the parts first (llama-gguf-split --merge) and export from the merged file.")
    hidden = _field(reader, f"{arch}.embedding_length")
    n_layers = _field(reader, f"{arch}.block_count")
    if hidden is None or n_layers is None:
        raise RefusalError(f"'{src}' (architecture '{arch}') does not state its hidden size and layer count.",
                           "Only decoder language models can be edited.")
    return arch, int(hidden), int(n_layers)


def _check_blocks(arch: str, by_name: dict, n_layers: int) -> None:
    """Refuse residual writers the edit does not cover, and blocks without attn_output / ffn_down."""
    others = sorted(n for n in by_name if any(f".{o}" in n for o in _OTHER_WRITERS))
    if others:
        raise RefusalError(
            f"The GGUF architecture '{arch}' has residual writers this edit does not cover ({', '.join(others[:4])}"
            f"{', ...' if len(others) > 4 else ''}).",
            "Use hook-based ablation, or export a Hugging Face folder with `refusal abliterate` instead.")
    missing = [i for i in range(n_layers)
               if f"blk.{i}.attn_output.weight" not in by_name
               or not any(f"blk.{i}.{k}.weight" in by_name for k in ("ffn_down", "ffn_down_exps"))]
    if missing:
        raise RefusalError(
            f"The GGUF architecture '{arch}' has blocks without attn_output / ffn_down tensors (blocks "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}); this edit covers standard attention + MLP blocks "
            "only.", "Export a Hugging Face folder with `refusal abliterate` instead.")


def _edits_embedding(arch: str, by_name: dict, weights: Sequence[float], edit_embedding: bool | None,
                     result: GGUFExport) -> bool:
    """Whether ``token_embd.weight`` is edited (a skip is recorded in ``result``; see :func:`edit_gguf`)."""
    tied = "output.weight" not in by_name
    emb = by_name.get("token_embd.weight")
    do_emb = emb is not None and weights[0] != 0.0
    if do_emb and tied and _HEAD_IS_EMBEDDING.match(str(arch)):
        if edit_embedding:
            raise RefusalError(
                f"llama.cpp's '{arch}' architecture always uses token_embd as the output head, so the embedding "
                "cannot be edited without changing the logits.", "Leave edit_embedding unset (or False).")
        do_emb = False
        result.skipped["token_embd.weight"] = (f"architecture '{arch}' shares it with the output head, which must "
                                               "stay unedited")
    elif edit_embedding is False:
        do_emb = False
        if emb is not None:
            result.skipped["token_embd.weight"] = "edit_embedding=False"
    return do_emb


def _plan(by_name: dict, n_layers: int, weights: Sequence[float], do_emb: bool) -> dict[str, tuple[int, int]]:
    """``{tensor name: (residual axis, layer)}`` of every tensor to edit."""
    plan: dict[str, tuple[int, int]] = {}
    if do_emb:
        plan["token_embd.weight"] = (-1, 0)
    for name in by_name:
        m = _BLOCK_WRITER.match(name)
        if m and int(m.group(1)) < n_layers and weights[int(m.group(1))] != 0.0:
            plan[name] = (-1 if m.group(3) == "bias" else -2, int(m.group(1)))
    return plan


def _raw(t: gguf.ReaderTensor, reader: gguf.GGUFReader) -> _Tensor:
    """Tensor ``t`` copied byte for byte (still quantized)."""
    return _Tensor(t.name, tuple(t.data.shape), t.data.dtype, int(t.data.nbytes), t.tensor_type,
                   lambda: t.data, reader.endianess)


@dataclass
class _Edit:
    """What edits one tensor: the bases and weights per layer, and how the result is stored."""

    bases: list
    weights: Sequence[float]
    hidden: int
    norm_preserving: bool
    edited_type: str
    result: GGUFExport

    def tensor(self, t: gguf.ReaderTensor, axis: int, layer: int) -> _Tensor:
        """Tensor ``t`` dequantized, ablated along its residual ``axis`` with ``layer``'s basis, requantized when
        written (recorded in ``result.edited``)."""
        import gguf
        from gguf.quants import _type_traits, dequantize

        hidden = self.hidden
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ne is fastest-first; numpy order reversed
        if len(shape) == 0 or shape[axis] != hidden:
            raise RefusalError(f"The tensor {t.name} has shape {shape} (numpy order), whose residual axis is not the "
                               f"hidden size {hidden}.", "This GGUF layout is not supported; please open an issue.")
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                and t.tensor_type not in _type_traits:
            raise RefusalError(f"The tensor {t.name} is stored as {t.tensor_type.name}, which gguf-py cannot "
                               "dequantize, so it cannot be edited.",
                               "Start from a GGUF in another quantization, or from the Hugging Face model.")
        qtype = _edited_type(t.tensor_type, shape, self.edited_type)
        bases, weights, norm_preserving = self.bases, self.weights, self.norm_preserving

        def produce() -> np.ndarray:
            x = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
            x = x.reshape(shape)
            y = edit_matrix(x, bases[layer], axis, scale=weights[layer],
                            norm_preserving=norm_preserving and x.ndim > 1)
            return y.numpy()

        self.result.edited[t.name] = qtype.name
        return _planned(t.name, shape, qtype, produce)


def _tensors(reader: gguf.GGUFReader, plan: dict[str, tuple[int, int]], edit: _Edit,
             untied_head: bool) -> list[_Tensor]:
    """Every tensor of the output in the input's order: planned ones edited, the others raw; with
    ``untied_head``, the untouched embedding added as ``output.weight`` after ``token_embd.weight``."""
    tensors = []
    for t in reader.tensors:
        tensors.append(edit.tensor(t, *plan[t.name]) if t.name in plan else _raw(t, reader))
        if t.name == "token_embd.weight" and untied_head:
            copy = _raw(t, reader)
            copy.name = "output.weight"
            tensors.append(copy)
            edit.result.added.append("output.weight")
    return tensors


def _metadata_writer(reader: gguf.GGUFReader) -> Callable[[gguf.GGUFWriter], None]:
    """A function copying every metadata key/value of ``reader`` (but the architecture) to a ``GGUFWriter``."""
    import gguf

    skip = {"general.architecture"}

    def kv(w: gguf.GGUFWriter) -> None:
        for f in reader.fields.values():
            if f.name.startswith("GGUF.") or f.name in skip:
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)

    return kv


def edit_gguf(
    src: str | Path,
    direction: DirectionLike,
    out: str | Path,
    *,
    overwrite: bool = False,
    norm_preserving: bool = False,
    orthogonal_to_harmless: torch.Tensor | None = None,
    layer_weights: Sequence[float] | None = None,
    edited_type: str = "auto",
    edit_embedding: bool | None = None,
) -> GGUFExport:
    """Write a copy of the GGUF file ``src`` at ``out`` with the ablation of ``direction`` baked into its residual
    writers (see the module doc). Untouched tensors are copied byte for byte, all metadata is kept.

    ``edited_type``: ``auto`` (the tensor's own type where gguf-py can write it, else Q8_0), ``f32``, ``f16`` or
    ``q8_0``. ``edit_embedding``: None = edit ``token_embd`` unless the architecture always ties it to the output
    head (then it is skipped and reported); True = edit it or raise; False = leave it."""
    src, out = Path(src), Path(out)
    reader = _open(src, out, overwrite)
    arch, hidden, n_layers = _dimensions(reader, src)
    bases = prepare_bases(direction, hidden, n_layers, orthogonal_to_harmless)
    weights = _check_weights(layer_weights, n_layers)

    by_name = {t.name: t for t in reader.tensors}
    _check_blocks(arch, by_name, n_layers)
    result = GGUFExport(out)
    tied = "output.weight" not in by_name
    do_emb = _edits_embedding(arch, by_name, weights, edit_embedding, result)
    plan = _plan(by_name, n_layers, weights, do_emb)
    edit = _Edit(bases, weights, hidden, norm_preserving, edited_type, result)
    tensors = _tensors(reader, plan, edit, untied_head=do_emb and tied)
    _write(out, str(arch), _metadata_writer(reader), tensors, reader.endianess, _field(reader, "general.alignment"))
    return result
