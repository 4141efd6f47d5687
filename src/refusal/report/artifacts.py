"""The files of a run folder as the report reads them: each read once, a missing optional one None and an
unreadable one listed as a problem (shown at the end of the report) rather than fatal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import io


class Artifacts:
    """The files of a run folder, each read once; optional ones that are missing or unreadable are None (unreadable
    ones are listed in ``problems`` and shown in the report)."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.problems: list[str] = []

    def json(self, name: str) -> Any:
        return self._read(name, io.read_json)

    def yaml(self, name: str) -> Any:
        return self._read(name, io.read_yaml)

    def _read(self, name: str, read: Callable[[Path], Any]) -> Any:
        p = self.dir / name
        if not p.is_file():
            return None
        try:
            return read(p)
        except Exception as exc:  # noqa: BLE001 (a broken optional file is reported, not fatal)
            self.problems.append(f"{name}: {exc}")
            return None

    def png(self, name: str) -> bytes | None:
        p = self.dir / name
        if not p.is_file():
            return None
        data = p.read_bytes()
        if not data.startswith(b"\x89PNG"):
            self.problems.append(f"{name}: not a PNG file")
            return None
        return data
