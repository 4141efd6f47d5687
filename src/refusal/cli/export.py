"""``refusal abliterate`` and ``refusal control-vector``: export what a run found.

A run folder holds ``config.yaml`` (key ``model``: the model spec) and ``direction.safetensors`` (written by
``refusal select``); ``summary.json`` (from ``refusal evaluate``), when present, goes into the model card.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import typer

from ..errors import DamagedFileError, RefusalError

if TYPE_CHECKING:
    from ..directions.base import Direction

_F = TypeVar("_F", bound=Callable[..., Any])


def _run_inputs(run_dir: Path, trust_remote_code: bool = False, allow_network: bool = False) -> tuple[dict, Direction]:
    """The run's saved config (checked; ``trust_remote_code`` set to what this command line grants, never what the
    file says; a hub model only with ``allow_network``) and its selected direction."""
    from ..runs.folder import RunFolder, granted

    rf = RunFolder(run_dir)
    cfg = granted(rf, rf.read_config(complete=False), trust_remote_code, allow_network=allow_network)
    if not rf.file("direction.safetensors").is_file():
        raise RefusalError(f"'{rf.path}' has no direction.safetensors: no direction was selected yet.",
                           f"Run `refusal select {rf.path}` (or `refusal run --resume {rf.path}`) first.")
    return cfg, rf.selected_direction()  # the vector, its scores from the selection (scores.json)


def _check_export_out(out: Path | None, file_suffix: str | None, overwrite: bool) -> None:
    """An export's output path, checked before the model loads: the right suffix for a file (``file_suffix``) or a
    folder (None), not taken unless ``overwrite``, never a folder for a file (or the other way), and writable."""
    import os

    if out is None:
        return
    out = Path(out)
    if file_suffix is not None and out.suffix.lower() != file_suffix:
        raise RefusalError(f"--out {out} does not end in {file_suffix}, but a {file_suffix[1:].upper()} file is "
                           "written there.", f"Give a path ending in {file_suffix}.")
    if out.exists():
        if file_suffix is not None and out.is_dir():
            raise RefusalError(f"'{out}' is a folder; this export is one file.",
                               f"Give a file path ending in {file_suffix}.")
        if file_suffix is None and not out.is_dir():
            raise RefusalError(f"'{out}' is a file; this export is a folder.", "Give a folder path.")
        if not overwrite:
            raise RefusalError(f"'{out}' already exists.", "Pass --overwrite to replace it, or choose another path.")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RefusalError(f"'{parent}' is a file, so '{out}' cannot be written under it.",
                           "Give an output path whose folders are folders.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RefusalError(f"No permission to write in '{parent}' (for '{out}').",
                           "Give an output path in a folder you can write.")


def _locked(fn: _F) -> _F:
    """Hold the run folder's lock and the output's while an export runs (the folder is only read, so a read-only
    one is fine); sweep the temporary files interrupted exports to that output left; then give what was written
    the permissions of the user's umask."""
    import contextlib
    import functools

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        from .. import io
        from ..runs.folder import RunFolder, output_lock

        out = kwargs.get("out_path") or kwargs.get("adapter_path")
        with contextlib.ExitStack() as stack:
            if Path(kwargs["run_dir"]).is_dir():
                stack.enter_context(RunFolder(kwargs["run_dir"]).lock(read_only_ok=True))
            if out is not None and Path(out).absolute().parent.is_dir():
                stack.enter_context(output_lock(Path(out)))
            result = fn(*args, **kwargs)
        if out is not None and Path(out).exists():
            io.share(Path(out))
        return result

    return cast(_F, command)


def _gguf_file(spec: str) -> Path | None:
    """The GGUF file a model spec loads from (a .gguf path or a catalog model), else None."""
    from ..models import catalog
    from ..models.loading import resolve_source

    source = resolve_source(spec)
    if source.kind == "gguf":
        return Path(source.path)
    if source.kind == "catalog":
        return catalog.pull(source.path)
    return None


def _model_shape(spec: str, trust_remote_code: bool = False) -> tuple[str, int, int]:
    """``(llama.cpp architecture hint, n_layers, hidden size)`` without loading weights."""
    g = _gguf_file(spec)
    if g is not None:
        import gguf

        reader = gguf.GGUFReader(g, "r")

        def field(key: str) -> Any:
            f = reader.get_field(key)
            if f is None:
                raise DamagedFileError(g, f"it has no {key} field")
            return f.contents()

        arch = field("general.architecture")
        return arch, int(field(f"{arch}.block_count")), int(field(f"{arch}.embedding_length"))
    from transformers import AutoConfig

    from ..models.loading import check_hub_config, resolve_source

    source = resolve_source(spec)
    check_hub_config(source, trust_remote_code)
    try:
        cfg = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise RefusalError(f"Could not read the config of the model '{spec}' ({exc.__class__.__name__}: {first}).",
                           "If the model needs its own code and you trust it, pass --trust-remote-code; otherwise "
                           "check the model folder.") from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return str(text.model_type).replace("_", ""), int(text.num_hidden_layers), int(text.hidden_size)


def _card(run_dir: Path, spec: str, direction: Direction) -> dict:
    from .. import io

    card: dict[str, Any] = {"base_model": spec, "run": str(run_dir.resolve().name)}
    scores: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        s = io.read_json(summary_path)
        results = s.get("results")
        if isinstance(results, dict):  # {prompt set: {condition: {"refusal": {"rate", "low", "high", "n"}, ...}}}
            for kind, conds in results.items():
                for cond, m in (conds or {}).items():
                    r = (m or {}).get("refusal") or {}
                    if "rate" in r:
                        ci = f" [{r['low']:.2f}, {r['high']:.2f}]" if "low" in r and "high" in r else ""
                        scores[f"{kind} / {cond} / refusal rate (n={r.get('n', '?')})"] = f"{r['rate']:.2f}{ci}"
        else:  # older summaries: {"harmful": {condition: rate}, "harmless": {...}}
            for kind in ("harmful", "harmless"):
                if isinstance(s.get(kind), dict):
                    scores[f"{kind} prompts (n={s.get(f'n_{kind}', '?')})"] = s[kind]
    if direction.scores:
        scores["selection"] = dict(direction.scores)
    if scores:
        card["scores"] = scores
    return card


def _check_outputs(out_path: Path | None, adapter_path: Path | None, gguf: bool, norm_preserving: bool,
                   overwrite: bool) -> None:
    """The output flags of ``abliterate``, checked before the model loads."""
    if (out_path is None) == (adapter_path is None):
        raise RefusalError("Give exactly one of --out DIR (the edited model) and --adapter DIR (a LoRA adapter).",
                           "e.g. `refusal abliterate RUN --adapter out/lora`.")
    if adapter_path is None:
        return
    from ..export.adapter import _refuse_norm_preserving
    from ..export.hf import check_out_dir

    if gguf:
        raise RefusalError("--adapter writes a PEFT folder; it does not combine with --gguf.",
                           "Drop --gguf, or use --out FILE.gguf --gguf for a GGUF of the edited model.")
    if norm_preserving:
        _refuse_norm_preserving()
    check_out_dir(adapter_path, overwrite)


def _write_adapter(model: Any, spec: str, trust: bool, direction: Direction, run_dir: Path, adapter_path: Path,
                   overwrite: bool) -> Path:
    from ..export.adapter import export_adapter
    from ..models.identity import model_identity
    from ..models.loading import resolve_source
    from .app import err

    source = resolve_source(spec)
    identity = model_identity(source, trust)
    if direction.model and direction.model != identity:
        err.print(f"[yellow]warning:[/] the run's direction was extracted from {direction.model}, but {spec} is now "
                  f"{identity}: the adapter is written for the model as it is now.")
    base = source.path if source.kind == "folder" else spec
    card = _card(run_dir, base, direction)
    if source.kind in ("catalog", "gguf"):
        card["notes"] = (f"The base model is the GGUF file `{_gguf_file(spec)}`, dequantized by transformers (load "
                         "it with `AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=NAME)`). The factors come "
                         "from those weights: on another copy of the model (e.g. its original release) the adapter "
                         "is exact only where the weights are the same.")
    return export_adapter(model, direction, adapter_path, base_model=base, identity=identity, overwrite=overwrite,
                          card=card)


_RUN_DIR_HELP = "A run folder (holds config.yaml and direction.safetensors)."
_TRUST_HELP = "Allow the model's own code (never taken from the run's config)."
_NETWORK_HELP = "Let the run's saved config name a hub model or server (never without this flag)."


def _edit_gguf_file(source: Path, direction: Direction, out_path: Path, overwrite: bool,
                    norm_preserving: bool) -> None:
    """``abliterate --gguf`` on a model that is a GGUF file: edit the file itself (tensors stay quantized, no model
    load) and report what was edited, added and skipped."""
    from ..export.gguf import edit_gguf
    from .app import err, out

    err.print(f"Editing [bold]{source}[/] (tensors stay quantized) ...")
    res = edit_gguf(source, direction, out_path, overwrite=overwrite, norm_preserving=norm_preserving)
    out.print(f"Wrote [bold]{res.path}[/]: {len(res.edited)} tensors edited"
              + (f", added {', '.join(res.added)}" if res.added else "")
              + "".join(f"\n  skipped {k}: {v}" for k, v in res.skipped.items()))


def _write_edited(cfg: dict, direction: Direction, run_dir: Path, out_path: Path | None, adapter_path: Path | None,
                  gguf: bool, overwrite: bool, norm_preserving: bool, device: str | None,
                  dtype: str | None) -> None:
    """Load the run's model and write the edit: a LoRA adapter (``adapter_path``), a GGUF file (``gguf``) or an
    edited Hugging Face folder."""
    from ..models.loading import load_model
    from .app import err, out

    spec = str(cfg["model"])
    trust = bool(cfg.get("trust_remote_code") or False)
    err.print(f"Loading [bold]{spec}[/] ...")
    model, tokenizer = load_model(spec, device=device, dtype=dtype or cfg.get("dtype"), trust_remote_code=trust)
    if adapter_path is not None:
        path = _write_adapter(model, spec, trust, direction, Path(run_dir), adapter_path, overwrite)
        out.print(f"Wrote [bold]{path}[/] (load it with PeftModel.from_pretrained(base, PATH); "
                  "vLLM: see its README.md)")
        return
    assert out_path is not None  # exactly one of --out and --adapter (checked by _check_outputs)
    if gguf:
        from ..export.gguf import export_gguf

        res = export_gguf(model, tokenizer, direction, out_path, overwrite=overwrite,
                          norm_preserving=norm_preserving)
        out.print(f"Wrote [bold]{res.path}[/]")
    else:
        from ..export.hf import export_hf

        path = export_hf(model, tokenizer, direction, out_path, overwrite=overwrite,
                         card=_card(Path(run_dir), spec, direction), in_place=True,
                         norm_preserving=norm_preserving)
        out.print(f"Wrote [bold]{path}[/] (load it with AutoModelForCausalLM.from_pretrained)")


@_locked
def abliterate(
    run_dir: Path = typer.Argument(..., help=_RUN_DIR_HELP),
    out_path: Path = typer.Option(None, "--out", "-o", help="Output folder (or .gguf file with --gguf)."),
    adapter_path: Path = typer.Option(None, "--adapter",
                                      help="Write a PEFT LoRA adapter folder instead of the edited model "
                                           "(exact: base model + adapter = the --out model)."),
    gguf: bool = typer.Option(False, "--gguf", help="Write one GGUF file instead of a Hugging Face folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    norm_preserving: bool = typer.Option(False, "--norm-preserving",
                                         help="Keep every weight row's norm (heretic's variant; not exact)."),
    device: str = typer.Option(None, help="Where to load the model (default: best available)."),
    dtype: str = typer.Option(None, help="auto, bfloat16, float16, float32 (default: the run's)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=_TRUST_HELP),
    allow_network: bool = typer.Option(False, "--allow-network", help=_NETWORK_HELP),
) -> None:
    """Bake the run's refusal direction into the weights and save the edited model (or, with --adapter, the
    edit as a LoRA adapter for the base model)."""
    from .app import _fail

    try:
        _check_outputs(out_path, adapter_path, gguf, norm_preserving, overwrite)
        _check_export_out(out_path, ".gguf" if gguf else None, overwrite)
        cfg, direction = _run_inputs(run_dir, trust_remote_code, allow_network)
        from ..runs.keep_refusal import refuse_weight_export

        refuse_weight_export(cfg, run_dir)  # conditional keep-refusal is not a weight edit
        source = _gguf_file(str(cfg["model"])) if gguf else None
        if gguf and source is not None:  # edit the GGUF file itself: quantization kept, no model load
            _edit_gguf_file(source, direction, out_path, overwrite, norm_preserving)
            return
        _write_edited(cfg, direction, Path(run_dir), out_path, adapter_path, gguf, overwrite, norm_preserving,
                      device, dtype)
    except RefusalError as exc:
        _fail(exc)


@_locked
def control_vector(
    run_dir: Path = typer.Argument(..., help=_RUN_DIR_HELP),
    out_path: Path = typer.Option(..., "--out", "-o", help="Output control-vector file (.gguf)."),
    coeff: float = typer.Option(1.0, help="Scale of the vector (activation addition adds coeff · v)."),
    layer: int = typer.Option(None, help="Add at the input of this layer (default: the direction's layer)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=_TRUST_HELP),
    allow_network: bool = typer.Option(False, "--allow-network", help=_NETWORK_HELP),
) -> None:
    """Write the run's direction as a llama.cpp control vector (activation addition; use it with
    llama-cli --control-vector FILE). Ablation cannot be a control vector: use `refusal abliterate`."""
    from ..export.control_vector import write_control_vector
    from .app import _fail, out

    try:
        _check_export_out(out_path, ".gguf", overwrite)
        cfg, direction = _run_inputs(run_dir, trust_remote_code, allow_network)
        hint, n_layers, hidden = _model_shape(str(cfg["model"]), bool(cfg.get("trust_remote_code") or False))
        path = write_control_vector(direction, out_path, n_layers=n_layers, model_hint=hint, layer=layer,
                                    coeff=coeff, hidden_size=hidden, overwrite=overwrite)
        used = direction.layer if layer is None else layer
        out.print(f"Wrote [bold]{path}[/]: {coeff:g} × direction added at the input of layer {used} "
                  f"(llama.cpp direction.{used - 1}, after block {used - 1})")
    except RefusalError as exc:
        _fail(exc)


def register(app: typer.Typer) -> None:
    """Add ``refusal abliterate`` and ``refusal control-vector`` to the app."""
    app.command("abliterate")(abliterate)
    app.command("control-vector")(control_vector)
