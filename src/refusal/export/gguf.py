"""Export an abliterated model as GGUF (llama.cpp, Ollama, LM Studio, transformers with ``gguf_file=``).

Two paths:

:func:`edit_gguf` (the model came as a GGUF file)
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
    (reported in :attr:`GGUFExport.skipped`) unless ``edit_embedding=True``, which is refused.

:func:`write_gguf` (a plain Hugging Face model)
    Writes llama and qwen2 models (and their fine-tunes) with a byte-level BPE tokenizer: llama.cpp's metadata
    keys, tensor names from gguf-py's own name map, llama's Q/K rows permuted as llama.cpp's converter does, and
    the tokenizer (tokens, types, merges, special ids, chat template). Other architectures are refused with a
    :class:`RefusalError` that names them; export a Hugging Face folder and use llama.cpp's converter for those.

:func:`export_gguf` picks the path and bakes the ablation in.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RefusalError
from ..interventions.weights import _check_weights, edit_matrix, orthogonalized, prepare_bases

__all__ = ["GGUFExport", "edit_gguf", "export_gguf", "write_gguf"]

_BLOCK_WRITER = re.compile(r"^blk\.(\d+)\.(attn_output|ffn_down|ffn_down_exps|ffn_down_shexp)\.(weight|bias)$")
# tensors of llama.cpp architectures that also write to the residual stream and that this edit does not cover
_OTHER_WRITERS = ("ssm_out", "time_mix_output", "channel_mix_value", "shortconv.out_proj", "per_layer_proj",
                  "altup", "laurel", "ffn_down_chexp")
# llama.cpp architectures whose output head is always token_embd (an output.weight tensor would be rejected)
_HEAD_IS_EMBEDDING = re.compile(r"^gemma")
_HF_ARCHS = ("llama", "qwen2")


@dataclass
class GGUFExport:
    """What an export wrote: the file, the edited tensors and the type each was written in, tensors added
    (an untied ``output.weight``), and writers left alone with the reason."""

    path: Path
    edited: dict[str, str] = field(default_factory=dict)  # tensor -> GGML type written
    added: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


# ---- shared writing machinery ---------------------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy (PyTorch) order; bytes shape for quantized data
    np_dtype: Any
    nbytes: int
    qtype: Any  # gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]
    endianess: Any = None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise RefusalError(f"'{out}' already exists.", "Pass overwrite=True (--overwrite) or choose another path.")
    if out.exists() and out.is_dir():
        raise RefusalError(f"'{out}' is a folder; a GGUF export is one file.", "Give a path ending in .gguf.")


def _write(out: Path, arch: str, kv: Callable, tensors: list[_Tensor], endianess=None, alignment: int | None = None):
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
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_QUANTIZABLE: dict[Any, bool] = {}


def _can_quantize(qtype) -> bool:
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


def _encode(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf
    from gguf.quants import quantize

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return np.ascontiguousarray(quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype))


def _planned(name: str, shape: tuple[int, ...], qtype, produce: Callable[[], np.ndarray]) -> _Tensor:
    """A tensor of float ``shape`` (numpy order) to be written as ``qtype``; ``produce`` returns float32."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    if qtype == gguf.GGMLQuantizationType.F32:
        return _Tensor(name, shape, np.float32, 4 * math.prod(shape), qtype, lambda: _encode(produce(), qtype))
    if qtype == gguf.GGMLQuantizationType.F16:
        return _Tensor(name, shape, np.float16, 2 * math.prod(shape), qtype, lambda: _encode(produce(), qtype))
    bshape = tuple(quant_shape_to_byte_shape(shape, qtype))
    return _Tensor(name, bshape, np.uint8, math.prod(bshape), qtype, lambda: _encode(produce(), qtype))


def _fits(shape: Sequence[int], qtype) -> bool:
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return shape[-1] % block == 0


# ---- path (a): edit a GGUF file ---------------------------------------------------------------------------------


def _field(reader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _edited_type(orig, shape: tuple[int, ...], edited_type: str):
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


def edit_gguf(
    src: str | Path,
    direction,
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
    import gguf
    from gguf.quants import _type_traits, dequantize

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise RefusalError(f"The GGUF file '{src}' does not exist.", "Check the path.")
    _check_out(out, overwrite)
    if out.resolve() == src.resolve():
        raise RefusalError("The output GGUF would replace its own input.", "Write to another path.")
    try:
        reader = gguf.GGUFReader(src, "r")
    except Exception as exc:  # noqa: BLE001 -- gguf-py raises many types for a bad file
        raise RefusalError(f"'{src}' cannot be read as GGUF ({type(exc).__name__}: {exc}).",
                           "Check that the file is a complete GGUF model.") from None
    arch = _field(reader, "general.architecture")
    if (_field(reader, "split.count") or 1) > 1:
        raise RefusalError(f"'{src}' is one part of a split GGUF.",
                           "Merge the parts first (llama-gguf-split --merge) and export from the merged file.")
    hidden = _field(reader, f"{arch}.embedding_length")
    n_layers = _field(reader, f"{arch}.block_count")
    if hidden is None or n_layers is None:
        raise RefusalError(f"'{src}' (architecture '{arch}') does not state its hidden size and layer count.",
                           "Only decoder language models can be edited.")
    hidden, n_layers = int(hidden), int(n_layers)
    bases = prepare_bases(direction, hidden, n_layers, orthogonal_to_harmless)
    weights = _check_weights(layer_weights, n_layers)

    by_name = {t.name: t for t in reader.tensors}
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

    result = GGUFExport(out)
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

    plan: dict[str, tuple[int, int]] = {}  # name -> (residual axis, layer)
    if do_emb:
        plan["token_embd.weight"] = (-1, 0)
    for name in by_name:
        m = _BLOCK_WRITER.match(name)
        if m and int(m.group(1)) < n_layers and weights[int(m.group(1))] != 0.0:
            plan[name] = (-1 if m.group(3) == "bias" else -2, int(m.group(1)))

    def raw(t) -> _Tensor:
        return _Tensor(t.name, tuple(t.data.shape), t.data.dtype, int(t.data.nbytes), t.tensor_type,
                       lambda t=t: t.data, reader.endianess)

    def edited(t, axis: int, layer: int) -> _Tensor:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ne is fastest-first; numpy order reversed
        if len(shape) == 0 or shape[axis] != hidden:
            raise RefusalError(f"The tensor {t.name} has shape {shape} (numpy order), whose residual axis is not the "
                               f"hidden size {hidden}.", "This GGUF layout is not supported; please open an issue.")
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                and t.tensor_type not in _type_traits:
            raise RefusalError(f"The tensor {t.name} is stored as {t.tensor_type.name}, which gguf-py cannot "
                               "dequantize, so it cannot be edited.",
                               "Start from a GGUF in another quantization, or from the Hugging Face model.")
        qtype = _edited_type(t.tensor_type, shape, edited_type)

        def produce() -> np.ndarray:
            x = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
            x = x.reshape(shape)
            y = edit_matrix(x, bases[layer], axis, scale=weights[layer],
                            norm_preserving=norm_preserving and x.ndim > 1)
            return y.numpy()

        result.edited[t.name] = qtype.name
        return _planned(t.name, shape, qtype, produce)

    tensors = []
    for t in reader.tensors:
        tensors.append(edited(t, *plan[t.name]) if t.name in plan else raw(t))
        if t.name == "token_embd.weight" and do_emb and tied:
            copy = raw(t)
            copy.name = "output.weight"
            tensors.append(copy)
            result.added.append("output.weight")

    skip = {"general.architecture"}

    def kv(w) -> None:
        for f in reader.fields.values():
            if f.name.startswith("GGUF.") or f.name in skip:
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)

    _write(out, str(arch), kv, tensors, reader.endianess, _field(reader, "general.alignment"))
    return result


# ---- path (b): write a Hugging Face model ----------------------------------------------------------------------


def _hf_arch(model) -> str:
    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    if mt not in _HF_ARCHS:
        raise RefusalError(
            f"Writing GGUF from a Hugging Face model of architecture '{mt}' ({type(model).__name__}) is not "
            f"supported (supported: {', '.join(_HF_ARCHS)}).",
            "Start from the model's GGUF file (edited in place, quantization kept), or export a Hugging Face "
            "folder with `refusal abliterate RUN --out DIR` and convert it with llama.cpp's convert_hf_to_gguf.py.")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise RefusalError(f"This {mt} model uses the activation '{cfg.hidden_act}', which llama.cpp's {mt} does not.",
                           "Export a Hugging Face folder and convert it with llama.cpp's converter.")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise RefusalError(f"This model uses '{rope.get('rope_type') or rope.get('type')}' RoPE scaling, which this "
                           "writer does not handle.", "Export a Hugging Face folder and convert it with llama.cpp's "
                           "convert_hf_to_gguf.py.")
    if mt == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise RefusalError("This qwen2 model uses sliding-window attention, which this writer does not handle.",
                           "Export a Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py.")
    return mt


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _pre_tokenizer_name(spec: dict) -> str:
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers") or []
        split = [p for p in items if p.get("type") == "Split"]
        if len(split) == 1 and any(p.get("type") == "ByteLevel" for p in items):
            pattern = (split[0].get("pattern") or {}).get("Regex")
            try:
                from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
            except ImportError:  # older transformers: only the gpt-2 split is known here
                GGUF_PRE_TOKENIZER_SPLITS = {}  # noqa: N806
            for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
                if regex == pattern:
                    return name
    raise RefusalError("The tokenizer's pre-tokenizer is not one this GGUF writer can name for llama.cpp.",
                       "Export a Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py.")


def _tokenizer_kv(w, tokenizer, vocab_size: int) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RefusalError("The tokenizer is a slow (Python) tokenizer; the GGUF writer needs a fast one.",
                           "Load the model with its fast tokenizer (tokenizer.json).")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(decoder):
        raise RefusalError(
            f"The tokenizer is {model.get('type')} without a byte-level decoder; this GGUF writer handles byte-level "
            "BPE tokenizers (GPT-2, Llama 3, Qwen2 style) only.",
            "Export a Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py.")
    pre = _pre_tokenizer_name(spec)
    n = max(vocab_size, len(tokenizer))
    tokens: list[str | None] = [None] * n
    types = [int(gguf.TokenType.NORMAL)] * n
    for tok, i in model["vocab"].items():
        if i < n:
            tokens[i] = tok
    for t in spec.get("added_tokens") or []:
        if t["id"] < n:
            tokens[t["id"]] = t["content"]
            types[t["id"]] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    specials = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
                "pad": tokenizer.pad_token_id}
    for k, v in specials.items():
        if v is not None:
            getattr(w, f"add_{k}_token_id")(int(v))
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    w.add_add_bos_token(specials["bos"] is not None and ids[:1] == [specials["bos"]])
    w.add_add_eos_token(specials["eos"] is not None and ids[-1:] == [specials["eos"]] and len(ids) > 1)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)


def _permute(x: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's Q/K row order for its (interleaved) RoPE; transformers undoes it when loading a llama GGUF."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _hf_type(dtype: str, tensor: torch.Tensor, shape: tuple[int, ...]):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    if dtype == "auto":
        dtype = {torch.float16: "f16", torch.bfloat16: "bf16"}.get(tensor.dtype, "f32")
    table = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
    if dtype not in table:
        raise RefusalError(f"Unknown GGUF type '{dtype}'.", "Use auto, f32, f16, bf16 or q8_0.")
    q = table[dtype]
    if q not in (Q.F32, Q.F16) and not _fits(shape, q):
        return Q.F16
    return q


def write_gguf(model, tokenizer, out: str | Path, *, overwrite: bool = False, dtype: str = "auto",
               name: str | None = None) -> GGUFExport:
    """Write a plain Hugging Face llama or qwen2 model (as it is now, edits included) as a GGUF file.

    ``dtype``: ``auto`` (the model's own float type), ``f32``, ``f16``, ``bf16`` or ``q8_0``; norms and biases are
    always F32. Other architectures raise :class:`RefusalError` naming them."""
    import gguf

    out = Path(out)
    _check_out(out, overwrite)
    arch = _hf_arch(model)
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    hidden = int(cfg.hidden_size)
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_head)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)

    state = model.state_dict()
    plan: list[_Tensor] = []
    for hf_name, tensor in state.items():
        if tied and hf_name.endswith("lm_head.weight"):
            continue
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise RefusalError(f"The parameter '{hf_name}' has no GGUF name for architecture '{arch}'.",
                               "Export a Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py.")

        def produce(t=tensor, g=gname) -> np.ndarray:
            x = t.detach().to("cpu", torch.float32)
            if arch == "llama" and re.search(r"\.attn_q\.", g):
                x = _permute(x, n_head, n_head)
            elif arch == "llama" and re.search(r"\.attn_k\.", g):
                x = _permute(x, n_head, n_kv)
            return x.numpy()

        shape = tuple(int(s) for s in tensor.shape)
        plan.append(_planned(gname, shape, _hf_type(dtype, tensor, shape), produce))

    display = name or str(getattr(cfg, "_name_or_path", "") or arch).rstrip("/").split("/")[-1]

    def kv(w) -> None:
        w.add_name(display)
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_rope_dimension_count(head_dim)
        if head_dim * n_head != hidden:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(vocab)
        _tokenizer_kv(w, tokenizer, vocab)

    _write(out, arch, kv, plan)
    return GGUFExport(out)


# ---- the one entry point ----------------------------------------------------------------------------------------


def export_gguf(
    model,
    tokenizer,
    direction,
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
    options = {"norm_preserving": norm_preserving, "orthogonal_to_harmless": orthogonal_to_harmless,
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
