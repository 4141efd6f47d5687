"""``refusal abliterate`` and ``refusal control-vector``: export what a run found.

A run folder holds ``config.yaml`` (key ``model``: the model spec) and ``direction.safetensors`` (written by
``refusal select``); ``summary.json`` (from ``refusal evaluate``), when present, goes into the model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import RefusalError


def _run_inputs(run_dir: Path) -> tuple[dict, Any]:
    from .. import io
    from ..directions.base import Direction

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RefusalError(f"No run folder at '{run_dir}'.",
                           "Give the folder a run wrote (runs/<name>), e.g. after `refusal run -m MODEL`.")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise RefusalError(f"'{run_dir}' has no config.yaml, so it is not a run folder.",
                           "Give the folder a run wrote (it holds config.yaml and direction.safetensors).")
    cfg = io.read_yaml(cfg_path) or {}
    if not isinstance(cfg, dict) or not cfg.get("model"):
        raise RefusalError(f"'{cfg_path}' names no model (key 'model').", "Re-run the pipeline, or add `model: SPEC`.")
    direction_path = run_dir / "direction.safetensors"
    if not direction_path.is_file():
        raise RefusalError(f"'{run_dir}' has no direction.safetensors: no direction was selected yet.",
                           f"Run `refusal select --config {cfg_path}` (or `refusal run`) first.")
    return cfg, Direction.load(direction_path)


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
        arch = reader.get_field("general.architecture").contents()
        return (arch, int(reader.get_field(f"{arch}.block_count").contents()),
                int(reader.get_field(f"{arch}.embedding_length").contents()))
    from transformers import AutoConfig

    from ..models.loading import check_hub_config, resolve_source

    source = resolve_source(spec)
    check_hub_config(source, trust_remote_code)
    cfg = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return str(text.model_type).replace("_", ""), int(text.num_hidden_layers), int(text.hidden_size)


def _card(run_dir: Path, spec: str, direction) -> dict:
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


def register(app: typer.Typer) -> None:
    from .app import _fail, err, out

    @app.command("abliterate")
    def abliterate(
        run_dir: Path = typer.Argument(..., help="A run folder (holds config.yaml and direction.safetensors)."),
        out_path: Path = typer.Option(..., "--out", "-o", help="Output folder (or .gguf file with --gguf)."),
        gguf: bool = typer.Option(False, "--gguf", help="Write one GGUF file instead of a Hugging Face folder."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
        norm_preserving: bool = typer.Option(False, "--norm-preserving",
                                             help="Keep every weight row's norm (heretic's variant; not exact)."),
        device: str = typer.Option(None, help="Where to load the model (default: best available)."),
        dtype: str = typer.Option(None, help="auto, bfloat16, float16, float32 (default: the run's)."),
    ) -> None:
        """Bake the run's refusal direction into the weights and save the edited model."""
        from ..models.loading import load_model

        try:
            cfg, direction = _run_inputs(run_dir)
            spec = str(cfg["model"])
            trust = bool(cfg.get("trust_remote_code") or False)
            source = _gguf_file(spec) if gguf else None
            if gguf and source is not None:  # edit the GGUF file itself: quantization kept, no model load
                from ..export.gguf import edit_gguf

                err.print(f"Editing [bold]{source}[/] (tensors stay quantized) ...")
                res = edit_gguf(source, direction, out_path, overwrite=overwrite, norm_preserving=norm_preserving)
                out.print(f"Wrote [bold]{res.path}[/]: {len(res.edited)} tensors edited"
                          + (f", added {', '.join(res.added)}" if res.added else "")
                          + "".join(f"\n  skipped {k}: {v}" for k, v in res.skipped.items()))
                return
            err.print(f"Loading [bold]{spec}[/] ...")
            model, tokenizer = load_model(spec, device=device, dtype=dtype or cfg.get("dtype"),
                                          trust_remote_code=trust)
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
        except RefusalError as exc:
            _fail(exc)

    @app.command("control-vector")
    def control_vector(
        run_dir: Path = typer.Argument(..., help="A run folder (holds config.yaml and direction.safetensors)."),
        out_path: Path = typer.Option(..., "--out", "-o", help="Output control-vector file (.gguf)."),
        coeff: float = typer.Option(1.0, help="Scale of the vector (activation addition adds coeff · v)."),
        layer: int = typer.Option(None, help="Add at the input of this layer (default: the direction's layer)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    ) -> None:
        """Write the run's direction as a llama.cpp control vector (activation addition; use it with
        llama-cli --control-vector FILE). Ablation cannot be a control vector: use `refusal abliterate`."""
        from ..export.control_vector import write_control_vector

        try:
            cfg, direction = _run_inputs(run_dir)
            hint, n_layers, hidden = _model_shape(str(cfg["model"]), bool(cfg.get("trust_remote_code") or False))
            path = write_control_vector(direction, out_path, n_layers=n_layers, model_hint=hint, layer=layer,
                                        coeff=coeff, hidden_size=hidden, overwrite=overwrite)
            used = direction.layer if layer is None else layer
            out.print(f"Wrote [bold]{path}[/]: {coeff:g} × direction added at the input of layer {used} "
                      f"(llama.cpp direction.{used - 1}, after block {used - 1})")
        except RefusalError as exc:
            _fail(exc)
