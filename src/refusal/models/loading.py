"""Loading chat models, for any Hugging Face decoder.

A model spec is one of: a catalog name (``refusal models list``), a local ``.gguf`` file, a local Hugging Face
folder, or a hub id.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RefusalError
from . import catalog
from .parts import find_parts

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
        _check_gguf_header(p)
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


_GGUF_HEADER = 24  # magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata count


def _bad_gguf(path: str | Path, why: str) -> RefusalError:
    return RefusalError(
        f"The file '{path}' is not a valid, complete GGUF model file ({why}).",
        "Download it again (an interrupted download leaves a truncated file), or use a catalog model, which "
        "`refusal models pull NAME` fetches and verifies.",
    )


def _check_gguf_header(path: Path) -> None:
    """A cheap check (no metadata parsing): the magic bytes, a known version and room for the header."""
    try:
        with open(path, "rb") as f:
            head = f.read(_GGUF_HEADER)
    except OSError as exc:
        raise _bad_gguf(path, f"it cannot be read: {exc.strerror or exc}") from None
    if head[:4] != b"GGUF":
        raise _bad_gguf(path, "it does not start with the GGUF magic bytes")
    if len(head) < _GGUF_HEADER:
        raise _bad_gguf(path, f"it has only {len(head)} bytes, less than a GGUF header")
    # version 1-3, little- or big-endian (a big-endian file reads as a huge little-endian number)
    version = int.from_bytes(head[4:8], "little")
    if version not in (1, 2, 3) and int.from_bytes(head[4:8], "big") not in (1, 2, 3):
        raise _bad_gguf(path, f"unknown GGUF version {version}")


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


MAX_MEMORY_FRACTION = 0.9
_SPREADING_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def max_memory_map(fraction: float = MAX_MEMORY_FRACTION, *, cpu: bool = True) -> dict[int | str, int]:
    """How many bytes accelerate may place on each device: every visible GPU's free memory
    (``torch.cuda.mem_get_info``) times ``fraction``, leaving the rest for activations and the key/value cache, and
    (``cpu=True``) the available RAM times ``fraction`` for whatever does not fit on the GPUs."""
    if not 0.0 < float(fraction) <= 1.0:
        raise RefusalError(f"max_memory_fraction must be in (0, 1], not {fraction}.",
                           "Give the share of each device's free memory the weights may take, e.g. 0.9.")
    out: dict[int | str, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _total = torch.cuda.mem_get_info(i)
            out[i] = int(free * fraction)
    if cpu:
        import psutil  # a dependency of accelerate

        out["cpu"] = int(psutil.virtual_memory().available * fraction)
    return out


def _max_memory(device_map: str | dict | None, max_memory: dict | float | None, fraction: float) -> dict | None:
    """The ``max_memory`` to give ``from_pretrained``: an explicit dict as given, else for a spreading device map
    (``"auto"``, ``"balanced"``, ...) the free memory of each device times ``fraction`` (or ``max_memory`` when that
    is a number); None for an explicit map."""
    if isinstance(max_memory, float):
        fraction = max_memory
        max_memory = None
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise RefusalError(f"max_memory must be a dict of device to bytes (or a size such as '70GiB'), not "
                               f"{max_memory!r}.", "For example {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'}.")
        return max_memory
    if isinstance(device_map, str) and device_map in _SPREADING_MAPS:
        return max_memory_map(fraction)
    return None


def load_model(
    spec: str | ModelSource,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | float | None = None,
    max_memory_fraction: float = MAX_MEMORY_FRACTION,
    offload_folder: str | Path | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from any spec, in eval mode, with a left-padding tokenizer.

    ``device_map`` (for example ``"auto"``) spreads a model over several GPUs through accelerate; otherwise the
    whole model goes to ``device`` (default: CUDA if present, else CPU). With ``"auto"`` (or ``"balanced"``, ...) each
    GPU may hold weights up to ``max_memory_fraction`` of its free memory (the rest is left to activations and the
    key/value cache; what does not fit goes to CPU RAM, then to ``offload_folder`` on disk); ``max_memory`` (a dict
    such as ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``) sets the budgets explicitly, or (a float) is the
    fraction. A dict ``device_map`` is passed to transformers as given.
    """
    from transformers import AutoTokenizer

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
    if device_map is not None:
        budget = _max_memory(device_map, max_memory, max_memory_fraction)
        if budget is not None:
            kwargs["max_memory"] = budget
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    # one accelerator: load the weights straight onto it, not into CPU memory first and then copied over
    direct = device_map is None and torch.device(device).type not in ("cpu", "meta")
    try:
        tokenizer = AutoTokenizer.from_pretrained(*tok_args, **tok_kwargs)
        model = _auto_class(args[0], kwargs).from_pretrained(
            *args, dtype=torch_dtype, device_map={"": device} if direct else device_map, **kwargs
        )
    except Exception as exc:
        if source.kind != "gguf" or isinstance(exc, (RefusalError, MemoryError, torch.cuda.OutOfMemoryError)):
            raise
        # transformers' GGUF reader fails on truncated or corrupt files with assorted errors (ValueError, ...)
        raise _bad_gguf(source.path, f"transformers could not read it: {exc.__class__.__name__}: "
                                     f"{(str(exc).splitlines() or [''])[0][:200]}") from exc
    if device_map is None and not direct:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    prepare_tokenizer(tokenizer, args[0] if source.kind in ("folder", "catalog") else None)
    find_parts(model)  # an architecture the interventions cannot cover is refused now, before any work
    return model, tokenizer


def _auto_class(path: str, kwargs: dict) -> Any:  # a transformers auto class
    """``AutoModelForCausalLM``, or for a multimodal checkpoint that transformers maps only as image-text-to-text
    (Mistral3, Qwen2.5-VL, ...) ``AutoModelForImageTextToText``: its ``...ForConditionalGeneration`` runs text-only
    (layers, norms and head are its language model's). Decided from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if "gguf_file" in kwargs:
        return AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    try:
        mt = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False)).model_type
    except Exception:  # noqa: BLE001 -- AutoModelForCausalLM then reports what is wrong with the config
        return AutoModelForCausalLM
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def prepare_tokenizer(tokenizer: Any, folder: str | Path | None = None) -> None:
    """Left padding (so the last positions line up across a batch) and a pad token. A tokenizer without a chat
    template takes the one a multimodal checkpoint keeps for its processor (``chat_template.jinja`` or
    ``chat_template.json`` in ``folder``)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if folder is not None and not getattr(tokenizer, "chat_template", None):
        template = processor_chat_template(Path(folder))
        if template:
            tokenizer.chat_template = template


def processor_chat_template(folder: Path) -> str | None:
    """The chat template a multimodal checkpoint saves beside its processor, or None."""
    import json

    jinja, js = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text("utf-8")
    if js.is_file():
        value = json.loads(js.read_text("utf-8")).get("chat_template")
        return value if isinstance(value, str) else None
    return None


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


def clear_quantizer(model: Any) -> None:
    """A model loaded from GGUF is marked as quantized although its weights are plain tensors; save_pretrained
    would then refuse or write a quantization config that loading cannot honour."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_plain(model: Any, tokenizer: Any, out: Path) -> None:
    """``save_pretrained`` into ``out`` atomically; clears the GGUF quantizer marker (weights are plain tensors)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_quantizer(model)
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
