"""``refusal crosslingual``: one refusal direction per language, the transfer matrix and the similarity of the
directions (see :mod:`refusal.crosslingual` for the stages and the output folder)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..errors import RefusalError

if TYPE_CHECKING:
    from rich.console import Console

    from ..crosslingual.runs import CrosslingualResult

# ISO 639-1: every two-letter language code
ISO_639_1 = frozenset("""
aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee el en eo
es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki
kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr
nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th
ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu""".split())


def known_languages(polyrefuse: Path | None = None, files: str | None = None) -> frozenset[str]:
    """The language codes ``--languages`` takes without ``--allow-unknown-language``: ISO 639-1, the codes the
    package's translation and phrase data know, and the languages the given sources hold (``--files`` keys, a
    PolyRefuse folder's ``<kind>_<split>_<lang>.json``)."""
    from ..crosslingual.inputs import parse_files
    from ..translate import LANGUAGE_NAMES, PHRASE_LANGUAGES
    from ..translate.checks import LANGUAGE_SCRIPTS

    known = set(ISO_639_1) | set(LANGUAGE_NAMES) | set(PHRASE_LANGUAGES) | set(LANGUAGE_SCRIPTS)
    if files:
        known |= {lang.lower() for lang in parse_files(files)}
    if polyrefuse is not None and Path(polyrefuse).is_dir():
        known |= {p.stem.rsplit("_", 1)[-1].lower().replace("_", "-") for p in Path(polyrefuse).glob("*_*_*.json")}
    return frozenset(known)


def check_languages(languages: str | None, *, allow_unknown: bool = False, polyrefuse: Path | None = None,
                    files: str | None = None) -> None:
    """Refuse, before any work, a ``--languages`` code that is neither known (:func:`known_languages`; a regional
    form such as ``pt-br`` counts by its base) nor allowed with ``--allow-unknown-language``."""
    from ..crosslingual.inputs import parse_languages

    codes = parse_languages(languages)
    if not codes or allow_unknown:
        return
    known = known_languages(polyrefuse, files)
    unknown = [c for c in codes if c not in known and c.split("-")[0] not in known]
    if unknown:
        raise RefusalError(
            f"Unknown language code(s) in --languages: {', '.join(unknown)} (not ISO 639-1, and not a language the "
            "package's data or the given sources know).",
            "Correct the code (e.g. --languages en,fr,de,sw), or pass --allow-unknown-language to use it anyway "
            "(it is then translated into and judged as given).")


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


def print_result(result: CrosslingualResult, out: Console) -> None:
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
    def rate(s: str, t: str) -> str:
        c = tr["ablation_non_refusal"][idx[s]][idx[t]]
        return "—" if c is None or c["rate"] is None else f"{c['rate']:.2f}"

    for source in order:
        m.add_row(source, *(rate(source, t) for t in order))
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
        allow_unknown_language: bool = typer.Option(False, "--allow-unknown-language",
                                                    help="Accept --languages codes that are not ISO 639-1 or known to "
                                                         "the package's data."),
    ) -> None:
        """Find the refusal direction in every language, apply each to every other language's prompts, and compare
        the directions (heatmaps and JSON in the output folder)."""
        from ..config import resolve
        from ..crosslingual.runs import Crosslingual

        try:
            check_languages(languages, allow_unknown=allow_unknown_language, polyrefuse=polyrefuse, files=files)
            cfg = resolve(config, _overrides(model=model, output=output, name=name, device=device, dtype=dtype,
                                              filter=filter))
            run = Crosslingual(cfg, languages, polyrefuse=polyrefuse, paper=paper, files=files, translator=translator,
                               max_flagged=max_flagged, allow_flagged=allow_flagged, force=force,
                               echo_warnings=False, learn_openings=learn_openings)  # printed once, after the tables
            err.print(f"Cross-lingual run in [bold]{run.dir}[/] (model {cfg.model}; languages "
                      f"{', '.join(run.languages)})")
            result = run.run()  # holds the folder's lock
            print_result(result, out)
        except RefusalError as exc:
            _fail(exc)
