"""``refusal crosslingual``: one refusal direction per language, the transfer matrix and the similarity of the
directions (see :mod:`refusal.crosslingual` for the stages and the output folder)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import RefusalError


def _cell(c: dict | None) -> str:
    if not c or c.get("rate") is None:
        return "—"
    return f"{c['rate']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"


def _judging(summary: dict) -> str:
    """The list that judged a language, its confidence and (a learned list) its measured agreement and kappa."""
    out = f"{summary.get('phrase_source') or summary.get('phrase_list')}, {summary['judgement_confidence']}"
    a = summary.get("phrase_agreement")
    if a:
        kappa = "-" if a.get("kappa") is None else f"{a['kappa']:.2f}"
        out += f" (agree {a['agree']['rate']:.2f}, κ {kappa})"
    return out


def print_result(result, out) -> None:
    from rich.table import Table

    from ..crosslingual.plots import resource_order

    order, _ = resource_order(result.languages)
    t = Table(title="Per-language runs (each language's own direction)")
    for col in ("language", "selected", "judging", "harmful refusal (baseline)", "harmful non-refusal (ablation)",
                "harmless refusal (actadd)"):
        t.add_column(col, justify="left" if col in ("language", "judging") else "right")
    for lang in order:
        s = result.summaries[lang]
        r = s["results"]
        if s["selected"] is None:  # a target only: no direction of its own
            base = result.transfer["baseline"][lang]["harmful_non_refusal"]
            refused = {"rate": 1 - base["rate"], "low": 1 - base["high"], "high": 1 - base["low"]}
            t.add_row(lang, "no direction", _judging(s), _cell(refused), "—", "—")
            continue
        t.add_row(lang, f"pos {s['selected']['pos']}, layer {s['selected']['layer']}", _judging(s),
                  _cell(r["harmful"]["baseline"]["refusal"]), _cell(r["harmful"]["ablation"]["non_refusal"]),
                  _cell(r["harmless"]["actadd"]["refusal"]))
    out.print(t)
    tr = result.transfer
    idx = {lang: i for i, lang in enumerate(tr["languages"])}
    m = Table(title="Non-refusal rate on the target's harmful prompts, the source's direction ablated "
                    "(rows: source, columns: target)")
    m.add_column("source \\ target")
    low = {lang for lang, c in tr.get("judgement_confidence", {}).items() if c == "low"}
    for lang in order:
        m.add_column(f"{lang}*" if lang in low else lang, justify="right")
    def rate(s, t):
        c = tr["ablation_non_refusal"][idx[s]][idx[t]]
        return "—" if c is None or c["rate"] is None else f"{c['rate']:.2f}"

    for s in order:
        m.add_row(s, *(rate(s, t) for t in order))
    out.print(m)
    if low:
        out.print("* judged with a low-confidence phrase list: non-refusal rates there are upper bounds.")
    for w in result.warnings:
        out.print(f"[yellow]Warning:[/] {w}")
    out.print(f"Results in [bold]{result.out_dir}[/]: transfer.json, similarity.json, "
              + ", ".join(p.name for p in result.plots))


def register(app: typer.Typer) -> None:
    from .app import _fail, _overrides, err, out

    @app.command("crosslingual")
    def crosslingual_command(
        model: str = typer.Option(None, "--model", "-m", help="Catalog name, .gguf file, HF folder or hub id."),
        languages: str = typer.Option(None, "--languages", "-l",
                                      help="Language codes, comma-separated (default: the sources' languages, else "
                                           "en,fr,es,de,ru,zh,th,sw,am)."),
        polyrefuse: Path = typer.Option(None, "--polyrefuse",
                                        help="Folder laid out like PolyRefuse (harmful_train_fr.json, ...)."),
        paper: Path = typer.Option(None, "--paper", help="Folder laid out like the paper's splits: English train/val "
                                                         "for --polyrefuse, or alone the English prompts to "
                                                         "translate."),
        files: str = typer.Option(None, "--files", help="Per-language files: lang=path (harmful), "
                                                        "lang:harmless=path, comma-separated."),
        translator: str = typer.Option(None, "--translator",
                                       help="local (the run's model, default), google, or another model to translate "
                                            "the built-in sets with."),
        max_flagged: float = typer.Option(0.1, "--max-flagged",
                                          help="Largest share of flagged translations a language may have."),
        allow_flagged: bool = typer.Option(False, "--allow-flagged",
                                           help="Go on even where more translations are flagged."),
        output: str = typer.Option(None, "--output", "-o", help="Runs root folder (default runs/)."),
        name: str = typer.Option(None, help="Folder name (default: <model alias>-crosslingual)."),
        config: Path = typer.Option(None, "--config", "-c", help="YAML config file (sizes, seed, selection, ...)."),
        device: str = typer.Option(None, help="cuda, cuda:1, cpu, mps (default: best available)."),
        dtype: str = typer.Option(None, help="auto, bfloat16, float16, float32."),
        filter: bool = typer.Option(None, "--filter/--no-filter",
                                    help="Keep train/val prompts by baseline refusal, per language (default: the "
                                         "preset's)."),
        learn_openings: str = typer.Option("missing", "--learn-openings",
                                           help="Learn refusal tokens and phrases from the model's own contrast: "
                                                "missing (languages without a shipped list), all (every language, "
                                                "shipped lists hidden) or never."),
        force: bool = typer.Option(False, "--force", help="Redo every stage."),
    ) -> None:
        """Find the refusal direction in every language, apply each to every other language's prompts, and compare
        the directions (heatmaps and JSON in the output folder)."""
        from ..config import resolve
        from ..crosslingual.runs import Crosslingual

        try:
            cfg = resolve(config, _overrides(model=model, output=output, name=name, device=device, dtype=dtype,
                                              filter=filter))
            run = Crosslingual(cfg, languages, polyrefuse=polyrefuse, paper=paper, files=files, translator=translator,
                               max_flagged=max_flagged, allow_flagged=allow_flagged, force=force,
                               echo_warnings=False, learn_openings=learn_openings)  # printed once, after the tables
            err.print(f"Cross-lingual run in [bold]{run.dir}[/] (model {cfg.model}; languages "
                      f"{', '.join(run.languages)})")
            from ..runs.folder import RunFolder

            with RunFolder(run.dir).lock():
                result = run.run()
            print_result(result, out)
        except RefusalError as exc:
            _fail(exc)
