"""The report's cross-lingual section.

Two sources, both optional:

* a ``refusal crosslingual`` folder itself (``summary.json`` with ``languages_summary``, ``transfer.json``,
  ``similarity.json`` and the heatmaps the run drew): a table of each language's rates, the transfer matrices (source
  language's direction × target language's prompts) and the cosine similarity of the selected directions as
  colour-coded grids, then the heatmap PNGs;
* a run folder's ``crosslingual/`` subfolder: any ``{title, rows, cols, values}`` JSON drawn as a grid, every PNG
  embedded.
"""

from __future__ import annotations

from typing import Any

from ..crosslingual.plots import PLOTS  # the pictures a cross-lingual run draws (named where they are drawn)
from .artifacts import Artifacts
from .blocks import Image, Section, Sub, Table, Text
from .json_tables import _heat_rows, generic_blocks
from .values import _rate_cell, is_rate

# transfer.json's matrices: key, title, what a cell is
TRANSFER = (
    ("ablation_non_refusal", "Non-refusal on the target's harmful prompts, source's direction ablated",
     "share answered without refusal (higher: the direction transfers)"),
    ("addition_refusal", "Refusal on the target's harmless prompts, source's direction added",
     "share refused (higher: the direction induces refusal there)"),
    ("ablation_kl", "First-token KL on the target's harmless prompts, source's direction ablated",
     "mean KL(baseline || ablated) (lower: less damage)"),
)
LANGUAGE_RATES = (
    ("harmful_baseline_refusal", "harmful: baseline refusal", "refusal"),
    ("harmful_ablation_non_refusal", "harmful: ablation non-refusal", "non_refusal"),
    ("harmless_baseline_refusal", "harmless: baseline refusal", "refusal"),
    ("harmless_actadd_refusal", "harmless: ActAdd refusal", "refusal"),
)


def is_crosslingual_run(summary: Any) -> bool:
    """Whether ``summary`` is a ``refusal crosslingual`` folder's summary (per-language results, no conditions)."""
    return isinstance(summary, dict) and isinstance(summary.get("languages_summary"), dict)


def crosslingual_section(a: Artifacts, summary: dict) -> Section | None:
    s = Section("crosslingual", "Cross-lingual")
    if is_crosslingual_run(summary):
        s.blocks += _languages(summary["languages_summary"])
        s.blocks += _transfer(a.json("transfer.json"))
        s.blocks += _similarity(a.json("similarity.json"))
        for name in PLOTS:
            png = a.png(name)
            if png:
                s.blocks += [Sub(name.removesuffix(".png").replace("_", " ")), Image(png, name, name)]
    folder = a.dir / "crosslingual"
    if folder.is_dir():
        for p in sorted(folder.glob("*.json")):
            data = a.json(f"crosslingual/{p.name}")
            if data is None:
                continue
            title = data.get("title") if isinstance(data, dict) else None
            if not isinstance(title, str):
                title = p.stem
            s.blocks += [Sub(title)] + generic_blocks(data)
        for p in sorted(folder.glob("*.png")):
            png = a.png(f"crosslingual/{p.name}")
            if png:
                s.blocks += [Sub(p.stem), Image(png, f"cross-lingual: {p.stem}", p.name)]
    return s if s.blocks else None


def _languages(per_language: dict) -> list:
    rows = []
    for lang, res in per_language.items():
        if not isinstance(res, dict):
            continue
        sel = res.get("selected")
        picked = f"({sel['pos']}, {sel['layer']})" if isinstance(sel, dict) and "pos" in sel else "no direction"
        rows.append([lang, picked, res.get("judgement_confidence")]
                    + [_rate_cell(metric, res.get(key)) for key, _, metric in LANGUAGE_RATES])
    if not rows:
        return []
    return [Sub("Each language's own run"),
            Text("The direction selected on each language's prompts, applied to the same language; refusals judged "
                 "with that language's phrases (confidence of the phrase list beside it)."),
            Table(["language", "selected (pos, layer)", "phrases"] + [label for _, label, _ in LANGUAGE_RATES], rows)]


def _value(cell: Any) -> float | None:
    if is_rate(cell):
        return cell["rate"]
    if isinstance(cell, dict) and isinstance(cell.get("mean"), (int, float)):
        return cell["mean"]
    return cell if isinstance(cell, (int, float)) else None


def _transfer(t: Any) -> list:
    if not isinstance(t, dict) or not isinstance(t.get("languages"), list):
        return []
    langs = [str(x) for x in t["languages"]]
    blocks: list = []
    missing = t.get("no_direction") or []
    for key, title, metric in TRANSFER:
        m = t.get(key)
        if not isinstance(m, list) or len(m) != len(langs):
            continue
        values = [[_value(c) for c in (row if isinstance(row, list) else [None] * len(langs))] for row in m]
        blocks += [Sub(title), Text(f"rows: source language (direction); columns: target language (prompts); "
                                    f"cell: {metric}", "note"),
                   _heat_rows(values, langs, langs)]
    if blocks and missing:
        blocks.append(Text(f"No direction in {', '.join(map(str, missing))} (no candidate passed the selection "
                           "filters): those rows are empty, the languages are still targets.", "note"))
    return blocks


def _similarity(sim: Any) -> list:
    if not isinstance(sim, dict) or not isinstance(sim.get("cosine"), list):
        return []
    langs = [str(x) for x in sim.get("languages", [])]
    dirs = sim.get("directions") or {}
    labels = [f"{lang} (L{dirs[lang]['layer']})" if isinstance(dirs.get(lang), dict) and "layer" in dirs[lang]
              else lang for lang in langs]
    return [Sub("Cosine similarity of the selected directions"), _heat_rows(sim["cosine"], labels, langs)]
