"""What the report says, independent of its format: a run folder's artifacts read into a :class:`Report` of
sections and blocks (tables, images, texts, completions), which :mod:`.html` and :mod:`.markdown` render.

Every model-written or user-written string stays a plain ``str`` here; the renderers escape it.

:func:`build` assembles the report; the pieces live beside it: the blocks in :mod:`.blocks`, the run folder's
files in :mod:`.artifacts`, the sections in :mod:`.evaluation`, :mod:`.selection`, :mod:`.provenance` and
:mod:`.crosslingual`, any JSON as tables in :mod:`.json_tables` and the value readers in :mod:`.values`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from .. import io
from ..errors import RefusalError
from .artifacts import Artifacts
from .blocks import Card, Code, Completions, Heat, Image, RateCell, Report, Row, Section, Sub, Table, Text, Verdict
from .categories import categories_section
from .crosslingual import crosslingual_section, is_crosslingual_run
from .evaluation import (
    _cards,
    _completions_section,
    _flat_results,
    _generic_section,
    _judges_section,
    _results_section,
)
from .json_tables import generic_blocks
from .provenance import _config_section, _total_seconds
from .selection import _direction_section, _scores_section, _selected_text
from .values import _dig, is_rate


def build(run_dir: str | Path) -> Report:
    """Read a run folder into a :class:`Report`. A folder without ``summary.json`` is an error; every other
    artifact is optional."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RefusalError(f"No run folder at '{run_dir}'.",
                           "Give the folder a run wrote (runs/<model>/ by default).")
    a = Artifacts(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise RefusalError(f"'{run_dir}' has no summary.json: the run has not been evaluated yet.",
                           f"Run `refusal run` first (or `refusal run --resume {run_dir}` to finish this run).")
    try:
        summary = io.read_json(run_dir / "summary.json")
    except (OSError, ValueError) as exc:
        raise RefusalError(f"'{run_dir / 'summary.json'}' cannot be read ({exc}).",
                           f"Redo the evaluation: `refusal run --resume {run_dir} --from-stage evaluate`.") from None
    if not isinstance(summary, dict):
        raise RefusalError(f"'{run_dir / 'summary.json'}' is not a summary (a JSON object).",
                           f"Redo the evaluation: `refusal run --resume {run_dir} --from-stage evaluate`.")
    config = a.yaml("config.yaml")
    config = config if isinstance(config, dict) else {}
    scores = a.json("scores.json")
    scores = scores if isinstance(scores, dict) else None
    stored = summary.get("results")
    results = stored if isinstance(stored, dict) else _flat_results(summary)

    per_language = is_crosslingual_run(summary)  # a `refusal crosslingual` folder: its languages hold the results
    found: list[Section | None] = [
        None if per_language else _results_section(results),
        None if per_language else categories_section(summary, results),
        None if per_language else _direction_section(a, summary, scores, config),
        _scores_section(a, scores, config),
        _judges_section(a),
        _generic_section(a, "ce", "Cross-entropy", "ce.json", None,
                         "Mean loss (nats per predicted token) and perplexity of the model under each condition."),
        _generic_section(a, "benchmarks", "Benchmarks", "benchmarks.json", None,
                         "Benchmark scores under each condition."),
        _generic_section(a, "magnitude", "Magnitude", "magnitude.json", "magnitude.png",
                         "Rates as the intervention's coefficient is varied."),
        crosslingual_section(a, summary),
        _completions_section(a, config),
        _config_section(a, summary, config),
    ]
    sections = [s for s in found if s is not None and s.blocks]
    if a.problems:
        sections.append(Section("problems", "Unreadable files",
                                [Text("These files exist but could not be read; their sections are left out.",
                                      "warn"), Table(["file and error"], [[p] for p in a.problems], kind="kv")]))

    model = str(summary.get("model") or config.get("model") or run_dir.name)
    if "/" in model and Path(model).exists():  # a local folder or file: its name (the full path is in the config)
        model = Path(model).name
    facts = [(k, str(v)) for k, v in (
        ("preset", summary.get("preset") or config.get("preset")),
        ("device", summary.get("device")),
        ("dtype", summary.get("dtype")),
        ("new tokens", summary.get("max_new_tokens") or _dig(config, "generate", "max_new_tokens")),
        ("selected", _selected_text(summary, scores)),
        ("stage time", _total_seconds(summary)),
    ) if v not in (None, "")]
    return Report(f"Refusal direction report: {model}", facts, _cards(results), sections,
                  datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


__all__ = ["Artifacts", "Card", "Code", "Completions", "Heat", "Image", "RateCell", "Report", "Row", "Section", "Sub",
           "Table", "Text", "Verdict", "build", "generic_blocks", "is_rate"]
