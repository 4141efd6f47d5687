"""Exporting edited models: a Hugging Face folder, a PEFT LoRA adapter, a GGUF file, or a llama.cpp control vector.

Imported lazily by name, so ``import refusal.export`` does not load torch or gguf."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "export_hf": "hf", "model_card": "hf",
    "export_adapter": "adapter", "lora_factors": "adapter",
    "export_gguf": "gguf", "edit_gguf": "gguf", "write_gguf": "gguf", "GGUFExport": "gguf",
    "write_control_vector": "control_vector", "control_vector_tensors": "control_vector",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refusal.export' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
