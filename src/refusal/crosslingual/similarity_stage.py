"""Stage 4 of a cross-lingual run: the cosines between the languages' selected directions and the layer curves against
the reference language's candidates (computed by :mod:`.similarity`); ``similarity.json``.
"""

from __future__ import annotations

import time

from .. import io
from ..batching import console
from ..config import digest
from .inputs import direction_sha, file_sha
from .language_stage import LanguageStage


class SimilarityStage(LanguageStage):
    """The similarity stage: :meth:`similarity`, against the language :attr:`reference`."""

    @property
    def reference(self) -> str:
        """The language the layer curves compare with: English, else the first by resource level."""
        from .plots import resource_order

        sources = self.sources()
        return "en" if "en" in sources else resource_order(sources)[0][0]

    def similarity(self) -> dict:
        """Cosine matrix of the selected directions and the layer curves; writes ``similarity.json``."""
        from ..directions.base import Direction
        from ..directions.diff_means import Candidates
        from .similarity import candidate_similarity, direction_similarity, layer_curves

        path, done_path = self.dir / "similarity.json", self.dir / "similarity.done.json"
        langs = self.sources()  # cosines between the languages that have a direction
        inputs = {lang: {"direction": direction_sha(self.dir / lang / "direction.safetensors"),
                         "candidates": file_sha(self.dir / lang / "candidates.safetensors")} for lang in langs}
        dig = digest({"stage": "similarity", "languages": langs, "reference": self.reference, "inputs": inputs})
        if self._done(done_path, dig):
            console.print("[dim]similarity: finished earlier, skipped[/]")
            return io.read_json(path)
        started = time.perf_counter()
        dirs = {lang: Direction.load(self.dir / lang / "direction.safetensors") for lang in langs}
        cands = {lang: Candidates.load(self.dir / lang / "candidates.safetensors") for lang in langs}
        ref = dirs[self.reference]
        out = direction_similarity(dirs)
        out["layer_curves"] = layer_curves(cands, self.reference, ref.pos)
        out["at_reference_candidate"] = {"reference": self.reference, "pos": ref.pos, "layer": ref.layer,
                                         "cosine": candidate_similarity(cands, ref.pos, ref.layer)}
        io.write_json(path, out)
        self._finish(done_path, "similarity", dig, time.perf_counter() - started, ["similarity.json"])
        return out
