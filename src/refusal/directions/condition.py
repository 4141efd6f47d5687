"""The condition of conditional keep-refusal: which prompts get the refusal edit.

Per-category refusal directions are nearly the same vector (cosine 0.85-0.98 on Qwen2.5-Coder-1.5B), so no single
edit applied to every prompt can remove refusal for some categories and keep it for others (docs/keep-refusal.md).
Conditional activation steering (Lee et al. 2024, *Programming Refusal with Conditional Activation Steering*, CAST,
ICLR 2025) separates the two questions: a *condition* read from the prompt's own activations decides, per prompt,
whether the behaviour edit (here the paper's ablation of the refusal direction) applies.

The condition here is a linear classifier "released vs kept" on the residual stream (the input of one decoder
layer) at the prompt's last token, with no intervention. At each candidate layer it is fitted on the harmful train
prompts (:func:`fit_layer`: nearest centroid after centring on the train mean and scaling each dimension by its
pooled within-class standard deviation, shrunk towards the median variance, i.e. diagonal LDA with equal priors), and
scored on the harmful val prompts by balanced accuracy (the mean of the released and the kept recall); the best
layer wins, ties going to the earlier one (:func:`fit_keep_condition`). The rule is one vector and a threshold
(released iff ``x·w > b``), saved with every layer's accuracies (:meth:`KeepCondition.save`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..errors import RefusalError

__all__ = ["KeepCondition", "balanced_accuracy", "fit_keep_condition", "fit_layer", "prompt_activations", "route"]

SHRINKAGE = 0.5  # weight of the median variance in each dimension's variance (few prompts, many dimensions)


@dataclass
class KeepCondition:
    """A fitted condition: released iff ``x · weight > threshold`` for ``x`` the input of decoder layer ``layer``
    at the prompt's last token (no intervention). ``mean``, ``scale`` and the two centroids (in the centred, scaled
    space) are what the rule was made from; ``info`` holds the fit's record (per-layer accuracies, counts)."""

    layer: int
    weight: torch.Tensor
    threshold: float
    released: list[str]
    kept: list[str]
    mean: torch.Tensor
    scale: torch.Tensor
    centroid_released: torch.Tensor
    centroid_kept: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        """``x · w - b`` for each row of ``acts`` (``(n, d)``): positive means released."""
        return acts.float().to(self.weight.device) @ self.weight.float() - self.threshold

    def release(self, acts: torch.Tensor) -> list[bool]:
        """Per row: whether the prompt is routed to release (its refusal edited away)."""
        return [bool(v) for v in (self.scores(acts) > 0).tolist()]

    def save(self, path: str | Path) -> None:
        io.write_tensors(Path(path), {"weight": self.weight, "mean": self.mean, "scale": self.scale,
                                      "centroid_released": self.centroid_released,
                                      "centroid_kept": self.centroid_kept},
                         {"layer": self.layer, "threshold": self.threshold, "released": self.released,
                          "kept": self.kept, "rule": "released iff x . weight > threshold (x: the input of decoder "
                                                     "layer `layer` at the prompt's last token)", "info": self.info})

    @classmethod
    def load(cls, path: str | Path) -> KeepCondition:
        p = Path(path)
        if not p.is_file():
            raise RefusalError(f"No keep-refusal condition at '{p}'.",
                               "Run select with select.keep_refusal and keep_refusal_method: conditional first.")
        t, m = io.read_tensors(p)
        need = {"weight", "mean", "scale", "centroid_released", "centroid_kept"}
        if not need <= set(t) or "layer" not in m or "threshold" not in m:
            raise RefusalError(f"'{p}' is not a keep-refusal condition (it lacks {sorted(need - set(t))}).",
                               "Redo the select stage that writes it.")
        return cls(int(m["layer"]), t["weight"], float(m["threshold"]), list(m.get("released") or []),
                   list(m.get("kept") or []), t["mean"], t["scale"], t["centroid_released"], t["centroid_kept"],
                   dict(m.get("info") or {}))


def fit_layer(x: torch.Tensor, released: torch.Tensor, shrinkage: float = SHRINKAGE) -> dict[str, torch.Tensor]:
    """Nearest centroid in a centred, per-dimension scaled space (diagonal LDA, equal priors), as a linear rule.

    ``x``: ``(n, d)`` activations; ``released``: ``(n,)`` bools (both classes present). Each dimension is divided by
    ``s = sqrt((1 - shrinkage) var_d + shrinkage median(var))`` (``var``: the pooled within-class variance): a
    dimension of large spread (the residual stream has a few) weighs less, and one of tiny spread is not trusted
    beyond the typical one; the median, not the mean, so that those few do not set the scale of all the others.
    Returns ``weight`` and ``threshold`` (released iff ``x·weight > threshold``) and the pieces: ``mean``,
    ``scale``, ``centroid_released``, ``centroid_kept``."""
    x = x.float()
    y = released.bool().to(x.device)
    if int(y.sum()) == 0 or int((~y).sum()) == 0:
        raise RefusalError("The condition needs prompts of released and of kept categories to learn from.",
                           "Give a harmful train split with prompts of both.")
    mean = x.mean(0)
    z = x - mean
    c_r, c_k = z[y].mean(0), z[~y].mean(0)
    resid = torch.cat([z[y] - c_r, z[~y] - c_k])
    var = resid.pow(2).sum(0) / max(1, x.shape[0] - 2)
    var = (1 - shrinkage) * var + shrinkage * var.median()
    scale = var.clamp_min(1e-12).sqrt()
    c_r, c_k = c_r / scale, c_k / scale
    # |z/s - c_k|² - |z/s - c_r|² > 0  ⇔  (z/s)·(c_r - c_k) > (|c_r|² - |c_k|²) / 2
    diff = c_r - c_k
    weight = diff / scale
    threshold = float((c_r.pow(2).sum() - c_k.pow(2).sum()) / 2 + mean @ weight)
    return {"weight": weight, "threshold": torch.tensor(threshold), "mean": mean, "scale": scale,
            "centroid_released": c_r, "centroid_kept": c_k}


def balanced_accuracy(predicted: Sequence[bool], released: Sequence[bool]) -> float | None:
    """Mean recall of the classes present (released, kept); None without any row."""
    recalls = []
    for cls in (True, False):
        rows = [p for p, r in zip(predicted, released) if r == cls]
        if rows:
            recalls.append(sum(p == cls for p in rows) / len(rows))
    return sum(recalls) / len(recalls) if recalls else None


def fit_keep_condition(
    train: torch.Tensor, train_categories: Sequence[str], val: torch.Tensor, val_categories: Sequence[str],
    layers: Sequence[int], kept: Sequence[str], released: Sequence[str], *, shrinkage: float = SHRINKAGE,
) -> KeepCondition:
    """Fit the rule at every layer on the train prompts and keep the layer with the best val balanced accuracy.

    ``train`` / ``val``: ``(len(layers), n, d)`` activations at the prompts' last token (e.g. from
    :func:`prompt_activations`); ``*_categories``: each prompt's category. A prompt is released unless its category
    is kept. Ties go to the earlier layer; without val prompts the train accuracy decides (recorded in ``info``)."""
    kept_set = set(kept)
    y_tr = torch.tensor([c not in kept_set for c in train_categories])
    y_va = [c not in kept_set for c in val_categories]
    if train.shape[:2] != (len(layers), len(train_categories)) or val.shape[:2] != (len(layers), len(val_categories)):
        raise ValueError("activations must be (len(layers), n prompts, d)")
    per_layer: list[dict[str, Any]] = []
    fits = []
    for j, la in enumerate(layers):
        f = fit_layer(train[j], y_tr, shrinkage)
        fits.append(f)
        pred_tr = ((train[j].float() @ f["weight"]) > f["threshold"]).tolist()
        pred_va = ((val[j].float() @ f["weight"]) > f["threshold"]).tolist() if len(y_va) else []
        acc_tr = balanced_accuracy(pred_tr, y_tr.tolist())
        acc_va = balanced_accuracy(pred_va, y_va)
        per_layer.append({"layer": int(la), "train_balanced_accuracy": None if acc_tr is None else round(acc_tr, 4),
                          "val_balanced_accuracy": None if acc_va is None else round(acc_va, 4)})
    key = "val_balanced_accuracy" if y_va else "train_balanced_accuracy"
    best = max(range(len(layers)), key=lambda j: (per_layer[j][key] or 0.0, -j))  # ties: the earlier layer
    f = fits[best]
    pred = ((val[best].float() @ f["weight"]) > f["threshold"]).tolist() if len(y_va) else []
    by_cat: dict[str, list[bool]] = {}
    for c, p in zip(val_categories, pred):
        by_cat.setdefault(c, []).append(bool(p))
    info = {
        "method": "nearest centroid, diagonal LDA (per-dimension pooled within-class scale, shrunk towards the median "
                  "variance), equal priors; layer by val balanced accuracy, ties to the earlier layer",
        "shrinkage": shrinkage, "chosen_by": key, "per_layer": per_layer,
        "n_train": {"released": int(y_tr.sum()), "kept": int((~y_tr).sum())},
        "n_val": {"released": sum(y_va), "kept": len(y_va) - sum(y_va)},
        "val_classes_missing": [n for n, cls in (("released", True), ("kept", False)) if cls not in y_va],
        "val_released_rate_by_category": {c: {"released": sum(v), "n": len(v)} for c, v in by_cat.items()},
        "val_balanced_accuracy": per_layer[best]["val_balanced_accuracy"],
        "train_balanced_accuracy": per_layer[best]["train_balanced_accuracy"],
    }
    return KeepCondition(int(layers[best]), f["weight"].cpu(), float(f["threshold"]), list(released), list(kept),
                         f["mean"].cpu(), f["scale"].cpu(), f["centroid_released"].cpu(), f["centroid_kept"].cpu(),
                         info)


def prompt_activations(model: Any, tokenizer: Any, prompts: Sequence[str], layers: Sequence[int], *,
                       batch_size: int = 32, description: str = "") -> torch.Tensor:
    """The inputs of decoder ``layers`` at each templated prompt's last token, no intervention: ``(len(layers),
    len(prompts), d)`` float32 on the CPU (batched; the forward stops after the deepest layer)."""
    from .inlp.activations import collect_activations

    if not prompts:
        from ..models.parts import find_parts

        return torch.zeros(len(layers), 0, find_parts(model).hidden_size)
    return collect_activations(model, tokenizer, list(prompts), 1, list(layers), batch_size, description)[0].cpu()


def route(model: Any, tokenizer: Any, condition: KeepCondition, prompts: Sequence[str], *,
          batch_size: int = 32, description: str = "Routing prompts (keep-refusal condition)") -> list[bool]:
    """For each templated prompt: True if the condition routes it to release (edit applied), False to keep (no
    edit). One batched forward up to the condition's layer, with no intervention."""
    if not prompts:
        return []
    acts = prompt_activations(model, tokenizer, prompts, [condition.layer], batch_size=batch_size,
                              description=description)[0]
    return condition.release(acts)

