"""``refusal report RUN_DIR [--out DIR]``: one self-contained HTML page and a Markdown summary of a run."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import RefusalError


def register(app: typer.Typer) -> None:
    from ..runs.folder import holding_lock
    from .app import _fail, out

    @app.command("report")
    @holding_lock("run_dir", read_only_ok=True)
    def report(
        run_dir: Path = typer.Argument(..., help="A finished run folder (holds summary.json)."),
        out_dir: Path = typer.Option(None, "--out", "-o", help="Folder for report.html and report.md "
                                                               "(default: RUN_DIR/report)."),
    ) -> None:
        """Write the run's report: report.html (one file: tables, heatmaps, completions side by side) and report.md."""
        from ..report import write_report

        try:
            html_path, md_path = write_report(run_dir, out_dir)
        except RefusalError as exc:
            _fail(exc)
        out.print(f"Report: {html_path}\nSummary: {md_path}")
