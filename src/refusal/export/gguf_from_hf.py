"""Write a plain Hugging Face model as a GGUF file (:func:`write_gguf`, the path
:func:`~refusal.export.gguf.export_gguf` takes when the model did not come as a GGUF file).

Writes llama and qwen2 models (and their fine-tunes) with a byte-level BPE tokenizer: llama.cpp's metadata
keys, tensor names from gguf-py's own name map, llama's Q/K rows permuted as llama.cpp's converter does, and
the tokenizer (tokens, types, merges, special ids, chat template). Other architectures are refused with a
:class:`RefusalError` that names them; export a Hugging Face folder and use llama.cpp's converter for those.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import RefusalError
from .gguf_quant import _fits, _planned
from .gguf_tokenizer import _tokenizer_kv
from .gguf_write import GGUFExport, _check_out, _Tensor, _write

if TYPE_CHECKING:
    import gguf

_HF_ARCHS = ("llama", "qwen2")


def _hf_arch(model: Any) -> str:
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


def _rope_theta(cfg: Any) -> float:  # a transformers config
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _permute(x: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's Q/K row order for its (interleaved) RoPE; transformers undoes it when loading a llama GGUF."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _hf_type(dtype: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
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


def write_gguf(model: Any, tokenizer: Any, out: str | Path, *, overwrite: bool = False, dtype: str = "auto",
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

        def produce(t: torch.Tensor = tensor, g: str = gname) -> np.ndarray:
            x = t.detach().to("cpu", torch.float32)
            if arch == "llama" and re.search(r"\.attn_q\.", g):
                x = _permute(x, n_head, n_head)
            elif arch == "llama" and re.search(r"\.attn_k\.", g):
                x = _permute(x, n_head, n_kv)
            return x.numpy()

        shape = tuple(int(s) for s in tensor.shape)
        plan.append(_planned(gname, shape, _hf_type(dtype, tensor, shape), produce))

    display = name or str(getattr(cfg, "_name_or_path", "") or arch).rstrip("/").split("/")[-1]

    def kv(w: gguf.GGUFWriter) -> None:
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
