"""Stage 5 of a cross-lingual run: the heatmaps and layer curves (drawn by :mod:`.plots`) from ``transfer.json`` and
``similarity.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import io
from ..batching import console
from ..config import digest
from .inputs import file_sha
from .manifests import Manifests


class PlotStage(Manifests):
    """The plots stage: :meth:`plots`, writing the files named in :attr:`PLOTS`."""

    PLOTS = ("transfer_ablation.png", "transfer_addition.png", "transfer_kl.png", "similarity.png",
             "layer_similarity.png")

    def plots(self) -> list[Path]:
        from .plots import plot_all

        done_path = self.dir / "plots.done.json"
        dig = digest({"stage": "plots", "transfer": file_sha(self.dir / "transfer.json"),
                      "similarity": file_sha(self.dir / "similarity.json")})
        paths = [self.dir / p for p in self.PLOTS]
        if self._done(done_path, dig) and all(p.is_file() for p in paths):
            console.print("[dim]plots: finished earlier, skipped[/]")
            return paths
        started = time.perf_counter()
        paths = plot_all(self.dir, io.read_json(self.dir / "transfer.json"), io.read_json(self.dir / "similarity.json"))
        self._finish(done_path, "plots", dig, time.perf_counter() - started, [p.name for p in paths])
        return paths
