"""Magnitude: how far each prompt's activation reaches along the refusal direction, and how well that predicts
refusal (the evaluation of the NNsight replication of Arditi et al.).

For every prompt, the *projection* is the scalar projection ``x · r̂`` of its residual-stream activation ``x`` at the
direction's layer (the layer's input, as the direction was read) and post-instruction position (``pos``, a negative
offset from the end of the prompt; ``-1`` is the last token) onto the unit direction ``r̂``. Against it:

* the refusal score (log-odds of refusal tokens at the first generated position, computed here unless given):
  Pearson and Spearman correlation;
* the judged outcome (refused or not): ROC-AUC of the projection as a score for "refused" (0.5 is chance, 1 a
  perfect ranking of refused above complied prompts).

>>> res = magnitude(model, tok, format_prompts(tok, instructions), direction, labels=refused, kinds=kinds)
>>> res["pearson"], res["spearman"], res["roc_auc"]
>>> plot_magnitude(res, "magnitude.png")

The statistics are computed here in numpy (:func:`pearson`, :func:`spearman`, :func:`roc_auc`; ties get average
ranks, as in scipy and scikit-learn). A statistic that is undefined (a constant input, one class only) is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from .. import io
from ..errors import RefusalError

if TYPE_CHECKING:
    from ..directions.base import Direction

    # whether each prompt was judged refused: bools (or 0 / 1), "refusal" / "compliance", or refusal Judgements
    Labels = Sequence[object] | torch.Tensor | np.ndarray | None

# ---- statistics ---------------------------------------------------------------------------------------------------


def rankdata(x: ArrayLike) -> np.ndarray:
    """Ranks 1..n of ``x``, ties sharing their average rank."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each run of equal values
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation; NaN if either input is constant or has fewer than 2 values."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson needs inputs of one length, got {x.size} and {y.size}")
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(np.clip(dx @ dy / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (the Pearson correlation of the average ranks)."""
    return pearson(rankdata(x), rankdata(y))


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` predicting ``labels`` (True = positive), by the Mann-Whitney
    statistic (ties count one half); NaN when one class is absent."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"roc_auc needs scores and labels of one length, got {s.size} and {y.size}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _json(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


# ---- inputs -------------------------------------------------------------------------------------------------------


def _as_labels(labels: Labels, n: int) -> list[bool] | None:
    if labels is None:
        return None
    labels = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
    out = []
    for i, lab in enumerate(labels):
        if hasattr(lab, "refused") and hasattr(lab, "failed"):  # a Judgement
            lab = None if lab.failed else lab.refused
        elif isinstance(lab, str):
            lab = {"refusal": True, "refused": True, "compliance": False, "complied": False}.get(lab.lower())
        elif isinstance(lab, (bool, np.bool_)) or lab in (0, 1):
            lab = bool(lab)
        else:
            lab = None
        if lab is None:
            raise RefusalError(f"Label {i} ({labels[i]!r}) says neither refused nor not.",
                               "Give one bool per prompt (True = refused), or refusal judgements that did not fail.")
        out.append(lab)
    if len(out) != n:
        raise RefusalError(f"{len(out)} labels for {n} prompts.", "Give one label per prompt.")
    return out


def _check(model: Any, tokenizer: Any, prompts: Sequence[str], direction: Direction, layer: int | None,
           pos: int | None, labels: Labels, refusal_scores: Sequence[float] | torch.Tensor | None,
           kinds: Sequence[str] | None
           ) -> tuple[list[str], int, int, list[bool] | None, list[float] | None, list[str] | None]:
    from ..models.parts import find_parts
    from ..templates import check_prompts_end_with, prompts_post_instruction_ids

    if isinstance(prompts, str) or not prompts:
        raise RefusalError("magnitude needs a non-empty list of prompts.", "Pass templated prompts (format_prompts).")
    prompts = list(prompts)
    n = len(prompts)
    vectors = getattr(direction, "vectors", None)
    if vectors is None:
        raise RefusalError(f"direction must be a refusal Direction, not {type(direction).__name__}.",
                           "Wrap a vector as Direction(vector, layer, pos).")
    if direction.per_layer or direction.k != 1:
        raise RefusalError(f"magnitude projects onto one direction; this one has shape {tuple(vectors.shape)}.",
                           "Use a single direction (e.g. the selected one, or a subspace's first row).")
    if float(direction.vector.norm()) == 0.0:
        raise RefusalError("The direction is the zero vector.", "Use a non-zero direction.")
    parts = find_parts(model)
    if direction.d != parts.hidden_size:
        raise RefusalError(f"The direction has {direction.d} dimensions, the model {parts.hidden_size}.",
                           "Use a direction found for this model.")
    layer = direction.layer if layer is None else layer
    if layer is None:
        raise RefusalError("The direction does not say which layer it was read at.", "Pass layer=.")
    if not isinstance(layer, int) or not 0 <= layer < parts.n_layers:
        raise RefusalError(f"Layer {layer!r} is not one of the model's {parts.n_layers} layers.", "Pass layer=.")
    pos = (direction.pos if direction.pos is not None else -1) if pos is None else pos
    if not isinstance(pos, int) or pos >= 0:
        raise RefusalError(f"Position {pos!r} is not a negative offset from the end of the prompt.",
                           "Use -1 for the last token, -2 for the one before, ...")
    if getattr(tokenizer, "chat_template", None):
        check_prompts_end_with(tokenizer, prompts, prompts_post_instruction_ids(tokenizer, prompts))
    labels = _as_labels(labels, n)
    if refusal_scores is not None:
        refusal_scores = [float(x) for x in torch.as_tensor(refusal_scores, dtype=torch.float64).reshape(-1)]
        if len(refusal_scores) != n:
            raise RefusalError(f"{len(refusal_scores)} refusal scores for {n} prompts.", "Give one per prompt.")
    if kinds is not None:
        kinds = [str(k) for k in kinds]
        if len(kinds) != n:
            raise RefusalError(f"{len(kinds)} prompt kinds for {n} prompts.", "Give one kind per prompt.")
    return prompts, layer, pos, labels, refusal_scores, kinds


# ---- the evaluation -----------------------------------------------------------------------------------------------


@torch.no_grad()
def magnitude(model: Any, tokenizer: Any, prompts: Sequence[str], direction: Direction, *, labels: Labels = None,
              refusal_scores: Sequence[float] | torch.Tensor | None = None, kinds: Sequence[str] | None = None,
              layer: int | None = None, pos: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Projection of every (templated) prompt's activation onto ``direction`` and its relation to refusal.

    ``labels``: whether each prompt was judged refused (bools, or refusal :class:`~refusal.evaluation.judges.
    Judgement` s); ``refusal_scores``: each prompt's refusal score (computed from the model when None); ``kinds``:
    a kind per prompt (harmful / harmless, or XSTest's types) for the plot and per-kind means. ``layer`` and ``pos``
    default to the direction's own (``pos`` to -1 if it has none).

    Returns ``{"layer", "pos", "n", "projection", "refusal_score", "labels", "kinds", "pearson", "spearman",
    "roc_auc", "mean_projection"}``: lists per prompt, the statistics as floats (None when undefined), and the mean
    projection per label (``refused`` / ``complied``) and per kind."""
    from ..directions.inlp import collect_activations

    prompts, layer, pos, labels, scores, kinds = _check(model, tokenizer, prompts, direction, layer, pos, labels,
                                                        refusal_scores, kinds)
    acts = collect_activations(model, tokenizer, prompts, n_positions=-pos, layers=[layer], batch_size=batch_size)
    x = acts[0, 0].double().cpu()  # position `pos` is the first of the last -pos positions
    unit = direction.vector.double().cpu()
    proj = (x @ (unit / unit.norm())).numpy()
    if scores is None:
        from ..scoring.engine import refusal_scores as compute_scores
        from ..scoring.refusal import refusal_token_ids

        scores = compute_scores(model, tokenizer, prompts, refusal_token_ids(tokenizer), batch_size).double().tolist()
    means: dict[str, float] = {}
    if labels is not None:
        lab = np.array(labels)
        for name, mask in (("refused", lab), ("complied", ~lab)):
            if mask.any():
                means[name] = float(proj[mask].mean())
    if kinds is not None:
        for k in dict.fromkeys(kinds):
            means[f"kind:{k}"] = float(proj[np.array(kinds) == k].mean())
    return {
        "layer": layer, "pos": pos, "n": len(prompts),
        "projection": [float(p) for p in proj], "refusal_score": [float(s) for s in scores],
        "labels": labels, "kinds": kinds,
        "pearson": _json(pearson(proj, scores)), "spearman": _json(spearman(proj, scores)),
        "roc_auc": _json(roc_auc(proj, labels)) if labels is not None else None,
        "mean_projection": means,
    }


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def plot_magnitude(result: dict, path: str | Path, title: str = "") -> None:
    """Scatter PNG of projection (x) against refusal score (y): colour = judged refused / complied (grey without
    labels), marker = prompt kind; the correlations and ROC-AUC in the title."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    proj = np.asarray(result["projection"], dtype=float)
    score = np.asarray(result["refusal_score"], dtype=float)
    labels = result.get("labels")
    kinds = result.get("kinds") or ["prompt"] * len(proj)
    fig = Figure(figsize=(6.4, 4.6), constrained_layout=True)
    ax = fig.add_subplot()
    colour = {True: "#d62728", False: "#1f77b4", None: "#7f7f7f"}
    kind_list = list(dict.fromkeys(kinds))
    for j, k in enumerate(kind_list):
        for lab in ((True, False) if labels is not None else (None,)):
            m = np.array([kk == k and (lab is None or (labels is not None and labels[i] == lab))
                          for i, kk in enumerate(kinds)])
            if m.any():
                ax.scatter(proj[m], score[m], c=colour[lab], marker=_MARKERS[j % len(_MARKERS)], s=28, alpha=0.75,
                           edgecolors="none")
    handles = []
    if labels is not None:
        handles += [Line2D([], [], ls="", marker="o", color=colour[v], label=t)
                    for v, t in ((True, "refused"), (False, "complied"))]
    if len(kind_list) > 1 or result.get("kinds"):
        handles += [Line2D([], [], ls="", marker=_MARKERS[j % len(_MARKERS)], color="black", label=k)
                    for j, k in enumerate(kind_list)]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"
    stats = (f"Pearson {fmt(result.get('pearson'))}, Spearman {fmt(result.get('spearman'))}, "
             f"ROC-AUC {fmt(result.get('roc_auc'))}")
    ax.set_title((title + "\n" if title else "") + f"layer {result['layer']}, pos {result['pos']}: {stats}",
                 fontsize=9)
    ax.set_xlabel("projection onto the refusal direction")
    ax.set_ylabel("refusal score (log-odds)")
    ax.grid(alpha=0.3)
    io.write_png(Path(path), fig)
