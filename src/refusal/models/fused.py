"""Fused input projections: the query/key/value projections of an attention block, and the gate/up projections of
a gated MLP, run as one matrix multiply each while decoding.

At a small batch a decode step reads every weight once, and several narrow GEMMs read theirs at a lower bandwidth
than one wide one (grouped-query attention's k/v projections are narrow). Inside
:func:`fused_projections` each group's weights live in one ``(sum of outputs, in)`` tensor; the group's modules
become views into it, and the first of them to see an input computes all outputs at once, which the others then
take (same input object; any other input is computed on its own). On exit every module gets its own weight back.
Memory stays the same: the separate weights are freed while the fused one exists.

Groups are found by the module names transformers' decoder models use (``q_proj``/``k_proj``/``v_proj``,
``gate_proj``/``up_proj``) among ``nn.Linear`` children with the same input size, dtype and device; a block without
them (already fused, like Phi-3's ``qkv_proj``, or named otherwise) is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .parts import find_parts

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Shared:
    """The fused product of one group: computed by the first member to see an input, taken by the rest."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, n: int):
        self.weight, self.bias, self.n = weight, bias, n
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.taken = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.x is not x:
            self.x, self.y, self.taken = x, torch.nn.functional.linear(x, self.weight, self.bias), 0
        y = self.y
        assert y is not None  # computed above for this input
        self.taken += 1
        if self.taken == self.n:  # every member has its part: hold no activation past the block
            self.x = self.y = None
        return y


def _member_forward(shared: _Shared, start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return shared(x)[..., start:stop]
    return forward


def _groups(block: nn.Module) -> Iterator[list[nn.Linear]]:
    for names in GROUPS:
        found = [getattr(block, n, None) for n in names]
        mods = [m for m in found if isinstance(m, nn.Linear)]
        if len(mods) != len(found):
            continue
        w0 = mods[0].weight
        if any(m.weight.shape[1] != w0.shape[1] or m.weight.dtype != w0.dtype or m.weight.device != w0.device
               or (m.bias is None) != (mods[0].bias is None) or m.weight.device.type == "meta"
               or "forward" in vars(m) or hasattr(m, "_hf_hook") for m in mods):  # offloaded, or patched by others
            continue
        yield mods


@contextmanager
@torch.no_grad()
def fused_projections(model: nn.Module) -> Iterator[int]:
    """Fuse every attention block's q/k/v and every MLP's gate/up projections for the block (see the module's
    docstring); yields how many groups were fused. The weights' values do not change, only where they live."""
    parts = find_parts(model)
    fused: list[list[nn.Linear]] = []
    try:
        for block in [*parts.attn, *parts.mlp]:
            for mods in _groups(block):
                weight = torch.cat([m.weight for m in mods])
                bias = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
                shared = _Shared(weight, bias, len(mods))
                start = 0
                for m in mods:
                    stop = start + m.weight.shape[0]
                    m.weight.data = weight[start:stop]
                    if bias is not None:
                        m.bias.data = bias[start:stop]
                    vars(m)["forward"] = _member_forward(shared, start, stop)  # what nn.Module's setattr does
                    start = stop
                fused.append(mods)
        yield len(fused)
    finally:
        for mods in fused:
            for m in mods:
                del m.forward  # the class's forward again
                m.weight.data = m.weight.data.clone()
                if m.bias is not None:
                    m.bias.data = m.bias.data.clone()
