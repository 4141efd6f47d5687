"""The output head's input when only the last position's logits are wanted: a contiguous copy, not a strided view.

Given ``logits_to_keep=1``, transformers' causal LMs hand the head ``hidden_states[:, -1:, :]``, a view whose rows
lie ``length x hidden`` elements apart. cuBLAS can multiply such an input far more slowly than a contiguous one
(tens of times, for a large head on a long prefill; the measurement is in ``docs/changelog.md``). Our own
forwards ask for the last position by index instead (:func:`keep_last`: transformers then gathers it into a
contiguous tensor); ``model.generate``, which passes ``logits_to_keep=1`` itself, runs inside
:func:`contiguous_head_input`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .parts import output_embeddings


def keep_last(length: int, device: torch.device | str) -> int | torch.Tensor:
    """``logits_to_keep`` for the last of ``length`` positions: its index as a tensor, or 1 for one position (whose
    slice is contiguous already, and an int keeps a compiled step free of a tensor argument)."""
    return 1 if length == 1 else torch.tensor([length - 1], device=device)


def _contiguous(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


@contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Within the block, the output head gets its input as a contiguous tensor (a no-op for one already)."""
    head = output_embeddings(model) if hasattr(model, "get_output_embeddings") else None
    handle = head.register_forward_pre_hook(_contiguous) if isinstance(head, nn.Module) else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
