"""Loading chat models and finding their parts, for any Hugging Face decoder.

A model spec is one of: a catalog name (``refusal models list``), a local ``.gguf`` file, a local Hugging Face
folder, or a hub id. Nothing here knows model families by name: the decoder layers, the attention and MLP blocks
whose outputs are added to the residual stream, and their output projections are found from the module tree.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import catalog
from .errors import RefusalError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from a spec before anything heavy happens."""

    spec: str
    kind: str  # "catalog" | "gguf" | "folder" | "hub"
    path: str  # catalog name, file, folder or hub id
    alias: str  # short name for the run folder

    def describe(self) -> str:
        return f"{self.spec} ({self.kind})"


def resolve_source(spec: str) -> ModelSource:
    """Check a model spec without loading weights; raise a :class:`RefusalError` naming the fix if it is bad."""
    entry = catalog.lookup(spec)
    if entry is not None:
        return ModelSource(spec, "catalog", entry.name, entry.name)
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise RefusalError(f"The GGUF file '{spec}' does not exist.", "Check the path, or give a catalog name.")
        return ModelSource(spec, "gguf", str(p.resolve()), _slug(p.stem))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise RefusalError(
                f"The folder '{spec}' has no config.json, so it is not a Hugging Face model folder.",
                "Point --model at the folder that holds config.json and the weights, or at a .gguf file.",
            )
        return ModelSource(spec, "folder", str(p.resolve()), _slug(p.name))
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_ID.match(spec):
        known = ", ".join(e.name for e in catalog.list_entries())
        raise RefusalError(
            f"Unknown model '{spec}': it is not a catalog name, an existing folder or .gguf file, "
            "or a hub id of the form org/name.",
            f"Use one of the catalog models ({known}), a local path, or a hub id such as Qwen/Qwen2.5-1.5B-Instruct.",
        )
    return ModelSource(spec, "hub", spec, _slug(spec.split("/")[-1]))


def check_hub_config(source: ModelSource, trust_remote_code: bool = False) -> None:
    """Fetch only the config of a hub model, so a typo or missing network fails in seconds."""
    if source.kind != "hub":
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # the hub client raises many types; all mean "cannot get this model"
        raise RefusalError(
            f"Could not get the model '{source.path}' from the Hugging Face hub or its local cache "
            f"({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:200]}).",
            "Check the id and your network (or HF_HUB_OFFLINE and the local cache), or use a catalog model "
            "(refusal models list) or a local path.",
        ) from None


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.\-]+", "-", name.lower()).strip("-") or "model"


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in _DTYPES:
        raise RefusalError(f"Unknown dtype '{name}'.", f"Use one of: auto, {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def load_model(
    spec: str | ModelSource,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from any spec, in eval mode, with a left-padding tokenizer.

    ``device_map`` (for example ``"auto"``) spreads a model over several GPUs through accelerate; otherwise the
    whole model goes to ``device`` (default: CUDA if present, else CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    device = device or default_device()
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.kind == "catalog":
        folder = _catalog_folder(source.path)
        args, tok_args = (str(folder),), (str(folder),)
    elif source.kind == "gguf":
        p = Path(source.path)
        args, tok_args = (str(p.parent),), (str(p.parent),)
        kwargs["gguf_file"] = p.name
    else:
        check_hub_config(source, trust_remote_code)
        args, tok_args = (source.path,), (source.path,)
    tok_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "trust_remote_code")}
    tokenizer = AutoTokenizer.from_pretrained(*tok_args, **tok_kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        *args, dtype=torch_dtype, device_map=device_map, **kwargs
    )
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Left padding (so the last positions line up across a batch) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _catalog_folder(name: str) -> Path:
    """Pull a catalog model and return a folder of dequantized weights, converting the GGUF once."""
    out = catalog.hf_cache_dir(name)
    if (out / "config.json").is_file():
        return out
    gguf = catalog.pull(name)
    from rich.console import Console

    Console(stderr=True).print(f"[bold]Dequantizing[/] {gguf.name} of {name} once into {out} (later loads are fast)")
    convert_gguf(gguf, out)
    return out


def convert_gguf(gguf: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize a GGUF chat model into a plain Hugging Face folder (safetensors), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    save_plain(model, tokenizer, Path(out))
    return Path(out)


def save_plain(model, tokenizer, out: Path) -> None:
    """``save_pretrained`` into ``out`` atomically; clears the GGUF quantizer marker (weights are plain tensors)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ----------------------------------------------------------------------------------------------------------------
# Finding the parts of a decoder


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


def _eps(module: nn.Module):
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def _rms_norm_forward(module: nn.Module, eps: float):
    shape = tuple(module.weight.shape)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(hidden_states, shape, module.weight, eps)
    return forward


@torch.no_grad()
def _same_as_rms_norm(module: nn.Module, eps: float) -> bool:
    """Whether ``module`` computes ``rms_norm(x) * weight`` (normalised in float32, rounded to the input's dtype, then
    scaled), checked on random inputs with a non-zero mean and spread-out scales."""
    w = module.weight
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(3, 5, w.shape[0], generator=g) * torch.tensor([0.5, 4.0, 60.0])[:, None, None] + 1.0)
    x = x.to(device=w.device, dtype=w.dtype)
    try:
        want = module(x)
    except Exception:  # noqa: BLE001 -- a module with another signature is simply not a plain norm
        return False
    got = _rms_norm_forward(module, eps)(x)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        return False
    tol = 1e-5 if w.dtype == torch.float32 else 2 * torch.finfo(w.dtype).eps  # two roundings either way
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max())))


@contextmanager
def fused_norms(model: nn.Module) -> Iterator[int]:
    """Run the model's RMS norms as torch's one-kernel ``rms_norm`` instead of its several elementwise kernels, for
    each norm where a check on random input shows the same output (to rounding); others are left alone. Yields the
    number replaced; everything is restored on exit.

    No model family is named: a candidate is any module with a 1-D ``weight``, no ``bias`` and an ``eps`` or
    ``variance_epsilon``; the check rejects LayerNorms, Gemma's ``(1 + weight)`` and anything else."""
    swapped = []
    if hasattr(torch.nn.functional, "rms_norm"):
        for m in model.modules():
            w, eps = getattr(m, "weight", None), _eps(m)
            if (not isinstance(w, torch.Tensor) or w.ndim != 1 or getattr(m, "bias", None) is not None
                    or not isinstance(eps, float) or "forward" in m.__dict__):  # accelerate keeps its wrapper there
                continue
            if _same_as_rms_norm(m, eps):
                swapped.append(m)
    try:
        for m in swapped:
            m.forward = _rms_norm_forward(m, _eps(m))
        yield len(swapped)
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)


def with_fused_norms(fn):
    """Decorator: run ``fn(model, ...)`` under :func:`fused_norms`."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with fused_norms(model):
            return fn(model, *args, **kwargs)
    return wrapper
