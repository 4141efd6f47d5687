"""How alike the languages' refusal directions are: cosine between the selected directions, and layer by layer
between the candidates at one position.

The selected directions may sit at different layers; their cosine compares them as vectors of the residual stream
all the same (one model, one hidden size). The layer curves hold the position fixed (the reference language's
selected one) and compare, at every layer, the reference's difference in means with each other language's: where
the curve is high the languages' harmful/harmless contrasts point the same way. A layer where a difference is zero
(layer 0, whose input at the post-instruction positions is the same token embeddings for every prompt) has no
direction: its cosine is ``None``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from .. import io
from ..batching import console
from ..directions.base import Direction, DirectionSet
from ..directions.diff_means import Candidates
from ..errors import RefusalError
from ..runs.folder import RunFolder


def _round(x: float, digits: int = 6) -> float | None:
    return None if x != x else round(float(x), digits)  # NaN -> None (JSON has no NaN)


def direction_similarity(directions: Mapping[str, Direction]) -> dict:
    """Cosine similarity between the selected directions of every pair of languages.

    Returns ``{"languages", "cosine": [[...]] (row i, column j: languages i and j), "directions": {lang: {"layer",
    "pos", "norm"}}}``."""
    if not directions:
        raise RefusalError("No directions to compare.", "Give at least one language's selected direction.")
    langs = list(directions)
    sim = DirectionSet(directions.items()).similarity()
    return {"languages": langs,
            "cosine": [[_round(v) for v in row] for row in sim.tolist()],
            "directions": {lang: {"layer": d.layer, "pos": d.pos, "norm": _round(float(d.vectors.norm()), 4)}
                           for lang, d in directions.items()}}


def _cosines(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> list[float | None]:
    """Row-wise cosine of two ``(n, d)`` stacks; ``None`` where either row is (relatively) zero."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(1e-30)
    dead = (na <= eps * na.max().clamp_min(1e-30)) | (nb <= eps * nb.max().clamp_min(1e-30))
    return [None if bool(z) else round(float(c), 6) for c, z in zip(cos, dead)]


def layer_curves(candidates: Mapping[str, Candidates], reference: str, pos: int) -> dict:
    """Per layer, the cosine between ``reference``'s candidate at position ``pos`` and every other language's
    candidate at the same position.

    Returns ``{"reference", "position", "layers": [0..L-1], "curves": {lang: [cosine or None per layer]}}``."""
    if reference not in candidates:
        raise RefusalError(f"No candidates for the reference language '{reference}'.",
                           "Pick a reference among the languages that were run.")
    ref = candidates[reference]
    if pos not in ref.positions:
        raise RefusalError(f"Position {pos} is not among the candidates' positions {ref.positions}.",
                           "Use a post-instruction position the candidates were extracted at.")
    a = ref.diffs[ref.positions.index(pos)]
    curves = {}
    for lang, c in candidates.items():
        if lang == reference:
            continue
        if c.n_layers != ref.n_layers or c.diffs.shape[-1] != ref.diffs.shape[-1] or pos not in c.positions:
            raise RefusalError(f"The candidates of '{lang}' and '{reference}' have different shapes (layers, hidden "
                               "size or positions): they do not come from the same model and template.",
                               "Run every language with the same model and system prompt.")
        curves[lang] = _cosines(a, c.diffs[c.positions.index(pos)])
    return {"reference": reference, "position": pos, "layers": list(range(ref.n_layers)), "curves": curves}


def candidate_similarity(candidates: Mapping[str, Candidates], pos: int, layer: int) -> list[list[float | None]]:
    """Cosine between every pair of languages' candidates at one (position, layer): the same place in the model for
    every language, unlike the selected directions."""
    langs = list(candidates)
    rows = torch.stack([candidates[lang].diffs[candidates[lang].positions.index(pos), layer] for lang in langs])
    out = []
    for i in range(len(langs)):
        out.append(_cosines(rows[i].expand_as(rows), rows))
    return out


# ---- the stage ---------------------------------------------------------------------------------------------------

def reference_language(languages: list[str]) -> str:
    """The language the layer curves compare with: English, else the first by resource level."""
    from .plots import resource_order

    return "en" if "en" in languages else resource_order(languages)[0][0]


def similarity_stage(root: RunFolder, languages: list[str], *, force: bool) -> dict:
    """Stage 4 of a cross-lingual run: the cosine matrix of the selected directions of ``languages`` (those with a
    direction) and the layer curves against the reference language's candidates, from their folders
    ``root/<lang>/``; writes ``similarity.json``."""
    from ..config import digest
    from .inputs import direction_sha, file_sha

    folders = {lang: RunFolder(root.path / lang) for lang in languages}
    reference = reference_language(languages)
    inputs = {lang: {"direction": direction_sha(f.file("direction.safetensors")),
                     "candidates": file_sha(f.file("candidates.safetensors"))} for lang, f in folders.items()}
    dig = digest({"stage": "similarity", "languages": languages, "reference": reference, "inputs": inputs})
    if not force and root.manifest("similarity", dig):
        console.print("[dim]similarity: finished earlier, skipped[/]")
        return root.read_json("similarity.json")
    started = time.perf_counter()
    dirs = {lang: f.load("direction.safetensors", Direction.load) for lang, f in folders.items()}
    cands = {lang: f.load("candidates.safetensors", Candidates.load) for lang, f in folders.items()}
    ref = dirs[reference]
    out = direction_similarity(dirs)
    out["layer_curves"] = layer_curves(cands, reference, ref.pos)
    out["at_reference_candidate"] = {"reference": reference, "pos": ref.pos, "layer": ref.layer,
                                     "cosine": candidate_similarity(cands, ref.pos, ref.layer)}
    io.write_json(root.file("similarity.json"), out)
    root.write_manifest("similarity", dig, time.perf_counter() - started, ["similarity.json"])
    return out
