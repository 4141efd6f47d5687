"""Finding the parts of a decoder from its module tree: layers, attention and MLP blocks, their output projections."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    def attn_out_proj(self, i: int) -> nn.Linear:
        return _out_proj(self.attn[i], _ATTN_OUT, self.hidden_size, f"attention block of layer {i}")

    def mlp_out_proj(self, i: int) -> nn.Linear:
        return _out_proj(self.mlp[i], _MLP_OUT, self.hidden_size, f"MLP block of layer {i}")


def output_embeddings(model: Any) -> nn.Module | None:
    """The model's output head: ``get_output_embeddings`` of a transformers model (a method ``nn.Module`` lacks)."""
    head: nn.Module | None = model.get_output_embeddings()
    return head


def text_config(model: Any) -> Any:  # the transformers config (untyped)
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def find_parts(model: Any) -> ModelParts:
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
        mixed = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and (n is None or len(m) == n)
                 and len({type(x) for x in m}) > 1]
        kinds = f": its {n} layers are of several kinds ({', '.join(sorted({type(x).__name__ for x in mixed[0]}))})" \
            if mixed else f" (no list of {n} identical blocks)"
        raise RefusalError(
            f"Could not find the decoder layers of {type(model).__name__}{kinds}; interventions need one kind of "
            "layer whose attention and MLP blocks write the residual stream.",
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
        _check_no_other_writer(layer, i, children, a, f)
        attn.append(a)
        mlp.append(f)
    embed = model.get_input_embeddings()
    parts = ModelParts(layers, attn, mlp, embed, int(embed.weight.shape[1]))
    model._refusal_parts = parts
    return parts


def _check_no_other_writer(layer: nn.Module, i: int, children: dict[str, nn.Module], attn: nn.Module,
                           mlp: nn.Module) -> None:
    """Refuse a layer with a block besides its attention and MLP that holds matrices (a Mamba mixer beside the
    attention in hybrid models such as Falcon-H1): its output enters the residual stream too, and neither the hooks
    (input, attention and MLP outputs) nor weight orthogonalization would remove the direction from it. Norms (only
    1-D weights) and parameter-free modules (dropout) are fine."""
    for name, child in children.items():
        if child is attn or child is mlp:
            continue
        if any(p.ndim >= 2 for p in child.parameters()):
            raise RefusalError(
                f"Layer {i} ({type(layer).__name__}) has the block '{name}' ({type(child).__name__}) beside its "
                "attention and MLP; its output enters the residual stream as well, and directional ablation and "
                "weight orthogonalization cover only the attention and MLP outputs, so they would leave the "
                "direction in.",
                "This architecture (a hybrid with a second token mixer, e.g. a state-space block beside attention) "
                "is not supported yet; please open an issue with the model id.",
            )


def _out_proj(block: nn.Module, names: tuple[str, ...], hidden: int, what: str) -> nn.Linear:
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


def _as_device(dev: torch.device | int | str) -> torch.device:
    if isinstance(dev, torch.device):
        return dev
    if isinstance(dev, int):  # accelerate's accelerator index
        try:
            return torch.device(dev)
        except RuntimeError:
            return torch.device("cuda", dev)
    return torch.device(dev)


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on (its ``AlignDevicesHook``), or None when it has no such hook (a model
    not dispatched with a device map or offloaded)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # a SequentialHook or one hook
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    return None


def module_device(module: nn.Module, fallback: torch.device | str = "cpu") -> torch.device:
    """Where ``module`` computes: accelerate's execution device when a device map placed it (its parameters may then
    sit on ``meta``, offloaded to the CPU or disk), else the device of its first parameter that holds data, else
    ``fallback``."""
    dev = execution_device(module)
    if dev is not None:
        return dev
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return _as_device(fallback)


def layer_devices(model: Any) -> list[torch.device]:
    """The device each decoder layer computes on (one per layer; several distinct ones for a model split by a device
    map). A layer's forward pre-hooks still see its input on the previous layer's device: accelerate moves inputs
    inside the forward, after them."""
    parts = find_parts(model)
    fallback = model_device(model)
    return [module_device(layer, fallback) for layer in parts.layers]


def model_device(model: Any) -> torch.device:
    """The device inputs go to: where the input embedding computes (accelerate's execution device for a model split
    or offloaded by a device map, whose embedding weight may be on ``meta``)."""
    embed = find_parts(model).embed
    dev = execution_device(embed)
    if dev is not None:
        return dev
    if embed.weight.device.type != "meta":
        return embed.weight.device
    return module_device(model)


def is_dispatched(model: Any) -> bool:
    """Whether accelerate placed the model with a device map or offloading (hooks move tensors between devices)."""
    return bool(getattr(model, "hf_device_map", None)) or any(
        hasattr(m, "_hf_hook") for m in model.modules())


def resident_tensor(module: nn.Module, name: str, what: str | None = None) -> torch.Tensor:
    """The tensor that holds the values of ``module``'s parameter or buffer ``name``, to read or edit in place.

    That is the parameter itself, unless accelerate offloaded it (the parameter is then on ``meta`` and is filled from
    the hook's weights map at every forward): the in-memory copy in that map (CPU offload) is returned. Weights
    offloaded to disk are reread from their files at every forward, so no tensor holds them: a
    :class:`RefusalError` says so (naming the weight ``what``, e.g. its qualified name)."""
    t = getattr(module, name)
    if t is None or t.device.type != "meta":
        return t
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        wm = getattr(h, "weights_map", None)
        if wm is None:
            continue
        data, key = getattr(wm, "dataset", wm), getattr(wm, "prefix", "") + name
        table = getattr(data, "state_dict", data)  # accelerate's OffloadedWeightsLoader keeps in-memory ones there
        value = table.get(key) if hasattr(table, "get") else None
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            return value
    raise RefusalError(
        f"The weight {what or repr(name) + ' of ' + type(module).__name__} is not in memory: accelerate offloaded it "
        "to disk (it is read from its file at every forward) or it was never loaded (meta device), so it cannot be "
        "edited in place.",
        "Load the model so that every weight fits in GPU or CPU memory (--device-map auto with more memory, or a "
        "smaller dtype), or use hook-based ablation instead of weight orthogonalization.",
    )


def decoder(model: Any) -> Any:
    """The model without its output head (the stack of layers that returns hidden states and the cache)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(model: Any) -> str:
    """The name under which ``model``'s forward takes (and its output returns) the key/value cache: ``"cache"``
    in newer transformers (which warn that ``past_key_values`` is deprecated), else ``"past_key_values"``.
    Looked up once per model class."""
    cls = type(model)
    name = _CACHE_KWARG.get(cls)
    if name is None:
        params: Mapping[str, inspect.Parameter]
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        name = _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return name
