"""Scores of every candidate direction and the paper's selection rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import io
from ..errors import NoDirectionError


@dataclass
class Scores:
    """Scores of every candidate, each ``(n_positions, n_layers)``; NaN where a candidate was not scored."""

    positions: list[int]
    bypass: torch.Tensor
    induce: torch.Tensor
    kl: torch.Tensor
    baseline_harmful: float
    baseline_harmless: float

    def to_json(self) -> dict:
        def grid(t: torch.Tensor) -> list[list[float | None]]:
            return [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in t.tolist()]
        return {"positions": self.positions, "baseline_refusal_score": {
            "harmful": self.baseline_harmful, "harmless": self.baseline_harmless},
            "bypass": grid(self.bypass), "induce": grid(self.induce), "kl": grid(self.kl)}

    @classmethod
    def from_json(cls, d: dict) -> Scores:
        def t(g: list[list[float | None]]) -> torch.Tensor:
            return torch.tensor([[float("nan") if v is None else v for v in row] for row in g])
        b = d["baseline_refusal_score"]
        return cls(list(d["positions"]), t(d["bypass"]), t(d["induce"]), t(d["kl"]), b["harmful"], b["harmless"])


@dataclass
class Selection:
    pos: int
    layer: int
    bypass: float
    induce: float
    kl: float
    n_passing: int


def choose(scores: Scores, *, n_layers: int, kl_threshold: float = 0.1, induce_threshold: float = 0.0,
           max_layer_fraction: float = 0.8) -> Selection:
    """The candidate with the lowest bypass score among those with KL < threshold, induce > threshold and layer
    < ``max_layer_fraction`` of the depth."""
    ok = (scores.kl < kl_threshold) & (scores.induce > induce_threshold) & ~scores.bypass.isnan()
    layer_ok = torch.arange(n_layers) < int(max_layer_fraction * n_layers)
    ok &= layer_ok[None, :]
    n_ok = int(ok.sum())
    if n_ok == 0:
        best_kl = float(torch.nan_to_num(scores.kl, nan=float("inf")).min())
        best_induce = float(torch.nan_to_num(scores.induce, nan=float("-inf")).max())
        raise NoDirectionError(
            f"No candidate direction passed the filters (KL < {kl_threshold}, induce > {induce_threshold}, "
            f"layer < {max_layer_fraction:.0%} of depth); best KL was {best_kl:.3f} and best induce {best_induce:.3f}.",
            "Loosen select.kl_threshold / select.induce_threshold in the config, or use more validation prompts; "
            "a model that never refuses has no refusal direction to find.",
        )
    masked = torch.where(ok, scores.bypass, torch.full_like(scores.bypass, float("inf")))
    flat = int(masked.argmin())
    p, layer = divmod(flat, n_layers)
    return Selection(scores.positions[p], layer, float(scores.bypass[p, layer]), float(scores.induce[p, layer]),
                     float(scores.kl[p, layer]), n_ok)


def ranked(scores: Scores, *, n_layers: int, kl_threshold: float = 0.1, induce_threshold: float = 0.0,
           max_layer_fraction: float = 0.8) -> list[tuple[int, int]]:
    """``(pos, layer)`` of every candidate that passes the filters of :func:`choose`, lowest bypass first (rank 0
    is the selection)."""
    ok = (scores.kl < kl_threshold) & (scores.induce > induce_threshold) & ~scores.bypass.isnan()
    ok &= (torch.arange(n_layers) < int(max_layer_fraction * n_layers))[None, :]
    masked = torch.where(ok, scores.bypass, torch.full_like(scores.bypass, float("inf")))
    order = masked.flatten().argsort()[: int(ok.sum())]
    return [(scores.positions[int(i) // n_layers], int(i) % n_layers) for i in order]


def plot_scores(scores: Scores, selection: Selection | None, path: str | Path, title: str = "") -> None:
    """Bypass, induce and KL against layer, one line per post-instruction position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.82, wspace=0.22)  # fixed: a layout solver costs 0.3 s
    panels = [("bypass", "Refusal score, direction ablated (harmful)", scores.baseline_harmful),
              ("induce", "Refusal score, direction added (harmless)", scores.baseline_harmless),
              ("kl", "KL divergence, direction ablated (harmless)", None)]
    n_layers = scores.bypass.shape[1]
    for ax, (key, label, base) in zip(axes, panels):
        grid = getattr(scores, key)
        for i, pos in enumerate(scores.positions):
            ax.plot(range(n_layers), grid[i].numpy(), marker=".", lw=1.2, label=f"pos {pos}")
        if base is not None:
            ax.axhline(base, color="gray", ls="--", lw=1, label="baseline")
        if selection is not None:
            ax.scatter([selection.layer], [getattr(selection, key)], s=120, facecolors="none",
                       edgecolors="red", linewidths=2, zorder=5, label="selected")
        if key == "kl":
            ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("layer")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    io.write_png(Path(path), fig)
