"""Every matrix that writes to the residual stream, found from the module tree (no per-family tables).

A decoder writes to its residual stream through the input embedding and, in every layer, through the output
projection of its attention block and of its MLP block. A mixture-of-experts MLP block writes through the output
projection of every expert and of its shared expert(s); its router only reads the stream and is left alone.
Experts come in two layouts:

* a ``ModuleList`` of expert MLPs, each with a ``down_proj`` / ``w2`` Linear (transformers 4.x Mixtral and
  Qwen2-MoE, many remote-code models), found as Linear layers with an output-projection name and
  ``out_features == hidden_size``;
* one fused 3-D parameter for all experts (transformers 5: ``experts.down_proj`` of shape
  ``(n_experts, hidden, intermediate)``, or ``(n_experts, intermediate, hidden)`` for "transposed" layouts such as
  gpt-oss and Llama 4), with an optional ``down_proj_bias`` of shape ``(n_experts, hidden)``.

For a fused parameter the residual (output) axis is the one of size ``hidden_size``; when both matrix axes have that
size the module's ``is_transposed`` flag (set by transformers' experts integration) decides, else the
``F.linear`` layout ``(n_experts, out, in)`` that transformers uses by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RefusalError
from .parts import _MLP_OUT, ModelParts, find_parts

__all__ = ["Writer", "residual_writers"]


@dataclass(frozen=True, eq=False)
class Writer:
    """One parameter that writes to the residual stream.

    ``axis`` is the residual (output) axis of ``weight``: 1 for the embedding ``(vocab, hidden)``, 0 for a Linear
    ``(hidden, in)``, 1 or 2 for fused experts. A bias (if any) has the residual axis last: ``(hidden,)`` or
    ``(n_experts, hidden)``."""

    name: str  # qualified parameter name, e.g. "model.layers.3.mlp.experts.down_proj"
    module: nn.Module
    attr: str  # the parameter's attribute on ``module``: "weight", "down_proj", ...
    axis: int
    bias_attr: str | None
    layer: int | None  # decoder layer; None for the embedding
    kind: str  # "embedding" | "attention" | "mlp" | "expert" | "shared_expert"

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.bias_attr is None else getattr(self.module, self.bias_attr)

    @property
    def fused(self) -> bool:
        """One parameter holding every expert (leading axis = expert)."""
        return self.weight.ndim == 3

    @property
    def n_experts(self) -> int:
        return self.weight.shape[0] if self.fused else 1

    def __repr__(self) -> str:
        return f"Writer({self.name}, shape={tuple(self.weight.shape)}, axis={self.axis}, kind={self.kind})"


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _linear_writer(lin: nn.Linear, name: str, layer: int | None, kind: str) -> Writer:
    return Writer(f"{name}.weight" if name else "weight", lin, "weight", 0,
                  "bias" if lin.bias is not None else None, layer, kind)


def _fused_axis(module: nn.Module, p: torch.Tensor, hidden: int, name: str) -> int:
    axes = [a for a in (1, 2) if p.shape[a] == hidden]
    if not axes:
        raise RefusalError(
            f"The fused expert weight {name} has shape {tuple(p.shape)}, with no axis of the hidden size {hidden}.",
            "This mixture-of-experts layout is not supported for weight orthogonalization; use hook-based "
            "ablation instead.",
        )
    if len(axes) == 1:
        return axes[0]
    transposed = getattr(module, "is_transposed", None)
    if isinstance(transposed, bool):
        return 2 if transposed else 1
    return 1  # F.linear layout (n_experts, out, in), transformers' default


def _expert_kind(qual: str) -> str:
    return "shared_expert" if "shared" in qual.lower() else "expert"


def _mlp_writers(block: nn.Module, block_name: str, hidden: int, layer: int, parts: ModelParts, names: dict[int, str]
                 ) -> list[Writer]:
    children = dict(block.named_children())
    for k in _MLP_OUT:  # a dense MLP: its own output projection
        m = children.get(k)
        if isinstance(m, nn.Linear) and m.out_features == hidden:
            return [_linear_writer(m, f"{block_name}.{k}", layer, "mlp")]
    out: list[Writer] = []
    for qual, m in block.named_modules():
        full = f"{block_name}.{qual}" if qual else block_name
        leaf = qual.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear):
            if leaf in _MLP_OUT and m.out_features == hidden:
                out.append(_linear_writer(m, full, layer, _expert_kind(qual)))
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.ndim != 3 or pname not in _MLP_OUT:
                continue
            axis = _fused_axis(m, p, hidden, f"{full}.{pname}")
            bias = getattr(m, f"{pname}_bias", None)
            bias_attr = f"{pname}_bias" if isinstance(bias, torch.Tensor) and bias.shape == (p.shape[0], hidden) \
                else None
            out.append(Writer(f"{full}.{pname}", m, pname, axis, bias_attr, layer, _expert_kind(qual)))
    if out:
        return out
    lin = parts.mlp_out_proj(layer)  # the one Linear writing the hidden size, or a clear error
    return [_linear_writer(lin, names.get(id(lin), f"{block_name}.out"), layer, "mlp")]


def residual_writers(model: nn.Module) -> list[Writer]:
    """The embedding, then per layer the attention output projection and the MLP writers (one Linear for a dense
    MLP; every expert's and shared expert's output projection for a mixture of experts)."""
    parts = find_parts(model)
    hidden = parts.hidden_size
    names = _names(model)
    emb = parts.embed
    if emb.weight.ndim != 2 or emb.weight.shape[1] != hidden:
        raise RefusalError(f"The input embedding has shape {tuple(emb.weight.shape)}, not (vocab, {hidden}).",
                           "This architecture is not supported for weight orthogonalization.")
    out = [Writer(f"{names.get(id(emb), 'embed')}.weight", emb, "weight", 1, None, None, "embedding")]
    for i in range(parts.n_layers):
        attn = parts.attn_out_proj(i)
        out.append(_linear_writer(attn, names.get(id(attn), f"layers.{i}.attn"), i, "attention"))
        out += _mlp_writers(parts.mlp[i], names.get(id(parts.mlp[i]), f"layers.{i}.mlp"), hidden, i, parts, names)
    return out
