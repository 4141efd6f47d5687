"""``refusal sets``: search (or score) sets of a run's ranked directions, ablated together.

Reads a run folder after ``select``: the ranked candidates (``scores.json`` "ranked", vectors from
``candidates.safetensors``) and the validation splits; writes ``sets.json`` and ``sets.png`` (the search) and saves
the best set as the run's direction ``"set"`` (a ``(k, d)`` basis; ``/ablate set`` in ``refusal chat``, conditions
that name ``set``) in its own artifact, ``sets.safetensors``, with its own manifest ``sets.done.json`` (its options
and the extract and select manifests it read: a select run again makes it stale). Select's files are only read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..errors import RefusalError

if TYPE_CHECKING:
    from rich.console import Console

    from ..directions.base import Direction
    from ..scoring.sets import SetSearch


def ranked_candidates(run_dir: Path) -> tuple[list[tuple[int, int]], list[Direction]]:
    """``(ranked [(pos, layer)], candidate Directions in rank order)`` of a run folder after ``select``."""
    from ..directions.base import Direction
    from ..directions.diff_means import Candidates
    from ..runs.folder import RunFolder

    run_dir = Path(run_dir)
    rf = RunFolder(run_dir)
    rf.read_config(complete=False)
    scores = rf.read_json("scores.json") if rf.file("scores.json").is_file() else {}
    have = all((run_dir / f).is_file() for f in ("candidates.safetensors", "direction.safetensors",
                                                  "select.done.json"))
    if not have or "ranked" not in scores:
        raise RefusalError(f"The run in '{run_dir}' has no finished select stage (no ranked directions).",
                           f"Run `refusal select {run_dir}` (or `refusal run {run_dir}`) first.")
    rf.verify("select", rf.manifest("select") or {})  # what it reads of select's is what select wrote
    ranked = [(int(r["pos"]), int(r["layer"])) for r in scores["ranked"]]
    if not ranked:
        raise RefusalError(f"No candidate of the run in '{run_dir}' passed the selection filters.",
                           "Loosen select.kl_threshold / select.induce_threshold and redo select.")
    cands = rf.load("candidates.safetensors", Candidates.load)
    selected = rf.selected_direction()
    positions = scores.get("positions") or cands.positions
    out = []
    for pos, layer in ranked:
        if pos not in cands.positions or not 0 <= layer < cands.n_layers:
            raise RefusalError(f"scores.json ranks position {pos}, layer {layer}, which candidates.safetensors "
                               "lacks: the files come from different runs.", f"Redo select: refusal select {run_dir}")
        sc = {}
        if pos in positions:
            i = positions.index(pos)
            for key in ("bypass", "induce", "kl"):
                v = scores[key][i][layer] if key in scores else None
                if v is not None:
                    sc[key] = float(v)
        out.append(Direction(cands.direction(pos, layer).vectors, layer, pos, selected.model, "diff_means", sc,
                             selected.data_digest))
    return ranked, out


def register(app: typer.Typer) -> None:
    from ..runs.folder import holding_lock
    from .app import _fail, err, out

    @app.command("sets")
    @holding_lock("run_dir")
    def sets(
        run_dir: Path = typer.Argument(..., help="A run folder after select."),
        k: int = typer.Option(3, "--k", help="Largest set size to search."),
        beam: int = typer.Option(1, "--beam", help="Sets kept at each size (1: greedy)."),
        pool: int = typer.Option(16, "--pool", help="Search among the top POOL ranked directions."),
        directions: list[str] = typer.Option(None, "--directions", "-d",
                                             help="Only score this set of ranks (0-2, 0,3,5); repeat for more sets."),
        kl_weight: float = typer.Option(0.0, help="Objective: bypass + KL_WEIGHT x KL (the paper: 0)."),
        save: bool = typer.Option(True, "--save/--no-save",
                                  help="Save the best set as the run's direction 'set' (sets.safetensors)."),
        device: str = typer.Option(None, help="cuda, cpu, ... (default: the run's, else best available)."),
        batch_size: int = typer.Option(None, help="Sequences per forward (default: from the device)."),
        allow_network: bool = typer.Option(False, "--allow-network",
                                           help="Let the run's saved config name a hub model or server (never "
                                                "without this flag)."),
    ) -> None:
        """Find the set of a run's ranked directions whose joint ablation bypasses refusal best (beam search), or
        score given sets; writes sets.json, sets.png and the best set as "set" in sets.safetensors."""
        import time

        from .. import io
        from ..directions.base import parse_ranks
        from ..runs.pipeline import Run
        from ..scoring.sets import plot_pareto, score_sets, search_sets

        try:
            for flag, v in (("--k", k), ("--beam", beam), ("--pool", pool)):
                if v < 1:
                    raise RefusalError(f"{flag} must be at least 1 (got {v}).",
                                       "e.g. --k 3 --beam 4 --pool 16 (the defaults: 3, 1, 16).")
            run_dir = Path(run_dir)
            ranked, cands = ranked_candidates(run_dir)
            searched = min(pool, len(cands))
            if not directions and k > searched:  # capped, and said so before the model loads
                among = f"--pool {pool}" if pool <= len(cands) else f"all {len(cands)} directions the run ranks"
                err.print(f"[yellow]Note:[/] --k {k} is capped at {searched}: a set holds at most the {searched} "
                          f"directions searched ({among}), so sets of 1 to {searched} are scored.")
            given = [parse_ranks(spec, len(cands)) for spec in directions or []]
            overrides = {k_: v for k_, v in (("device", device), ("batch_size", batch_size)) if v is not None}
            run = Run.open(run_dir, overrides, allow_network=allow_network)
            splits = run.folder.read_json("splits.json", keys=("harmful", "harmless"))
            hv, bv = run.prompts(splits["harmful"]["val"]), run.prompts(splits["harmless"]["val"])
            s = run.cfg.select
            opts: dict[str, Any] = {"kl_threshold": s.kl_threshold, "induce_threshold": s.induce_threshold,
                                    "kl_weight": kl_weight, "batch_size": run.score_batch_size}
            started = time.perf_counter()
            if given:
                res = score_sets(run.model, run.tokenizer, cands, given, hv, bv, run.refusal_ids(), **opts)
            else:
                if pool > len(cands) and k <= searched:
                    err.print(f"The run ranks {len(cands)} directions: searching all of them (--pool {pool}).")
                res = search_sets(run.model, run.tokenizer, cands, hv, bv, run.refusal_ids(), k_max=k, beam=beam,
                                  pool=pool, **opts)
            io.write_json(run_dir / "sets.json", res.to_json())
            plot_pareto(res, run_dir / "sets.png", title=f"{run.cfg.model}: direction sets")
            print_sets(res, out, only_kept=not given)
            best = res.best
            if best is None:
                err.print(f"[yellow]No set passed the filters (KL < {s.kl_threshold}, induce > "
                          f"{s.induce_threshold}); nothing saved.[/]")
            elif save:
                options = {"k": k, "beam": beam, "pool": pool, "directions": [list(g) for g in given] or None,
                           "kl_weight": kl_weight, "kl_threshold": s.kl_threshold,
                           "induce_threshold": s.induce_threshold}
                run.folder.write_sets(res.direction(best), options, res.to_json()["best"],
                                      time.perf_counter() - started)
                out.print(f"Saved ranks {{{', '.join(map(str, best.members))}}} as [bold]set[/] in "
                          f"{run.folder.file('sets.safetensors')} (refusal chat {run_dir} then /ablate set)")
            out.print(f"Wrote {run_dir / 'sets.json'} and {run_dir / 'sets.png'}")
        except RefusalError as exc:
            _fail(exc)


def print_sets(res: SetSearch, console: Console, only_kept: bool = True) -> None:
    """One row per set: the kept sets of each size (or every given set), best first within a size."""
    from rich.table import Table

    front = {s.members for s in res.pareto()}
    best = res.best
    t = Table(title=f"Direction sets (baseline refusal score: harmful {res.baseline_harmful:+.3f}, harmless "
                    f"{res.baseline_harmless:+.3f}; filters KL < {res.kl_threshold:g}, induce > "
                    f"{res.induce_threshold:g})")
    for col in ("size", "ranks", "(pos, layer)", "bypass", "induce", "KL", ""):
        t.add_column(col, justify="right" if col in ("size", "bypass", "induce", "KL") else "left")
    rows = res.ordered()
    if only_kept and res.kept:
        keep = {m for ms in res.kept.values() for m in ms}
        rows = [s for s in rows if s.members in keep]
    for s in sorted(rows, key=lambda s: (s.size, res.key(s))):
        c = [res.candidates[i] for i in s.members]
        notes = (["best"] if best is not None and s.members == best.members else []) + \
            (["front"] if s.members in front else []) + ([] if s.passes else ["fails filters"])
        t.add_row(str(s.size), ",".join(map(str, s.members)), " ".join(f"({d.pos}, {d.layer})" for d in c),
                  f"{s.bypass:+.3f}", f"{s.induce:+.3f}", f"{s.kl:.4f}", ", ".join(notes))
    console.print(t)
