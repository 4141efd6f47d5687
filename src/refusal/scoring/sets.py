"""Sets of directions: which few candidate directions, ablated together, bypass refusal best.

A set ``S`` of candidate directions is scored as the paper scores one direction, so its numbers compare with the
single candidates of ``select``:

* **bypass** — mean refusal score on the harmful validation prompts with the span of ``S`` (orthonormalised)
  projected out at every layer (input, attention and MLP outputs);
* **induce** — mean refusal score on the harmless validation prompts with every direction of ``S`` added (raw
  vector, coefficient 1) at the input of its own source layer;
* **KL** — mean KL(baseline ‖ ablated) of the last-position distribution on the harmless validation prompts.

The objective is the paper's: among sets with KL < ``kl_threshold`` and induce > ``induce_threshold``, the lowest
bypass (plus ``kl_weight`` × KL, 0 by default). :func:`search_sets` grows sets one direction at a time: greedy
(``beam=1``) keeps the best set of each size, beam search the best ``beam`` sets; every extension of a step is
scored in the same batched forwards through :func:`~refusal.scoring.plans.score_interventions` (one candidate set per
batch row), two calls per step. The best set need not be made of the best single directions: rank 0 and rank 1 may
be nearly parallel, so that the pair removes little more than rank 0 alone. :func:`score_sets` scores given sets.

>>> result = search_sets(model, tok, ranked_directions, harmful_val, harmless_val, refusal_ids, k_max=3, beam=4)
>>> result.best, result.pareto()
>>> plot_pareto(result, "sets.png"); RunFolder("runs/x").write_sets(result.direction(), options, best_row)

In a run folder the best set is the run's own artifact, ``sets.safetensors`` with its manifest
(:meth:`~refusal.runs.folder.RunFolder.write_sets`, what ``refusal sets`` does); :func:`add_to_directions` adds a set
to a direction-set file of your own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..batching import progress
from ..directions.base import Direction, DirectionSet
from ..errors import RefusalError
from ..interventions.hooks import ablation, addition
from ..models.parts import find_parts
from .plans import score_interventions


@dataclass(frozen=True)
class ScoredSet:
    """A set of candidates (indices into the candidate list, ascending) and its scores."""

    members: tuple[int, ...]
    bypass: float
    induce: float
    kl: float
    passes: bool  # KL < threshold and induce > threshold

    @property
    def size(self) -> int:
        return len(self.members)

    def objective(self, kl_weight: float = 0.0) -> float:
        return self.bypass + kl_weight * self.kl


@dataclass
class SetSearch:
    """Every scored set, the sets kept at each size, and the settings of the search."""

    candidates: list[Direction]
    sets: list[ScoredSet]
    kept: dict[int, list[tuple[int, ...]]]  # size -> the sets kept in the beam (best first)
    baseline_harmful: float
    baseline_harmless: float
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    kl_weight: float = 0.0
    beam: int | None = None  # None: given sets were scored, no search
    settings: dict = field(default_factory=dict)

    def key(self, s: ScoredSet) -> tuple[int, float, float]:
        """Sort key, best first: passing sets first, then the objective, then KL."""
        return (0 if s.passes else 1, _nan_last(s.objective(self.kl_weight)), _nan_last(s.kl))

    def ordered(self, sets: Sequence[ScoredSet] | None = None) -> list[ScoredSet]:
        return sorted(self.sets if sets is None else sets, key=self.key)

    @property
    def best(self) -> ScoredSet | None:
        """The best passing set of any size (None if no set passes the filters)."""
        passing = [s for s in self.sets if s.passes]
        return self.ordered(passing)[0] if passing else None

    def best_of_size(self, k: int) -> ScoredSet | None:
        same = [s for s in self.sets if s.size == k and s.passes]
        return self.ordered(same)[0] if same else None

    def get(self, members: Sequence[int]) -> ScoredSet:
        m = tuple(sorted(members))
        for s in self.sets:
            if s.members == m:
                return s
        raise KeyError(m)

    def pareto(self) -> list[ScoredSet]:
        """The sets no other set beats on both bypass and KL (lower is better for both), by increasing KL."""
        pts = [s for s in self.sets if not (math.isnan(s.bypass) or math.isnan(s.kl))]
        front = [s for s in pts if not any(
            o.bypass <= s.bypass and o.kl <= s.kl and (o.bypass < s.bypass or o.kl < s.kl) for o in pts)]
        return sorted(front, key=lambda s: (s.kl, s.bypass))

    def direction(self, s: ScoredSet | Sequence[int] | None = None, ranks: Sequence[int] | None = None) -> Direction:
        """The set as one direction: a ``(k, d)`` basis of the stacked raw vectors, method ``"set"``, with its
        scores and members (default: :attr:`best`). ``ranks`` names the members' ranks (default: their indices)."""
        if s is None:
            s = self.best
            if s is None:
                raise RefusalError(
                    f"No direction set passed the filters (KL < {self.kl_threshold}, induce > "
                    f"{self.induce_threshold}).", "Loosen the thresholds, or score other sets.")
        elif not isinstance(s, ScoredSet):
            s = self.get(s)
        parts = [self.candidates[i] for i in s.members]
        ranks = list(s.members) if ranks is None else [list(ranks)[i] for i in s.members]
        first = parts[0]
        members = [{"rank": r, "pos": p.pos, "layer": p.layer} for r, p in zip(ranks, parts)]
        return Direction(torch.cat([p.vectors for p in parts], dim=-2), None, None, first.model, "set",
                         {"bypass": s.bypass, "induce": s.induce, "kl": s.kl}, first.data_digest,
                         {"members": members, "parts": [p.metadata() for p in parts]})

    def to_json(self, ranks: Sequence[int] | None = None) -> dict:
        """Everything as JSON: candidates (rank, pos, layer), every set, the kept beams, the front, the best."""
        ranks = list(range(len(self.candidates))) if ranks is None else list(ranks)

        def row(s: ScoredSet) -> dict:
            return {"size": s.size, "ranks": [ranks[i] for i in s.members],
                    "members": [{"pos": self.candidates[i].pos, "layer": self.candidates[i].layer}
                                for i in s.members],
                    "bypass": _num(s.bypass), "induce": _num(s.induce), "kl": _num(s.kl), "passes": s.passes}
        best = self.best
        return {
            "settings": {"kl_threshold": self.kl_threshold, "induce_threshold": self.induce_threshold,
                         "kl_weight": self.kl_weight, "beam": self.beam, **self.settings},
            "baseline_refusal_score": {"harmful": self.baseline_harmful, "harmless": self.baseline_harmless},
            "candidates": [{"rank": r, "pos": c.pos, "layer": c.layer} for r, c in zip(ranks, self.candidates)],
            "sets": [row(s) for s in self.ordered()],
            "kept": {str(k): [[ranks[i] for i in m] for m in ms] for k, ms in self.kept.items()},
            "pareto": [row(s) for s in self.pareto()],
            "best": None if best is None else row(best),
        }


def _nan_last(x: float) -> float:
    return float("inf") if math.isnan(x) else x


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def _check(model: Any, candidates: Sequence[Direction]) -> None:
    if not candidates:
        raise RefusalError("No candidate directions to build sets from.", "Give at least one direction.")
    parts = find_parts(model)
    for i, c in enumerate(candidates):
        c.check_model(parts.hidden_size, parts.n_layers)
        if c.per_layer or c.k != 1:
            raise RefusalError(f"Candidate {i} is a basis of shape {tuple(c.vectors.shape)}, not one direction.",
                               "Build sets from single directions (the ranked candidates of a run).")
        if c.layer is None:
            raise RefusalError(f"Candidate {i} has no source layer, so its induce score (activation addition at "
                               "its layer) is undefined.", "Use directions read at a layer (a run's candidates).")


def _score(model: Any, tokenizer: Any, candidates: Sequence[Direction], sets: Sequence[tuple[int, ...]],
           harmful_val: Sequence[str], harmless_val: Sequence[str], refusal_ids: Sequence[int], *, kl_threshold: float,
           induce_threshold: float, batch_size: int, step: str) -> tuple[list[ScoredSet], float, float]:
    """Score many sets at once: one call for the ablations (harmful + harmless prompts: bypass and KL), one for the
    additions (harmless prompts: induce)."""
    nh = len(harmful_val)
    abl = [[ablation(torch.cat([candidates[i].vectors for i in m]))] for m in sets]
    add = [[addition(candidates[i], 1.0) for i in m] for m in sets]
    a = score_interventions(model, tokenizer, list(harmful_val) + list(harmless_val), abl, refusal_ids,
                            batch_size=batch_size, description=f"Scoring {step}: ablation")
    b = score_interventions(model, tokenizer, list(harmless_val), add, refusal_ids, batch_size=batch_size,
                            description=f"Scoring {step}: addition")
    bypass, _ = a.mean(slice(0, nh))
    _, kl = a.mean(slice(nh, None))
    induce, _ = b.mean()
    out = []
    for j, m in enumerate(sets):
        by, ind, k = float(bypass[j]), float(induce[j]), float(kl[j])
        out.append(ScoredSet(tuple(m), by, ind, k, bool(k < kl_threshold and ind > induce_threshold)))
    return out, float(a.baseline[:nh].mean()), float(b.baseline.mean())


def _prompts(harmful_val: Sequence[str], harmless_val: Sequence[str]) -> None:
    if not harmful_val or not harmless_val:
        raise RefusalError("Scoring direction sets needs harmful and harmless validation prompts.",
                           "Give at least one prompt of each kind.")


def score_sets(model: Any, tokenizer: Any, candidates: Sequence[Direction], sets: Sequence[Sequence[int]],
               harmful_val: Sequence[str], harmless_val: Sequence[str], refusal_ids: Sequence[int], *,
               kl_threshold: float = 0.1, induce_threshold: float = 0.0, kl_weight: float = 0.0,
               batch_size: int = 64) -> SetSearch:
    """Bypass, induce and KL of each given set (lists of indices into ``candidates``), in batched forwards."""
    _check(model, candidates)
    _prompts(harmful_val, harmless_val)
    n = len(candidates)
    norm: list[tuple[int, ...]] = []
    for s in sets:
        m = tuple(sorted(set(int(i) for i in s)))
        bad = [i for i in m if not 0 <= i < n]
        if not m or bad:
            raise RefusalError(f"Set {list(s)} names candidates {bad or 'none'} outside 0..{n - 1}.",
                               "Name existing candidates.")
        if m not in norm:
            norm.append(m)
    scored, bh, bl = _score(model, tokenizer, candidates, norm, harmful_val, harmless_val, refusal_ids,
                            kl_threshold=kl_threshold, induce_threshold=induce_threshold, batch_size=batch_size,
                            step="given sets")
    return SetSearch(list(candidates), scored, {}, bh, bl, kl_threshold, induce_threshold, kl_weight, None)


def search_sets(model: Any, tokenizer: Any, candidates: Sequence[Direction], harmful_val: Sequence[str],
                harmless_val: Sequence[str], refusal_ids: Sequence[int], *, k_max: int = 3, beam: int = 1,
                pool: int | None = None, kl_threshold: float = 0.1, induce_threshold: float = 0.0,
                kl_weight: float = 0.0, batch_size: int = 64) -> SetSearch:
    """Greedy (``beam=1``) or beam search over sets of up to ``k_max`` of the first ``pool`` candidates (default:
    all; give them best first, e.g. a run's ranked directions).

    Size 1 scores every candidate of the pool alone; each later step extends every kept set by every candidate it
    lacks and scores all the new sets together. The ``beam`` best of each size (passing sets first, then lowest
    bypass + ``kl_weight`` × KL) are kept and extended."""
    if k_max < 1 or beam < 1 or (pool is not None and pool < 1):
        raise RefusalError(f"k_max, beam and pool must be at least 1 (got {k_max}, {beam}, {pool}).",
                           "Pass positive sizes.")
    n = len(candidates) if pool is None else min(pool, len(candidates))
    _check(model, list(candidates)[:n])
    _prompts(harmful_val, harmless_val)
    res = SetSearch(list(candidates)[:n], [], {}, float("nan"), float("nan"), kl_threshold, induce_threshold,
                    kl_weight, beam, {"k_max": k_max, "pool": n})
    seen: set[tuple[int, ...]] = set()
    frontier: list[tuple[int, ...]] = [()]
    sizes = min(k_max, n)  # a set has at most the pool's n members: a larger k_max is capped (saved in the settings)
    res.settings["k_searched"] = sizes
    with progress(f"Set search (sizes 1-{sizes} of {n} directions, beam {beam})", sizes) as advance:
        for size in range(1, sizes + 1):
            new = []
            for base in frontier:
                for c in range(n):
                    if c in base:
                        continue
                    m = tuple(sorted(base + (c,)))
                    if m not in seen:
                        seen.add(m)
                        new.append(m)
            if not new:
                break
            scored, bh, bl = _score(model, tokenizer, res.candidates, new, harmful_val, harmless_val, refusal_ids,
                                    kl_threshold=kl_threshold, induce_threshold=induce_threshold,
                                    batch_size=batch_size, step=f"{len(new)} sets of {size}")
            res.baseline_harmful, res.baseline_harmless = bh, bl
            res.sets += scored
            frontier = [s.members for s in res.ordered(scored)[:beam]]
            res.kept[size] = frontier
            advance(1)
    return res


def add_to_directions(path: str | Path, direction: Direction, name: str = "set") -> DirectionSet:
    """Add (or replace) ``name`` in the direction set file at ``path``, keeping the other entries; written
    atomically. Not for a run folder's ``directions.safetensors`` (select's, checked against its manifest): there
    the set is saved apart, with :meth:`~refusal.runs.folder.RunFolder.write_sets`."""
    path = Path(path)
    if not path.is_file():
        raise RefusalError(f"No direction set at '{path}'.", "Run 'refusal select' on the run first.")
    ds = DirectionSet.load(path)
    ds[name] = direction
    ds.save(path)
    return ds


def plot_pareto(result: SetSearch, path: str | Path, title: str = "", ranks: Sequence[int] | None = None) -> None:
    """Bypass (refusal score with the set ablated) against KL, one colour per set size, the Pareto front joined,
    the best set circled (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = list(range(len(result.candidates))) if ranks is None else list(ranks)
    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    sizes = sorted({s.size for s in result.sets})
    for k in sizes:
        pts = [s for s in result.sets if s.size == k]
        ax.scatter([s.kl for s in pts], [s.bypass for s in pts], s=28, alpha=0.75, label=f"{k} direction"
                   + ("s" if k > 1 else ""), marker="o" if k == 1 else ("s" if k == 2 else "^"))
    front = result.pareto()
    if front:
        ax.plot([s.kl for s in front], [s.bypass for s in front], color="black", lw=1, ls="-", alpha=0.6,
                label="Pareto front")
        for s in front:
            ax.annotate("{" + ",".join(str(ranks[i]) for i in s.members) + "}", (s.kl, s.bypass), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    best = result.best
    if best is not None:
        ax.scatter([best.kl], [best.bypass], s=160, facecolors="none", edgecolors="red", linewidths=2, zorder=5,
                   label="best (KL and induce filters)")
    if not math.isnan(result.baseline_harmful):
        ax.axhline(result.baseline_harmful, color="gray", ls="--", lw=1, label="baseline (harmful)")
    ax.axvline(result.kl_threshold, color="gray", ls=":", lw=1, label=f"KL threshold {result.kl_threshold:g}")
    kls = [s.kl for s in result.sets if not math.isnan(s.kl)]
    if kls and min(kls) > 0 and max(kls) / min(kls) > 30:  # KL spans decades: a log axis
        ax.set_xscale("log")
    elif kls and max(kls) > 30 * max(min(kls), 1e-3):
        ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(baseline ‖ ablated), harmless val")
    ax.set_ylabel("refusal score, set ablated (harmful val)")
    ax.set_title(title or "Direction sets: bypass against KL", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    io.write_png(Path(path), fig)
