"""Exporting edited models: a Hugging Face folder, a PEFT LoRA adapter, a GGUF file, or a llama.cpp control vector.

Imported lazily by name, so ``import refusal.export`` does not load torch or gguf."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names __getattr__ imports, for the type checker
    from .adapter import export_adapter as export_adapter
    from .adapter import lora_factors as lora_factors
    from .control_vector import control_vector_tensors as control_vector_tensors
    from .control_vector import write_control_vector as write_control_vector
    from .gguf import GGUFExport as GGUFExport
    from .gguf import edit_gguf as edit_gguf
    from .gguf import export_gguf as export_gguf
    from .gguf import write_gguf as write_gguf
    from .hf import export_hf as export_hf
    from .hf import model_card as model_card

_EXPORTS = {
    "export_hf": "hf", "model_card": "hf",
    "export_adapter": "adapter", "lora_factors": "adapter",
    "export_gguf": "gguf", "edit_gguf": "gguf", "write_gguf": "gguf", "GGUFExport": "gguf",
    "write_control_vector": "control_vector", "control_vector_tensors": "control_vector",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refusal.export' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
