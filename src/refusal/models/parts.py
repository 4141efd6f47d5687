"""Finding the parts of a decoder from its module tree: layers, attention and MLP blocks, their output projections."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RefusalError

_ATTN_NAMES = ("self_attn", "attn", "self_attention", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_ATTN_OUT = ("o_proj", "out_proj", "dense", "c_proj", "wo")
_MLP_OUT = ("down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h", "wo")


@dataclass
class ModelParts:
    """The modules of a decoder that interventions touch."""

    layers: nn.ModuleList
    attn: list[nn.Module]
    mlp: list[nn.Module]
    embed: nn.Embedding
    hidden_size: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def attn_out_proj(self, i: int) -> nn.Module:
        return _out_proj(self.attn[i], _ATTN_OUT, self.hidden_size, f"attention block of layer {i}")

    def mlp_out_proj(self, i: int) -> nn.Module:
        return _out_proj(self.mlp[i], _MLP_OUT, self.hidden_size, f"MLP block of layer {i}")


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def find_parts(model) -> ModelParts:
    """Find the decoder layers and their attention/MLP blocks from the module tree."""
    cached = getattr(model, "_refusal_parts", None)
    if cached is not None:
        return cached
    cfg = text_config(model)
    n = getattr(cfg, "num_hidden_layers", None)
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
        and len({type(x) for x in m}) == 1
    ]
    if not candidates:
        raise RefusalError(
            f"Could not find the decoder layers of {type(model).__name__} (no list of {n} identical blocks).",
            "This architecture is not supported yet; please open an issue with the model id.",
        )
    _, layers = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    attn, mlp = [], []
    for i, layer in enumerate(layers):
        children = dict(layer.named_children())
        a = next((children[k] for k in _ATTN_NAMES if k in children), None)
        f = next((children[k] for k in _MLP_NAMES if k in children), None)
        if a is None or f is None:
            raise RefusalError(
                f"Could not find the attention and MLP blocks in layer {i} ({type(layer).__name__}: "
                f"children {list(children)}).",
                "This architecture is not supported yet; please open an issue with the model id.",
            )
        attn.append(a)
        mlp.append(f)
    embed = model.get_input_embeddings()
    parts = ModelParts(layers, attn, mlp, embed, int(embed.weight.shape[1]))
    model._refusal_parts = parts
    return parts


def _out_proj(block: nn.Module, names: tuple[str, ...], hidden: int, what: str) -> nn.Module:
    children = dict(block.named_children())
    for k in names:
        m = children.get(k)
        if isinstance(m, nn.Linear) and m.out_features == hidden:
            return m
    linears = [m for m in block.modules() if isinstance(m, nn.Linear) and m.out_features == hidden]
    if len(linears) == 1:
        return linears[0]
    raise RefusalError(
        f"Could not find the output projection of the {what} ({type(block).__name__}).",
        "Weight orthogonalization needs a Linear output projection; use hook-based ablation instead.",
    )


def model_device(model) -> torch.device:
    return find_parts(model).embed.weight.device


def decoder(model):
    """The model without its output head (the stack of layers that returns hidden states and the cache)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(model) -> str:
    """The name under which ``model``'s forward takes (and its output returns) the key/value cache: ``"cache"``
    in newer transformers (which warn that ``past_key_values`` is deprecated), else ``"past_key_values"``.
    Looked up once per model class."""
    cls = type(model)
    name = _CACHE_KWARG.get(cls)
    if name is None:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        name = _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return name
