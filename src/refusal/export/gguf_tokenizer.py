"""Tokenizer metadata for a GGUF written from a Hugging Face model: a fast byte-level BPE tokenizer (GPT-2, Llama 3,
Qwen2 style) as llama.cpp's keys: tokens, token types, merges, the pre-tokenizer's llama.cpp name, special ids and the
chat template. Other tokenizers are refused.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import RefusalError

if TYPE_CHECKING:
    import gguf


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


def _tokenizer_kv(w: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
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
    names: list[str] = []
    for i, t in enumerate(tokens):
        if t is None:
            t = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
        names.append(t)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(names)
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
