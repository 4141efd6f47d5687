"""The condition of conditional keep-refusal: which prompts get the refusal edit.

Per-category refusal directions are nearly the same vector (cosine 0.85-0.98 on Qwen2.5-Coder-1.5B), so no single
edit applied to every prompt can remove refusal for some categories and keep it for others (docs/keep-refusal.md).
Conditional activation steering (Lee et al. 2024, *Programming Refusal with Conditional Activation Steering*, CAST,
ICLR 2025) separates the two questions: a *condition* read from the prompt's own activations decides, per prompt,
whether the behaviour edit (here the paper's ablation of the refusal direction) applies.

The condition here is a linear rule "released vs kept" on the residual stream (the input of one decoder layer) with
no intervention, read as CAST reads it: averaged over the prompt's own tokens (:func:`instruction_mean`; the
template's tokens before the instruction are skipped, they are the same for every prompt), or at the prompt's last
token (``pool="last"``). :func:`fit_keep_condition` fits it on every labelled prompt by stratified k-fold
cross-validation:

* the rule at a layer is ridge regression of ±1 labels on the features standardised per dimension
  (:func:`fit_ridge`; closed form in the prompts' dual, so every layer and fold is one batched solve);
* the layer and the ridge penalty are the pair whose out-of-fold scores separate released from kept best (ROC AUC;
  ties to the earlier layer, then the stronger penalty);
* the threshold is set on the kept prompts' out-of-fold scores so that at most ``max_kept_release`` of them would be
  released: a kept prompt routed to release loses its refusal, the failure the user asked to avoid, while a released
  prompt routed to keep is only refused as before. The out-of-fold rates at that threshold are recorded.

The rule is then refitted on every prompt: one vector and a threshold (released iff ``x·w > b``), saved with the
fit's record (:meth:`KeepCondition.save`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..batching import Batching
from ..errors import RefusalError

__all__ = ["KeepCondition", "POOLS", "auc", "fit_keep_condition", "fit_ridge", "instruction_mean",
           "prompt_activations", "route", "stratified_folds"]

POOLS = ("mean", "last")
PENALTIES = (1.0, 10.0, 100.0, 1000.0)  # ridge penalties tried, in units of the standardised features
MAX_KEPT_RELEASE = 0.1  # the out-of-fold share of kept prompts the threshold lets through
FOLDS = 5
SHRINKAGE = 0.5  # weight of the median variance in each dimension's variance (few prompts, many dimensions)


@dataclass
class KeepCondition:
    """A fitted condition: released iff ``x · weight > threshold`` for ``x`` the input of decoder layer ``layer``,
    averaged over the prompt's tokens after the template's first ``skip`` (``pool="mean"``) or at its last token
    (``pool="last"``), with no intervention. ``mean`` and ``scale`` are the standardisation the rule was fitted in
    (already folded into ``weight``); ``info`` holds the fit's record (per-layer scores, out-of-fold rates)."""

    layer: int
    weight: torch.Tensor
    threshold: float
    released: list[str]
    kept: list[str]
    mean: torch.Tensor
    scale: torch.Tensor
    pool: str = "last"
    skip: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        """``x · w - b`` for each row of ``acts`` (``(n, d)``): positive means released."""
        return acts.float().to(self.weight.device) @ self.weight.float() - self.threshold

    def release(self, acts: torch.Tensor) -> list[bool]:
        """Per row: whether the prompt is routed to release (its refusal edited away)."""
        return [bool(v) for v in (self.scores(acts) > 0).tolist()]

    def save(self, path: str | Path) -> None:
        io.write_tensors(Path(path), {"weight": self.weight, "mean": self.mean, "scale": self.scale},
                         {"layer": self.layer, "threshold": self.threshold, "released": self.released,
                          "kept": self.kept, "pool": self.pool, "skip": self.skip,
                          "rule": "released iff x . weight > threshold (x: the input of decoder layer `layer`, "
                                  "averaged over the prompt's tokens after the first `skip` if pool is mean, at the "
                                  "prompt's last token if pool is last)", "info": self.info})

    @classmethod
    def load(cls, path: str | Path) -> KeepCondition:
        p = Path(path)
        if not p.is_file():
            raise RefusalError(f"No keep-refusal condition at '{p}'.",
                               "Run select with select.keep_refusal and keep_refusal_method: conditional first.")
        t, m = io.read_tensors(p)
        need = {"weight", "mean", "scale"}
        pool = str(m.get("pool", "last"))  # saved before pooling existed: the last token
        if not need <= set(t) or "layer" not in m or "threshold" not in m or pool not in POOLS:
            raise RefusalError(f"'{p}' is not a keep-refusal condition (it lacks {sorted(need - set(t))}, or its "
                               f"pool {pool!r} is not one of {POOLS}).", "Redo the select stage that writes it.")
        return cls(int(m["layer"]), t["weight"], float(m["threshold"]), list(m.get("released") or []),
                   list(m.get("kept") or []), t["mean"], t["scale"], pool, int(m.get("skip", 0)),
                   dict(m.get("info") or {}))


def standardise(x: torch.Tensor, shrinkage: float = SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension centring and scale over the rows of ``x`` (``(..., n, d)``): the scale is
    ``sqrt((1 - shrinkage) var_d + shrinkage median(var))``, so the residual stream's few dimensions of huge spread
    do not decide alone and one of tiny spread is not trusted beyond the typical one."""
    mean = x.mean(-2, keepdim=True)
    var = (x - mean).pow(2).mean(-2, keepdim=True)
    var = (1 - shrinkage) * var + shrinkage * var.median(-1, keepdim=True).values
    return mean, var.clamp_min(1e-12).sqrt()


def fit_ridge(x: torch.Tensor, released: torch.Tensor, penalty: float,
              shrinkage: float = SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge regression of ±1 labels (released +1) on standardised features, in the dual (``n`` prompts ≪ ``d``).

    ``x``: ``(..., n, d)`` (leading dimensions are independent problems: layers, folds); ``released``: ``(..., n)``
    bools. Returns ``(weight, bias, mean, scale)`` with the standardisation folded into ``weight`` and ``bias``:
    the score of a row ``v`` is ``v · weight + bias``."""
    x = x.double()
    mean, scale = standardise(x, shrinkage)
    z = (x - mean) / scale
    y = released.to(x.device).double() * 2 - 1
    y = y - y.mean(-1, keepdim=True)
    gram = z @ z.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    alpha = torch.linalg.solve(gram + penalty * eye, y.unsqueeze(-1))
    w = (z.transpose(-1, -2) @ alpha).squeeze(-1) / scale.squeeze(-2)
    bias = -(mean.squeeze(-2) * w).sum(-1)
    return w.float(), bias.float(), mean.squeeze(-2).float(), scale.squeeze(-2).float()


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of ``scores`` for the ``positive`` rows (ties count half); NaN without both classes."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos.unsqueeze(1) - neg.unsqueeze(0)
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def stratified_folds(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """A fold index in ``0..k-1`` per row, each class spread evenly over the folds in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for cls in (True, False):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = torch.arange(len(idx)) % k
    return fold


def threshold_for(kept_scores: torch.Tensor, max_kept_release: float) -> float:
    """The least threshold at which at most ``max_kept_release`` of ``kept_scores`` lie above it (released iff
    score > threshold)."""
    s = kept_scores.sort(descending=True).values
    allowed = int(max_kept_release * len(s) + 1e-9)
    return float(s[min(allowed, len(s) - 1)])


def _out_of_fold(feats: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, penalty: float,
                 shrinkage: float) -> torch.Tensor:
    """Out-of-fold scores ``(L, n)``: every layer's rule fitted without each fold, scored on it."""
    scores = torch.empty(feats.shape[0], feats.shape[1])
    for f in range(int(fold.max()) + 1):
        held = fold == f
        w, b, _, _ = fit_ridge(feats[:, ~held], y[~held].expand(feats.shape[0], -1), penalty, shrinkage)
        scores[:, held] = (feats[:, held].float() @ w.unsqueeze(-1)).squeeze(-1) + b.unsqueeze(-1)
    return scores


def _rates(released_pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    rel, kept = released_pred[y], released_pred[~y]
    r, k = float(rel.float().mean()), float(kept.float().mean())
    return {"released_recall": round(r, 4), "kept_released": round(k, 4),
            "balanced_accuracy": round((r + 1 - k) / 2, 4)}


def fit_keep_condition(
    feats: torch.Tensor, categories: Sequence[str], layers: Sequence[int], kept: Sequence[str],
    released: Sequence[str], *, pool: str = "mean", skip: int = 0, folds: int = FOLDS,
    penalties: Sequence[float] = PENALTIES, max_kept_release: float = MAX_KEPT_RELEASE, seed: int = 0,
    shrinkage: float = SHRINKAGE,
) -> KeepCondition:
    """Fit the condition by stratified ``folds``-fold cross-validation on every labelled prompt (module docstring).

    ``feats``: ``(len(layers), n, d)`` features of the prompts (:func:`prompt_activations` with the same ``pool``
    and ``skip``); ``categories``: each prompt's category. A prompt is released unless its category is kept."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}")
    if feats.shape[:2] != (len(layers), len(categories)):
        raise ValueError("feats must be (len(layers), n prompts, d)")
    if not 0 <= max_kept_release < 1:
        raise RefusalError(f"max_kept_release must lie in [0, 1); got {max_kept_release}.",
                           "Give the share of kept prompts the condition may release, e.g. 0.1.")
    kept_set = set(kept)
    y = torch.tensor([c not in kept_set for c in categories])
    n_rel, n_kept = int(y.sum()), int((~y).sum())
    if min(n_rel, n_kept) < 2:
        raise RefusalError(f"The condition needs at least 2 prompts of released and of kept categories to "
                           f"cross-validate; the harmful train and val splits hold {n_rel} released and {n_kept} kept.",
                           "Raise data.n_train / data.n_val, or give more prompts of the kept categories.")
    folds = min(folds, n_rel, n_kept)  # every fold holds a prompt of each class
    feats = feats.float().cpu()
    fold = stratified_folds(y, folds, seed)
    per_layer: list[dict[str, Any]] = [{"layer": int(la), "auc": {}} for la in layers]
    best: tuple[float, int, float] | None = None  # (auc, -layer index, penalty)
    oof_best = None
    for pen in penalties:
        oof = _out_of_fold(feats, y, fold, pen, shrinkage)
        for j in range(len(layers)):
            a = auc(oof[j], y)
            per_layer[j]["auc"][str(pen)] = round(a, 4)
            key = (round(a, 6), -j, pen)
            if best is None or key > best:
                best, oof_best = key, oof[j]
    assert best is not None and oof_best is not None
    j, pen = -best[1], best[2]
    thr_oof = threshold_for(oof_best[~y], max_kept_release)
    w, b, mean, scale = fit_ridge(feats[j], y, pen, shrinkage)
    by_cat: dict[str, list[bool]] = {}
    for c, p in zip(categories, (oof_best > thr_oof).tolist()):
        by_cat.setdefault(c, []).append(bool(p))
    info = {
        "method": f"ridge regression of ±1 labels on per-dimension standardised features ({pool} pool), "
                  f"{folds}-fold stratified cross-validation on the harmful train and val prompts; layer and penalty "
                  f"by out-of-fold ROC AUC (ties: earlier layer, stronger penalty); threshold: at most "
                  f"{max_kept_release:g} of the kept prompts' out-of-fold scores above it",
        "pool": pool, "skip": skip, "folds": folds, "seed": seed, "penalties": list(penalties), "penalty": pen,
        "shrinkage": shrinkage, "max_kept_release": max_kept_release, "per_layer": per_layer,
        "n": {"released": n_rel, "kept": n_kept},
        "out_of_fold": {"auc": round(best[0], 4), **_rates(oof_best > thr_oof, y)},
        "out_of_fold_released_by_category": {c: {"released": sum(v), "n": len(v)} for c, v in by_cat.items()},
    }
    return KeepCondition(int(layers[j]), w, float(thr_oof - float(b)), list(released), list(kept), mean, scale,
                         pool, skip, info)


def instruction_mean(skip: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A pool for :func:`~refusal.directions.inlp.activations.collect_activations`: each row's mean over its real
    tokens after the first ``skip`` (the template's tokens before the instruction; left padding), as ``(B, 1, d)``."""
    def pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = mask.long().cumsum(-1) - 1
        keep = ((mask > 0) & (pos >= skip)).to(x.dtype).unsqueeze(-1)
        return ((x * keep).sum(1) / keep.sum(1).clamp_min(1)).unsqueeze(1)
    return pool


def prompt_activations(model: Any, tokenizer: Any, prompts: Sequence[str], layers: Sequence[int], *,
                       pool: str = "last", skip: int = 0, batch_size: int = 32, description: str = "",
                       batching: Batching | None = None) -> torch.Tensor:
    """The inputs of decoder ``layers`` for each templated prompt, no intervention, at its last token
    (``pool="last"``) or averaged over its tokens after the template's first ``skip`` (``pool="mean"``):
    ``(len(layers), len(prompts), d)`` float32 on the CPU (batched; the forward stops after the deepest layer)."""
    from .inlp.activations import collect_activations

    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}")
    if not prompts:
        from ..models.parts import find_parts

        return torch.zeros(len(layers), 0, find_parts(model).hidden_size)
    return collect_activations(model, tokenizer, list(prompts), 1, list(layers), batch_size, description,
                               pool=instruction_mean(skip) if pool == "mean" else None, batching=batching)[0].cpu()


def route(model: Any, tokenizer: Any, condition: KeepCondition, prompts: Sequence[str], *,
          batch_size: int = 32, description: str = "Routing prompts (keep-refusal condition)",
          batching: Batching | None = None) -> list[bool]:
    """For each templated prompt: True if the condition routes it to release (edit applied), False to keep (no
    edit). One batched forward up to the condition's layer, with no intervention."""
    if not prompts:
        return []
    acts = prompt_activations(model, tokenizer, prompts, [condition.layer], pool=condition.pool,
                              skip=condition.skip, batch_size=batch_size, description=description,
                              batching=batching)[0]
    return condition.release(acts)
