"""What every stage of a cross-lingual run shares: the run's state (set by the constructor of
:class:`refusal.crosslingual.runs.Crosslingual`), the ``<stage>.done.json`` manifests that let a finished stage be
skipped, and the run's warnings.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import io
from ..batching import console
from ..config import RunConfig
from ..models.loading import ModelSource
from ..runs.pipeline import Run
from .inputs import Pool


class Manifests:
    """The base of the stage classes :class:`refusal.crosslingual.runs.Crosslingual` is made of: the state the
    constructor sets, and the manifest and warning helpers every stage uses."""

    cfg: RunConfig
    source: ModelSource
    polyrefuse: str | None
    paper: str | None
    files: dict[str, dict[str, str]]
    max_flagged: float
    allow_flagged: bool
    force: bool
    languages: list[str]
    phrases: dict[str, dict]
    sizes: dict[str, int]
    pools: dict[tuple[str, str], Pool]
    chosen: dict[tuple[str, str], dict[str, list[dict]]]
    translator: Any
    dir: Path
    base: Run
    warnings: list[str]
    echo_warnings: bool
    learn_mode: str
    phrase_translator: Any
    _sets: dict | None

    def _done(self, path: Path, dig: str) -> bool:
        if self.force or not path.is_file():
            return False
        return io.read_json(path).get("digest") == dig

    @staticmethod
    def _finish(path: Path, stage: str, dig: str, seconds: float, outputs: list[str], extra: dict | None = None):
        io.write_json(path, {"stage": stage, "digest": dig, "seconds": round(seconds, 2),
                             "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "outputs": outputs, **(extra or {})})

    def _warn(self, text: str) -> None:
        if text in self.warnings:
            return
        self.warnings.append(text)
        if self.echo_warnings:
            console.print(f"[yellow]Warning:[/] {text}")
