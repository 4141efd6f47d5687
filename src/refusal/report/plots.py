"""The report's figures, drawn with matplotlib (Agg) into PNG bytes that the HTML page embeds as base64.

:func:`score_heatmaps` draws bypass / induce / KL over position × layer from ``scores.json``: cells that were not
scored (``null``) are grey, layers where no candidate was scored (``select.layer_stride``) are left out, the cells
that pass the selection filters carry a dot, and the selected cell a box.
"""

from __future__ import annotations

import math

from .. import io

PANELS = (
    ("bypass", "Bypass: refusal score on harmful prompts, direction ablated (lower bypasses more)", "RdBu_r"),
    ("induce", "Induce: refusal score on harmless prompts, direction added (higher induces more)", "RdBu_r"),
    ("kl", "KL(baseline ‖ ablated) on harmless prompts (lower changes the model less)", "magma_r"),
)


def _grid(scores: dict, key: str) -> list[list[float]]:
    return [[math.nan if v is None else float(v) for v in row] for row in scores.get(key) or []]


def score_heatmaps(scores: dict, *, kl_threshold: float | None = None, induce_threshold: float | None = None,
                   max_layer: int | None = None, title: str = "") -> bytes | None:
    """PNG of the three selection scores as heatmaps (positions × scored layers), or None if nothing was scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize, SymLogNorm
    from matplotlib.patches import Rectangle

    grids = {key: np.array(_grid(scores, key), dtype=float) for key, _, _ in PANELS}
    shapes = {g.shape for g in grids.values() if g.size}
    if len(shapes) != 1:
        return None
    shape = shapes.pop()
    if len(shape) != 2:
        return None
    positions = list(scores.get("positions") or range(shape[0]))
    scored = np.zeros(shape[1], dtype=bool)
    for g in grids.values():
        if g.shape == shape:
            scored |= ~np.isnan(g).all(0)
    layers = [int(i) for i in np.nonzero(scored)[0]]
    if not layers:
        return None
    sel = scores.get("selected") or {}
    sel_cell = None
    if sel.get("pos") in positions and sel.get("layer") in layers:
        sel_cell = (positions.index(sel["pos"]), layers.index(sel["layer"]))
    passing = np.ones((shape[0], len(layers)), dtype=bool)
    kl, ind = grids["kl"][:, layers], grids["induce"][:, layers]
    with np.errstate(invalid="ignore"):
        if kl_threshold is not None:
            passing &= kl < kl_threshold
        if induce_threshold is not None:
            passing &= ind > induce_threshold
    if max_layer is not None:
        passing &= (np.array(layers) < max_layer)[None, :]
    passing &= ~np.isnan(grids["bypass"][:, layers])

    width = min(13.0, max(7.0, 2.6 + 0.42 * len(layers)))
    fig, axes = plt.subplots(3, 1, figsize=(width, 3 * (1.25 + 0.34 * len(positions))), constrained_layout=True)
    annotate = len(layers) <= 24 and len(positions) <= 8
    font = 8.5 if len(layers) <= 12 else 6.5
    for ax, (key, label, cmap_name) in zip(axes, PANELS):
        data = grids[key][:, layers]
        cmap = plt.get_cmap(cmap_name).with_extremes(bad="#e6e6e6")
        finite = data[np.isfinite(data)]
        norm: Normalize
        if key == "kl":
            top = float(finite.max()) if finite.size else 1.0
            norm = SymLogNorm(linthresh=0.01, vmin=0.0, vmax=max(top, 0.02))
        else:
            # a refusal score of 0 is p(refusal) = 0.5: the colour scale is centred there and symmetric
            m = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-3)
            norm = Normalize(vmin=-m, vmax=m)
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([str(la) for la in layers], fontsize=7 if len(layers) > 16 else 8)
        ax.set_yticks(range(len(positions)))
        ax.set_yticklabels([str(p) for p in positions], fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylabel("position")
        ax.set_title(label, fontsize=10, loc="left")
        if annotate:
            for (i, j), v in np.ndenumerate(data):
                if np.isfinite(v):
                    rgba = cmap(norm(v))
                    light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                    ax.text(j, i, f"{v:.2g}" if abs(v) >= 0.01 or v == 0 else f"{v:.0e}", ha="center",
                            va="center", fontsize=font, color="black" if light else "white")
        if key == "bypass":
            ys, xs = np.nonzero(passing)
            ax.scatter(xs + 0.32, ys - 0.28, s=12, c="white", edgecolors="black", linewidths=0.7, marker="o",
                       zorder=4)
        if sel_cell is not None:
            i, j = sel_cell
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#00c853", linewidth=2.4, zorder=5))
    if title:
        fig.suptitle(title, fontsize=10)
    return io.png_bytes(fig)
