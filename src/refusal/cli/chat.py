"""``refusal chat``: talk to a model and switch its refusal directions on and off between turns.

``refusal chat RUN_DIR`` loads the run's model and its ``directions.safetensors`` (``selected``, ranks ``0``, ``1``,
…, and ``set`` after ``refusal sets``); ``refusal chat MODEL --direction FILE.safetensors`` takes any model spec and
a direction (or direction set) file. Answers stream as they are generated; commands start with ``/``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..errors import RefusalError

if TYPE_CHECKING:
    from rich.console import Console

    from ..directions.base import DirectionSet
    from ..directions.condition import KeepCondition
    from ..generation.session import ChatSession

HELP = """Commands:
  /ablate SPEC          project out the span of these directions at every layer (SPEC: 0-2, 0,3,5, selected, set)
  /add NAME [--coeff C] add C x the direction at its source layer (C < 0 subtracts; default 1)
  /off                  no intervention (the baseline model)
  /keep on|off          with a conditional keep-refusal run: route each message by the run's condition, answer
                        the ones it keeps without the ablation
  /compare              answer your last message without and with the current intervention, side by side
  /reset                forget the conversation (interventions stay)
  /status               which interventions are on
  /directions           the directions you can name
  /help                 this text
  /quit                 leave (also Ctrl-D)"""


def load_directions(path: Path) -> DirectionSet:
    """A direction set file (``directions.safetensors``) or a single direction file (named ``selected`` and ``0``)."""
    from .. import io
    from ..directions.base import Direction, DirectionSet

    path = Path(path)
    if not path.is_file():
        raise RefusalError(f"No direction file at '{path}'.", "Give a .safetensors file written by refusal select.")
    try:
        _, meta = io.read_tensors(path)
    except RefusalError:  # damaged: named, with its fix
        raise
    except Exception as exc:  # not safetensors at all
        raise RefusalError(f"'{path}' is not a safetensors direction file ({exc.__class__.__name__}).",
                           "Give direction.safetensors or directions.safetensors from a run.") from None
    if "names" in meta:
        return DirectionSet.load(path)
    d = Direction.load(path)
    return DirectionSet([("selected", d), ("0", d)])


def open_target(target: str, direction_file: Path | None, device: str | None, dtype: str | None,
                trust_remote_code: bool = False,
                allow_network: bool = False) -> tuple[Any, Any, DirectionSet, str | None, str]:
    """``(model, tokenizer, directions, system prompt, description)`` for a run folder or a model spec.
    ``trust_remote_code`` (and ``allow_network``, for a run's hub model) come from the caller only, never from the
    run's saved config."""
    from ..directions.base import DirectionSet
    from ..models.loading import load_model
    from ..runs.folder import RunFolder, granted
    from .app import err

    folder = Path(target)
    if folder.is_dir() and (folder / "config.yaml").is_file():
        rf = RunFolder(folder)
        cfg = granted(rf, rf.read_config(complete=False), trust_remote_code, allow_network=allow_network)
        path = direction_file or folder / "directions.safetensors"
        if direction_file is None and not path.is_file():
            raise RefusalError(f"The run in '{folder}' has no directions.safetensors: select has not run.",
                               f"Run `refusal select {folder}` (or `refusal run {folder}`) first.")
        directions = load_directions(path) if direction_file else rf.directions()  # selected, ranks, set
        spec = str(cfg["model"])
        err.print(f"Loading [bold]{spec}[/] (run {folder}) ...")
        model, tok = load_model(spec, device=device or cfg.get("device"), dtype=dtype or cfg.get("dtype"),
                                device_map=cfg.get("device_map"), trust_remote_code=bool(cfg.get("trust_remote_code")))
        return model, tok, directions, cfg.get("system_prompt"), f"{spec}, run {folder}"
    directions = load_directions(direction_file) if direction_file is not None else DirectionSet()
    err.print(f"Loading [bold]{target}[/] ...")
    model, tok = load_model(target, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tok, directions, None, target


def keep_condition(target: Path) -> KeepCondition | None:
    """The keep-refusal condition of a run folder made with the conditional method, or None."""
    from ..runs.keep_refusal import CONDITION_FILE

    path = target / CONDITION_FILE
    if not (target.is_dir() and path.is_file()):
        return None
    from ..directions.condition import KeepCondition

    return KeepCondition.load(path)


def parse_add(args: list[str]) -> tuple[str, float]:
    """``NAME [--coeff C | C]``."""
    name, coeff, rest = None, 1.0, list(args)
    try:
        while rest:
            a = rest.pop(0)
            if a in ("--coeff", "-c"):
                coeff = float(rest.pop(0))
            elif a.startswith("--coeff="):
                coeff = float(a.split("=", 1)[1])
            elif name is None:
                name = a
            else:
                coeff = float(a)
    except (ValueError, IndexError):
        raise RefusalError(f"Cannot read '/add {' '.join(args)}'.", "Write it like /add 0 --coeff 1.5.") from None
    if name is None:
        raise RefusalError("/add needs a direction.", "Write it like /add 0 --coeff 1.5.")
    return name, coeff


def register(app: typer.Typer) -> None:
    from .app import _fail, err

    @app.command("chat")
    def chat(
        target: str = typer.Argument(..., help="A run folder (its model and directions), or a model spec with "
                                               "--direction."),
        directions: str = typer.Option(None, "--directions", help="Start with these directions ablated (0-2, "
                                                                  "0,3,5, selected, set), as /ablate does."),
        direction_file: Path = typer.Option(None, "--direction", help="Direction(s) .safetensors file (for a model "
                                                                      "spec; default for a run: its directions)."),
        system: str = typer.Option(None, help="System prompt (default: the run's)."),
        max_new_tokens: int = typer.Option(256, help="Most tokens per answer."),
        device: str = typer.Option(None, help="cuda, cpu, ... (default: the run's, else best available)."),
        dtype: str = typer.Option(None, help="auto, bfloat16, float16, float32."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                               help="Allow the model's own code (never taken from the run's config)."),
        allow_network: bool = typer.Option(False, "--allow-network",
                                           help="Let the run's saved config name a hub model or server (never "
                                                "without this flag)."),
        keep: bool = typer.Option(False, "--keep-refusal-gate",
                                  help="A run made with --keep-refusal (conditional): start with the selected "
                                       "direction ablated and the run's keep condition routing each message, as "
                                       "/keep on does."),
    ) -> None:
        """Chat with a model; switch refusal directions on and off between turns (/help lists the commands)."""
        from rich.console import Console

        from ..batching import Batching
        from ..generation.session import ChatSession

        try:
            model, tok, dirs, run_system, what = open_target(target, direction_file, device, dtype,
                                                             trust_remote_code, allow_network)
            session = ChatSession(model, tok, dirs, system if system is not None else run_system, max_new_tokens,
                                  batching=Batching(quiet=True),  # no progress bars between the chat's lines
                                  condition=keep_condition(Path(target)))
            if directions:
                session.ablate(directions)
            if keep:
                if not directions:
                    session.ablate("selected")
                session.keep(True)
        except RefusalError as exc:
            _fail(exc)
        console = Console(highlight=False)
        console.print(f"[bold]refusal chat[/] — {what}")
        console.print(f"directions: {', '.join(dirs) or 'none'}; greedy, up to {max_new_tokens} new tokens")
        console.print(f"[dim]{session.status()}[/]  (/help for commands)")
        repl(session, console)
        err.print("bye")


def repl(session: ChatSession, console: Console) -> None:
    """Read lines until /quit or end of input: messages are answered (streamed), commands change the session."""
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not command(session, console, line):
                return
            continue
        console.print("[bold green]assistant>[/] ", end="")
        try:
            for piece in session.send(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        except RefusalError as exc:
            console.print(f"[red]{exc.problem}[/] {exc.fix or ''}")
        sys.stdout.write("\n")
        sys.stdout.flush()
        console.print(f"[dim]({session.status()})[/]")


def command(session: ChatSession, console: Console, line: str) -> bool:
    """Run one /command; False means quit."""
    from rich.markup import escape
    from rich.table import Table

    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    cmd, args = words[0].lower(), words[1:]
    try:
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            console.print(escape(HELP))
        elif cmd == "/ablate":
            if not args:
                raise RefusalError("/ablate needs directions.", "Write it like /ablate 0-2 or /ablate selected.")
            console.print(f"[dim]{session.ablate(''.join(args))}[/]")
        elif cmd == "/add":
            name, coeff = parse_add(args)
            console.print(f"[dim]{session.add(name, coeff)}[/]")
        elif cmd == "/off":
            console.print(f"[dim]{session.off()}[/]")
        elif cmd == "/keep":
            if len(args) != 1 or args[0].lower() not in ("on", "off"):
                raise RefusalError("/keep takes on or off.", "Write /keep on or /keep off.")
            console.print(f"[dim]{session.keep(args[0].lower() == 'on')}[/]")
        elif cmd == "/status":
            console.print(f"[dim]{session.status()}[/]")
        elif cmd == "/reset":
            session.reset()
            console.print("[dim]conversation cleared[/]")
        elif cmd == "/directions":
            t = Table("name", "method", "shape", "pos", "layer", "bypass")
            for name, d in session.directions.items():
                b = d.scores.get("bypass")
                t.add_row(name, d.method, "x".join(map(str, d.vectors.shape)), str(d.pos), str(d.layer),
                          "" if b is None else f"{b:+.3f}")
            console.print(t)
        elif cmd == "/compare":
            console.print("[dim]comparing (both answers in one batch) ...[/]")
            base, changed = session.compare()
            t = Table(show_lines=True, expand=True)
            t.add_column("without (baseline)", ratio=1)
            t.add_column("with: " + session.status().removeprefix("intervention: "), ratio=1)
            t.add_row(escape(base), escape(changed))
            console.print(t)
            console.print("[dim](the two answers are the same)[/]" if base == changed
                          else "[dim](the answers differ)[/]")
        else:
            console.print(f"[red]Unknown command {escape(cmd)}.[/] /help lists the commands.")
    except RefusalError as exc:
        console.print(f"[red]{escape(exc.problem)}[/] {escape(exc.fix or '')}")
    return True
