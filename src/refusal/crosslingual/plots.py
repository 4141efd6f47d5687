"""Pictures of a cross-lingual run: heatmaps of the transfer and similarity matrices, and the layer curves.

Languages are ordered by resource level (:data:`RESOURCE_LEVELS`: high en fr es, medium de ru zh, low th sw am; any
other code after them, in the order given), with lines between the groups. Every cell is annotated. A column whose
refusal judgements come from a low-confidence phrase list is starred, and its rates carry ≥ (refusal rates: lower
bounds) or ≤ (non-refusal rates: upper bounds). Files are written atomically with matplotlib's Agg backend.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import io
from ..runs.folder import RunFolder

RESOURCE_LEVELS: dict[str, tuple[str, ...]] = {"high": ("en", "fr", "es"), "medium": ("de", "ru", "zh"),
                                               "low": ("th", "sw", "am")}


def _base(lang: str) -> str:
    return lang.strip().lower().replace("_", "-").split("-")[0]


def resource_level(lang: str) -> str:
    """``high``, ``medium``, ``low`` or ``other``."""
    for level, codes in RESOURCE_LEVELS.items():
        if _base(lang) in codes:
            return level
    return "other"


def resource_order(languages: Sequence[str]) -> tuple[list[str], list[int]]:
    """The languages grouped by resource level (within a group, the order of :data:`RESOURCE_LEVELS`, then the
    order given) and the indices at which a new group starts (for separator lines; 0 is not listed)."""
    levels = [*RESOURCE_LEVELS, "other"]
    canon = [c for codes in RESOURCE_LEVELS.values() for c in codes]

    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        i, lang = item
        b = _base(lang)
        return levels.index(resource_level(lang)), canon.index(b) if b in canon else len(canon), i

    ordered = [lang for _, lang in sorted(enumerate(languages), key=key)]
    breaks = [i for i in range(1, len(ordered)) if resource_level(ordered[i]) != resource_level(ordered[i - 1])]
    return ordered, breaks


def _save(fig: Any, path: Path) -> Path:

    io.write_png(path, fig)
    return Path(path)


def heatmap(values: Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str], path: str | Path, *,
            title: str = "", annotations: Sequence[Sequence[str]] | None = None, vmin: float | None = None,
            vmax: float | None = None, cmap: str = "viridis", cbar_label: str = "", xlabel: str = "",
            ylabel: str = "", row_breaks: Sequence[int] = (), col_breaks: Sequence[int] = (),
            footnote: str | None = None, gamma: float | None = None) -> Path:
    """An annotated heatmap (``None`` cells grey) with separator lines before the rows / columns in ``*_breaks``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import PowerNorm

    data = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    n_r, n_c = data.shape
    width = max(5.5, 2.2 + 0.85 * n_c)
    fig, ax = plt.subplots(figsize=(width, 1.9 + 0.6 * n_r + (0.4 if footnote else 0)), constrained_layout=True)
    cm = matplotlib.colormaps[cmap].with_extremes(bad="#d9d9d9")
    if gamma is not None:
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cm, aspect="auto", norm=PowerNorm(gamma, vmin=vmin, vmax=vmax))
    else:
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cm, aspect="auto", norm=None, vmin=vmin, vmax=vmax)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if cbar_label:
        cbar.set_label(cbar_label)
    for i in range(n_r):
        for j in range(n_c):
            text = annotations[i][j] if annotations is not None else ("—" if np.isnan(data[i, j])
                                                                      else f"{data[i, j]:.2f}")
            color = "black"
            if not np.isnan(data[i, j]):  # dark text on light cells, light on dark (by the cell's luminance)
                r, g, b, _ = im.cmap(im.norm(data[i, j]))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n_c), list(cols))
    ax.set_yticks(range(n_r), list(rows))
    for b in row_breaks:
        ax.axhline(b - 0.5, color="black", lw=1.6)
    for b in col_breaks:
        ax.axvline(b - 0.5, color="black", lw=1.6)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:  # figure-level texts take part in the constrained layout: never cut off
        fig.suptitle(textwrap.fill(title, int(width * 9)), fontsize=10)
    if footnote:
        fig.supxlabel(textwrap.fill(footnote, int(width * 13)), fontsize=7, ha="left", x=0.01)
    return _save(fig, Path(path))


def _reorder(langs: Sequence[str], order: Sequence[str], matrix: Sequence[Sequence]) -> list[list]:
    idx = [list(langs).index(lang) for lang in order]
    return [[matrix[i][j] for j in idx] for i in idx]


def _rate_text(cell: Mapping | None, bound: str = "") -> str:
    """``0.50\n5/10``; ``bound`` (``≥`` or ``≤``) in front where the judgement may miss refusals."""
    if not cell or cell.get("rate") is None:
        return "—"
    return f"{bound}{cell['rate']:.2f}\n{cell['count']}/{cell['n']}"


def plot_all(out_dir: str | Path, transfer: Mapping, similarity: Mapping) -> list[Path]:
    """Every picture of a run from ``transfer.json`` and ``similarity.json``; returns the paths written:
    ``transfer_ablation.png``, ``transfer_addition.png``, ``transfer_kl.png``, ``similarity.png`` and
    ``layer_similarity.png`` in ``out_dir``."""
    out = Path(out_dir)
    langs = list(transfer["languages"])
    order, breaks = resource_order(langs)
    conf = transfer.get("judgement_confidence", {})
    low = {lang for lang in langs if conf.get(lang) not in (None, "high", "medium")}
    cols = [f"{lang}*" if lang in low else lang for lang in order]
    foot = ("* refusal judged with a low-confidence phrase list: refusal rates are lower bounds (≥), non-refusal "
            "rates upper bounds (≤)" if low else None)
    paths = []
    base = transfer.get("baseline", {})
    for key, base_key, name, title, cmap, bound in (
            ("ablation_non_refusal", "harmful_non_refusal", "transfer_ablation.png",
             "Non-refusal rate on target's harmful prompts, source's direction ablated", "viridis", "≤"),
            ("addition_refusal", "harmless_refusal", "transfer_addition.png",
             "Refusal rate on target's harmless prompts, source's direction added", "magma", "≥")):
        cells = _reorder(langs, order, transfer[key])
        base_row = [base.get(t, {}).get(base_key) for t in order]
        marks = [bound if t in low else "" for t in order]
        values = [[c.get("rate") if c else None for c in row] for row in [base_row, *cells]]
        notes = [[_rate_text(c, m) for c, m in zip(row, marks)] for row in [base_row, *cells]]
        paths.append(heatmap(values, ["none", *order], cols, out / name, title=title, annotations=notes, vmin=0,
                             vmax=1, cmap=cmap, cbar_label="rate", xlabel="target language (prompts)",
                             ylabel="source language (direction)", row_breaks=[1] + [b + 1 for b in breaks],
                             col_breaks=breaks, footnote=foot))
    kl = _reorder(langs, order, [[c.get("mean") if c else None for c in r]
                                     for r in transfer["ablation_kl"]])
    top = max([v for r in kl for v in r if v is not None], default=1.0) or 1.0
    paths.append(heatmap(kl, order, order, out / "transfer_kl.png",
                         title="Mean first-token KL(baseline || ablated) on target's harmless prompts",
                         annotations=[["—" if v is None else f"{v:.3g}" for v in r] for r in kl], vmin=0, vmax=top,
                         gamma=0.5, cmap="cividis", cbar_label="KL (nats)", xlabel="target language (prompts)",
                         ylabel="source language (direction)", row_breaks=breaks, col_breaks=breaks))
    s_langs = list(similarity["languages"])
    s_order, s_breaks = resource_order(s_langs)
    cos = _reorder(s_langs, s_order, similarity["cosine"])
    dirs = similarity.get("directions", {})
    labels = [f"{lang} (L{dirs[lang]['layer']})" if lang in dirs else lang for lang in s_order]
    paths.append(heatmap(cos, labels, s_order, out / "similarity.png",
                         title="Cosine similarity of the selected directions", vmin=-1, vmax=1, cmap="RdBu_r",
                         cbar_label="cosine", row_breaks=s_breaks, col_breaks=s_breaks))
    paths.append(plot_layer_curves(similarity, out / "layer_similarity.png"))
    return paths


def plot_layer_curves(similarity: Mapping, path: str | Path) -> Path:
    """Cosine with the reference language's candidate, per layer, one line per language; a dot marks each
    language's selected layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = similarity.get("layer_curves") or {}
    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    dirs = similarity.get("directions", {})
    order, _ = resource_order(list(curves.get("curves", {})))
    styles = {"high": "-", "medium": "--", "low": ":", "other": "-."}
    for lang in order:
        ys = curves["curves"][lang]
        xs = curves["layers"]
        line, = ax.plot(xs, [float("nan") if y is None else y for y in ys], ls=styles[resource_level(lang)],
                        marker=".", lw=1.4, label=f"{lang} ({resource_level(lang)})")
        sel = (dirs.get(lang) or {}).get("layer")
        if sel is not None and sel < len(ys) and ys[sel] is not None:
            ax.scatter([sel], [ys[sel]], s=60, color=line.get_color(), edgecolors="black", zorder=5)
    ref = curves.get("reference", "?")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"cosine with {ref}'s candidate")
    ax.set_title(f"Difference in means at position {curves.get('position')}: each language vs {ref} "
                 "(dot: the language's selected layer)", fontsize=9)
    ax.grid(alpha=0.3)
    if order:
        ax.legend(fontsize=8, ncol=2)
    return _save(fig, Path(path))


# ---- the stage ---------------------------------------------------------------------------------------------------

PLOTS = ("transfer_ablation.png", "transfer_addition.png", "transfer_kl.png", "similarity.png", "layer_similarity.png")


def plot_stage(root: RunFolder, *, force: bool) -> list[Path]:
    """Stage 5 of a cross-lingual run: the heatmaps and layer curves (:data:`PLOTS`) from ``transfer.json`` and
    ``similarity.json``, redrawn when either changed."""
    import time

    from ..batching import console
    from ..config import digest
    from .inputs import file_sha

    dig = digest({"stage": "plots", "transfer": file_sha(root.file("transfer.json")),
                  "similarity": file_sha(root.file("similarity.json"))})
    paths = [root.file(p) for p in PLOTS]
    if not force and root.manifest("plots", dig) and all(p.is_file() for p in paths):
        console.print("[dim]plots: finished earlier, skipped[/]")
        return paths
    started = time.perf_counter()
    paths = plot_all(root.path, root.read_json("transfer.json"), root.read_json("similarity.json"))
    root.write_manifest("plots", dig, time.perf_counter() - started, [p.name for p in paths])
    return paths
