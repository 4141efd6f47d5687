"""The run report: one self-contained HTML page and a Markdown summary of a run folder.

>>> html_path, md_path = write_report("runs/qwen2.5-coder-1.5b-instruct")   # → runs/<name>/report/report.html, .md

``refusal report RUN_DIR [--out DIR]`` does the same. The page holds its CSS inline and its figures as base64 PNG,
loads nothing from the network and runs no script (a Content-Security-Policy forbids both), so it can be mailed or
archived as one file. Every string from the run is escaped: completions are untrusted model output.

What it reads (``summary.json`` is required, as written by ``refusal run``; every other file is optional and its
section is simply left out when the file is missing; a file that exists but cannot be read is listed at the end):

* ``summary.json``: ``results`` ``{prompt_set: {condition: {refusal, non_refusal, refusal_score_positive: {count, n,
  rate, low, high}, mean_refusal_score}}}`` (the rates table and the headline: harmful non-refusal and harmless
  refusal, baseline → each intervention), ``stage_seconds``, ``device``, ``dtype``, ``preset``, ``max_new_tokens``.
  An older summary with only the flat ``harmful`` / ``harmless`` rates is read too (no intervals).
* ``config.yaml``: model, preset, data sources and split sizes, select and generate settings, the conditions, and
  ``digests`` (one per stage; ``<stage>.done.json`` tells whether each stage finished with that digest).
* ``scores.json``: ``positions``, ``bypass`` / ``induce`` / ``kl`` grids (position × layer, ``null`` = not
  scored), ``baseline_refusal_score``, ``selected`` ``{pos, layer, bypass, induce, kl, n_passing}``, ``ranked``;
  drawn as heatmaps with the selected cell boxed. ``scores.png`` is embedded as it is.
* ``direction.safetensors``: the selected direction's metadata (method, model identity, data digest, norm).
* ``splits.json``: how many prompts each split held after filtering.
* ``judgements.json`` (else ``completions.json``): ``{prompt_set: {condition: [{instruction, category, completion,
  refused, refusal_score}]}}``: the completions side by side, one row per prompt and one column per condition.

Optional evaluation files, rendered generically (any JSON becomes tables: a mapping of mappings is a table whose
rows are the outer keys and columns the inner keys; deeper mappings get one sub-heading per key; a list of records
is a table; ``{count, n, rate, low, high}`` is a rate with its interval). The expected shapes:

* ``ce.json``: cross-entropy, ``{dataset: {condition: {loss, perplexity, tokens, sequences}}}`` (or without the
  dataset level) — one table per dataset, a row per condition.
* ``benchmarks.json``: ``{benchmark: {condition: {metric: number}}}`` or ``{benchmark: {condition: number}}``.
* ``magnitude.json`` + ``magnitude.png``: a sweep of the intervention's coefficient,
  ``{prompt_set: {coefficient: {metric: number or rate}}}``, or a list of records ``[{coeff, prompt_set, ...}]``.
* ``judges.json``: several judges on the same completions, ``{prompt_set: {condition: {judge: summary}}}`` where a
  summary is :func:`refusal.evaluation.judges.summarize`'s ``{n, failed, rates: {label: rate}}``, a rate, or a
  number — one table per prompt set: a row per condition, a column per judge and label.
* ``crosslingual/*.json`` + ``crosslingual/*.png``: matrices ``{title, rows: [labels], cols: [labels],
  values: [[number]], metric}`` (e.g. direction language × prompt language) drawn as colour-coded grids; every PNG
  in the folder is embedded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .blocks import Report

__all__ = ["build_report", "write_report"]


def build_report(run_dir: str | Path) -> Report:
    """The report's content (:class:`refusal.report.blocks.Report`), before it is rendered."""
    from .sections import build

    return build(run_dir)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` for a run folder into ``out_dir`` (default ``RUN_DIR/report``);
    returns their paths. Raises :class:`refusal.errors.RefusalError` if the folder holds no ``summary.json``."""
    from .. import io
    from . import html, markdown

    report = build_report(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    html_path, md_path = out / "report.html", out / "report.md"
    io.write_text(html_path, html.render(report))
    io.write_text(md_path, markdown.render(report))
    return html_path, md_path
