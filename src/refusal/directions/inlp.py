"""Candidate refusal subspaces by Iterative Nullspace Projection (INLP; Ravfogel et al. 2020).

At every component (a decoder layer's input × a post-instruction position) INLP repeatedly

1. trains a linear classifier harmful vs harmless on the current activations,
2. takes its unit weight vector ``w_i`` and stacks it onto ``W = [w_1; ...; w_i]``,
3. builds ``P = I - B^T B`` from an orthonormal basis ``B`` of the rows of ``W`` (the projection onto the intersection
   of their nullspaces, computed from ``W`` itself, never as a product of per-step projections, which drifts), and
4. re-projects the *original* activations with ``P`` for the next round,

until ``n_iterations`` rounds have run or a classifier is no better than chance on held-out prompts. The rows of ``B``
span a subspace that, removed, leaves harmful and harmless linearly inseparable at that component; the first row is
the single most separating direction found (compare the difference in means).

Everything is batched over components: activations ``(C, N, d)`` train ``C`` classifiers at once with batched matmuls
and solves (no Python loop over components), in float64 on the activations' device.

The classifier is L2-regularised logistic regression (or a squared-hinge linear SVM) with balanced class weights,
fitted by damped Newton's method to convergence. When ``d > N`` (the usual case: d_model in the thousands, a few
hundred prompts) it is solved in the ``N``-dimensional span of the training activations (the representer theorem:
the optimal ``w`` is a combination of the centred activations), so the cost does not grow with ``d`` beyond a few
matmuls; otherwise in the ``d`` features directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..batching import in_batches
from ..models.norms import with_fused_norms
from ..models.parts import decoder, find_parts, model_device
from ..templates import check_prompts_end_with, post_instruction_ids, tokenize

CLASSIFIERS = ("logistic", "svm")
_LINE_STEPS = 0.5 ** torch.arange(0, 40, dtype=torch.float64)  # backtracking step sizes 1, 1/2, ..., 2^-39
_INDEPENDENT = 1e-3  # a new direction must keep this much of its norm after removing the ones found before


# ---- activations --------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: the rest of the forward is not needed."""


@torch.no_grad()
def collect_activations(
    model, tokenizer, prompts: Sequence[str], n_positions: int, layers: Sequence[int] | None = None,
    batch_size: int = 32, description: str = "",
) -> torch.Tensor:
    """Per-prompt residual-stream inputs of the decoder layers at the last ``n_positions`` tokens.

    Returns ``(n_positions, len(layers), len(prompts), d)`` float32 on the model's device (all layers if ``layers``
    is None; only the requested ones are stored, and the forward stops after the deepest one). Prompts are templated
    already and left-padded, so the last positions are the post-instruction tokens, as in
    :func:`~refusal.directions.diff_means.mean_activations` (whose result is this one's mean over prompts)."""
    parts = find_parts(model)
    dev = model_device(model)
    layers = list(range(parts.n_layers)) if layers is None else [int(i) for i in layers]
    if not layers or len(set(layers)) != len(layers) or not all(0 <= i < parts.n_layers for i in layers):
        raise ValueError(f"layers must be distinct indices in 0..{parts.n_layers - 1}; got {layers}")
    if n_positions < 1:
        raise ValueError("n_positions must be at least 1")
    prompts = list(prompts)
    out = torch.zeros(n_positions, len(layers), len(prompts), parts.hidden_size, dtype=torch.float32, device=dev)
    # a chunk's rows go to ``caught`` during its forward and into ``out`` only once the forward has finished, so a
    # chunk retried after running out of memory part-way through the layers is stored once, from the retry
    caught: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make_hook(j: int, i: int):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            caught[j] = x[:, -n_positions:, :].to(device=dev, dtype=torch.float32, copy=True)
            if i == deepest:
                raise _StopForward
        return hook

    handles = [parts.layers[i].register_forward_pre_hook(make_hook(j, i), with_kwargs=True)
               for j, i in enumerate(layers)]
    base = decoder(model)
    done = 0
    try:
        def run(chunk):
            nonlocal done
            caught.clear()
            b = tokenize(tokenizer, list(chunk), dev)
            pos = (b.attention_mask.cumsum(-1) - 1).clamp_min(0)  # positions count real tokens, not padding
            try:
                base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos, use_cache=False)
            except _StopForward:
                pass
            rows = torch.stack([caught[j] for j in range(len(layers))])  # (L, B, n_pos, d)
            out[:, :, done:done + len(chunk)] = rows.permute(2, 0, 1, 3)
            done += len(chunk)
            caught.clear()

        in_batches(run, prompts, batch_size, description)
    finally:
        for h in handles:
            h.remove()
        caught.clear()
    return out


# ---- the classifier -----------------------------------------------------------------------------------------------


def _loss_terms(m: torch.Tensor, classifier: str, derivatives: bool = True):
    """Per-sample loss of the margin ``m = y f`` and its first two derivatives with respect to ``m``."""
    if classifier == "logistic":
        loss = torch.nn.functional.softplus(-m)
        if not derivatives:
            return loss
        p = torch.sigmoid(-m)
        return loss, -p, p * (1 - p)
    slack = (1 - m).clamp_min(0)  # squared hinge (L2-SVM); its generalised second derivative is 2 on the margin
    if not derivatives:
        return slack.square()
    return slack.square(), -2 * slack, 2.0 * (m < 1).to(m.dtype)


def _fit_centred(x: torch.Tensor, y: torch.Tensor, classifier: str, l2: float, max_iter: int = 100,
                 tol: float = 1e-12, dual: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched fit on centred float64 activations ``x`` ``(C, N, d)``, labels ``y`` ``(N,)`` bool (True = positive).

    Minimises, per component, ``J(w, b) = (1/N) sum_i s_i loss(y_i (w.x_i + b)) + (l2/2) |w|^2`` with balanced class
    weights ``s_i = N / (2 N_class(i))`` (scikit-learn's ``class_weight="balanced"``; they sum to N) and the
    intercept not penalised. Returns ``w`` ``(C, d)``, ``b`` ``(C,)`` and the training scores ``x w + b`` ``(C, N)``.

    Damped Newton: each step solves the Newton system for all components at once (one batched LU), then a
    backtracking (Armijo) line search evaluates 40 step sizes at once and each component takes the longest that
    decreases its objective enough. It stops when every component's Newton decrement is below ``tol``.

    ``dual`` (default: ``d > N``) solves in the span of the training activations: ``w = x^T a``, so the scores are
    ``K a + b`` with the Gram matrix ``K = x x^T`` and the penalty is ``a^T K a``. The Newton system of ``(a, b)``
    is ``[[K H K + l2 K, K h], [h^T K, sum h]]``; its first block row has the factor ``K`` on the left, and dropping
    it gives the ``(N+1)``-square system ``[[H K + l2 I, h], [h^T K, sum h]] (da, db) = -(q + l2 a, sum q)``, which
    is invertible whenever ``l2 > 0`` and some ``h_i > 0`` even though ``K`` is singular (centred data, or d < N),
    and gives the same step in ``w`` and the scores."""
    C, N, d = x.shape
    dual = d > N if dual is None else dual
    yy = torch.where(y, 1.0, -1.0).to(x)
    n_pos = int(y.sum())
    w_pos, w_neg = (torch.tensor(1 / (2.0 * n), dtype=x.dtype, device=x.device) for n in (n_pos, N - n_pos))
    s = torch.where(y, w_pos, w_neg)  # the balanced weights N / (2 N_class) with the 1/N folded in
    feats = x @ x.mT if dual else x  # (C, N, N) Gram matrix, or the features themselves
    r = feats.shape[-1]
    eye = torch.eye(r, dtype=x.dtype, device=x.device)
    theta = x.new_zeros(C, r + 1)  # (a, b) or (w, b)
    ones = x.new_ones(C, N, 1)
    feats1 = torch.cat([feats, ones], -1)  # scores = feats1 @ theta
    steps = _LINE_STEPS.to(x.device)

    def penalty_form(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (u, v) in the norm of w (without b)
        if dual:
            return (u[:, :r] * (feats @ v[:, :r, None])[..., 0]).sum(-1)
        return (u[:, :r] * v[:, :r]).sum(-1)

    for _ in range(max_iter):
        f = (feats1 @ theta[..., None])[..., 0]
        m = yy * f
        loss, d1, d2 = _loss_terms(m, classifier)
        q = s * yy * d1  # dJ/df_i
        h = s * d2  # d2J/df_i^2
        grad_b = q.sum(-1, keepdim=True)
        if dual:
            a = theta[:, :r]
            rhs = torch.cat([q + l2 * a, grad_b], -1)
            top = torch.cat([h[..., None] * feats + l2 * eye, h[..., None]], -1)
            bottom = torch.cat([(h[:, None, :] @ feats), h.sum(-1)[:, None, None]], -1)
            grad = torch.cat([(feats @ (q + l2 * a)[..., None])[..., 0], grad_b], -1)
        else:
            w = theta[:, :r]
            rhs = torch.cat([(x.mT @ q[..., None])[..., 0] + l2 * w, grad_b], -1)
            xh = x.mT @ h[..., None]  # (C, d, 1)
            top = torch.cat([x.mT @ (h[..., None] * x) + l2 * eye, xh], -1)
            bottom = torch.cat([xh.mT, h.sum(-1)[:, None, None]], -1)
            grad = rhs
        system = torch.cat([top, bottom], -2)
        system[:, r, r] += 1e-12  # the intercept has no penalty: keep the system regular with no active sample
        step = -torch.linalg.solve(system, rhs)
        decrement = -(grad * step).sum(-1)  # the Newton decrement squared; >= 0 up to rounding
        if not bool((decrement > tol).any()):
            break
        # backtracking line search on all components and all step sizes at once
        df = (feats1 @ step[..., None])[..., 0]
        f_t = f[..., None] + df[..., None] * steps  # (C, N, T)
        data_t = (s[..., None] * _loss_terms(yy[:, None] * f_t, classifier, derivatives=False)).sum(1)
        p0, p1, p2 = penalty_form(theta, theta), penalty_form(theta, step), penalty_form(step, step)
        obj_t = data_t + 0.5 * l2 * (p0[:, None] + 2 * steps * p1[:, None] + steps.square() * p2[:, None])
        obj_0 = (s * loss).sum(-1) + 0.5 * l2 * p0
        ok = obj_t <= obj_0[:, None] - 1e-4 * steps * decrement.clamp_min(0)[:, None]
        t = torch.where(ok.any(-1), steps[ok.to(torch.int8).argmax(-1)], 0.0)  # the longest good step, or none
        if not bool((t > 0).any()):
            break
        theta = theta + t[:, None] * step
    scores = (feats1 @ theta[..., None])[..., 0]
    w = (x.mT @ theta[:, :r, None])[..., 0] if dual else theta[:, :r]
    return w, theta[:, r], scores


def fit_linear(
    x: torch.Tensor, y: torch.Tensor, *, classifier: str = "logistic", l2: float = 1e-3, max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``C`` linear classifiers at once: ``x`` ``(C, N, d)`` (or ``(N, d)``), ``y`` ``(N,)`` bool (True =
    positive class). Returns weights ``(C, d)`` and intercepts ``(C,)`` (squeezed for a 2-D input), in ``x``'s dtype,
    for the uncentred ``x``: ``score = x @ w + b``, positive for the positive class.

    The objective is ``(1/N) sum_i s_i loss_i + (l2/2) |w|^2`` with balanced class weights, i.e. scikit-learn's
    ``LogisticRegression(C=1/(l2*N), class_weight="balanced")`` (see :func:`_fit_centred`)."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}; got {classifier!r}")
    if l2 <= 0:
        raise ValueError("l2 must be positive")
    squeeze = x.ndim == 2
    x64 = (x[None] if squeeze else x).double()
    y = torch.as_tensor(y, device=x.device).bool()
    if y.ndim != 1 or y.shape[0] != x64.shape[1] or bool(y.all()) or not bool(y.any()):
        raise ValueError("y must be a 1-D boolean vector over the samples with both classes present")
    mu = x64.mean(1, keepdim=True)
    w, b, _ = _fit_centred(x64 - mu, y, classifier, l2, max_iter)
    b = b - (mu[:, 0] * w).sum(-1)
    w, b = w.to(x.dtype), b.to(x.dtype)
    return (w[0], b[0]) if squeeze else (w, b)


def _balanced_accuracy(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean of the per-class recalls (plain accuracy when the classes are balanced; chance is 0.5 either way)."""
    pred = scores > 0
    return 0.5 * ((pred & y).sum(-1) / y.sum() + (~pred & ~y).sum(-1) / (~y).sum())


def _orthonormal_rows(w: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows ``Q`` spanning the rows of ``w`` ``(C, k, d)`` (full row rank), with ``w = R^T Q`` for an
    upper-triangular ``R`` of positive diagonal, so row ``j`` of ``Q`` spans what row ``j`` of ``w`` adds to the
    rows before it, with the same sign. Cholesky QR, done twice (CholQR2): batched k×k Cholesky factorisations and
    matmuls, accurate to rounding for well-conditioned rows (ours are orthogonal up to the solver's tolerance, and
    each keeps at least ``_INDEPENDENT`` of its norm after the others), and fast for thousands of components."""
    q = w
    for _ in range(2):
        chol = torch.linalg.cholesky(q @ q.mT)  # (C, k, k) lower triangular: q = chol @ q_new
        q = torch.linalg.solve_triangular(chol, q, upper=False)
    return q


# ---- INLP ---------------------------------------------------------------------------------------------------------


@dataclass
class InlpResult:
    """INLP subspaces at ``C = len(positions) * len(layers)`` components, position-major (component
    ``c = positions.index(pos) * len(layers) + layers.index(layer)``).

    ``basis`` ``(C, k_max, d)``: orthonormal rows (the first ``rank[c]``; zero rows after), spanning the accepted
    classifiers' directions, each row oriented so that the mean harmful training activation projects higher than the
    mean harmless one. ``weights`` ``(C, k_max, d)``: those classifiers' unit weight vectors themselves (the rows of
    ``W``; ``basis`` is its orthonormalisation, equal up to rounding since each is found in the nullspace of the
    ones before). ``first`` ``(C, d)``: the first classifier's unit weight vector, oriented the same way, also where
    it was not accepted (``rank == 0``). ``train_accuracy``/``heldout_accuracy`` ``(C, n_iterations)``: balanced
    accuracy of the classifier of each round, NaN after the component stopped."""

    basis: torch.Tensor
    rank: torch.Tensor
    train_accuracy: torch.Tensor
    heldout_accuracy: torch.Tensor
    positions: list[int]
    layers: list[int]
    weights: torch.Tensor
    first: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)
    model: str = ""

    @property
    def n_iterations(self) -> int:
        return self.train_accuracy.shape[1]

    def index(self, pos: int, layer: int) -> int:
        if pos not in self.positions or layer not in self.layers:
            raise KeyError(f"no component at position {pos}, layer {layer} (positions {self.positions}, layers "
                           f"{self.layers[0]}..{self.layers[-1]})")
        return self.positions.index(pos) * len(self.layers) + self.layers.index(layer)

    def subspace(self, pos: int, layer: int) -> torch.Tensor:
        """The orthonormal ``(k, d)`` basis found at that component (``k = rank``, possibly 0)."""
        c = self.index(pos, layer)
        return self.basis[c, :int(self.rank[c])]

    def first_direction(self, pos: int, layer: int) -> torch.Tensor:
        """The first classifier's unit weight vector ``(d,)``: harmful activations project higher on average."""
        return self.first[self.index(pos, layer)]

    def projection(self, pos: int, layer: int) -> torch.Tensor:
        """``P = I - B^T B`` ``(d, d)``: the projection onto the intersection of the classifiers' nullspaces."""
        b = self.subspace(pos, layer).double()
        return (torch.eye(b.shape[-1], dtype=b.dtype) - b.T @ b).float()

    def direction(self, pos: int, layer: int):
        """The subspace at that component as a :class:`~refusal.directions.base.Direction` (method ``inlp``)."""
        from .base import Direction

        c = self.index(pos, layer)
        if int(self.rank[c]) == 0:
            raise ValueError(f"INLP found no direction at position {pos}, layer {layer}")
        return Direction(self.subspace(pos, layer).clone(), layer, pos, self.model, "inlp",
                         extra={"rank": int(self.rank[c]), "heldout_accuracy": _curve(self.heldout_accuracy[c])})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the settings and, per component, its rank and accuracy curves (NaN → null)."""
        comps = []
        for p in self.positions:
            for layer in self.layers:
                c = self.index(p, layer)
                comps.append({"pos": p, "layer": layer, "rank": int(self.rank[c]),
                              "train_accuracy": _curve(self.train_accuracy[c]),
                              "heldout_accuracy": _curve(self.heldout_accuracy[c])})
        return {"method": "inlp", "model": self.model, "config": self.config, "positions": self.positions,
                "layers": self.layers, "components": comps}

    def save(self, path: str | Path) -> None:
        io.write_tensors(Path(path), {"basis": self.basis, "rank": self.rank, "weights": self.weights,
                                      "first": self.first, "train_accuracy": self.train_accuracy,
                                      "heldout_accuracy": self.heldout_accuracy},
                         {"positions": self.positions, "layers": self.layers, "config": self.config,
                          "model": self.model})

    @classmethod
    def load(cls, path: str | Path) -> InlpResult:
        t, m = io.read_tensors(Path(path))
        return cls(t["basis"], t["rank"], t["train_accuracy"], t["heldout_accuracy"], list(m["positions"]),
                   list(m["layers"]), t["weights"], t["first"], dict(m.get("config") or {}), m.get("model", ""))


def _curve(row: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 6) for v in row.tolist()]


def _inlp_chunk(xtr: torch.Tensor, ytr: torch.Tensor, xhe: torch.Tensor, yhe: torch.Tensor, n_iterations: int,
                min_accuracy: float, margin: float, classifier: str, l2: float, max_newton: int) -> dict:
    """INLP on one block of components: ``xtr`` ``(C, N_train, d)``, ``xhe`` ``(C, N_heldout, d)``."""
    C, _, d = xtr.shape
    dev = xtr.device
    weights = torch.zeros(C, n_iterations, d, dtype=torch.float64, device=dev)
    basis = torch.zeros_like(weights)
    first = torch.zeros(C, d, dtype=torch.float64, device=dev)
    rank = torch.zeros(C, dtype=torch.long, device=dev)
    acc_tr = torch.full((C, n_iterations), float("nan"), device=dev)
    acc_he = torch.full((C, n_iterations), float("nan"), device=dev)
    has_heldout = xhe.shape[1] > 0
    # one scalar per component, from the original training activations: l2 acts on activations of unit mean squared
    # norm (after centring), whatever the model's residual-stream scale; it does not change any direction
    x64 = xtr.double()
    scale = (x64 - x64.mean(1, keepdim=True)).square().sum(-1).mean(-1).sqrt().clamp_min(1e-30)
    del x64
    active = torch.arange(C, device=dev)  # components still going; all have found exactly ``it`` directions so far
    for it in range(n_iterations):
        if active.numel() == 0:
            break
        b_prev = basis[active, :it]  # (A, it, d)
        xa = xtr[active].double()
        ha = xhe[active].double()
        if it:  # the original activations, projected onto the nullspace of all directions so far: x (I - B^T B)
            xa.baddbmm_(xa @ b_prev.mT, b_prev, alpha=-1)
            ha.baddbmm_(ha @ b_prev.mT, b_prev, alpha=-1)
        centre = xa.mean(1, keepdim=True)
        sc = scale[active, None, None]
        xa.sub_(centre).div_(sc)
        ha.sub_(centre).div_(sc)
        w, b, scores = _fit_centred(xa, ytr, classifier, l2, max_newton)
        a_tr = _balanced_accuracy(scores, ytr)
        a_he = _balanced_accuracy((ha @ w[..., None])[..., 0] + b[:, None], yhe) if has_heldout else a_tr
        acc_tr[active, it] = a_tr.float()
        if has_heldout:
            acc_he[active, it] = a_he.float()
        # orientation: the mean harmful activation projects higher (the class means of the projected, centred data)
        gap = xa[:, ytr].mean(1) - xa[:, ~ytr].mean(1)
        norm = w.norm(dim=-1, keepdim=True)
        new = torch.nan_to_num(w / norm.clamp_min(1e-300))
        new = new * torch.where((new * gap).sum(-1, keepdim=True) < 0, -1.0, 1.0)
        if it == 0:
            first[active] = new
        # what the new direction adds to the span of the ones before (~1: it was found in their nullspace)
        fresh = (new - ((new[:, None] @ b_prev.mT) @ b_prev)[:, 0]).norm(dim=-1)
        # (a weight below 1e-8 moves no score of these unit-scale activations: the classifier found nothing; with
        # balanced weights that is exact once the class-mean difference lies in the span removed, since the gradient
        # at w = 0 is that difference and the objective is convex)
        accept = ((a_he >= min_accuracy) & (a_he > 0.5 + margin) & (fresh > _INDEPENDENT) & (norm[:, 0] > 1e-8))
        # a component whose classifier is not accepted adds no direction, so its activations would not change and
        # the next round would train the same classifier again: it stops here
        active = active[accept]
        if active.numel() == 0:
            break
        weights[active, it] = new[accept]
        # the rowspace of W = [w_1; ...; w_it+1], from an orthonormal basis of W's rows (QR), not per-step products
        basis[active, :it + 1] = _orthonormal_rows(weights[active, :it + 1])
        rank[active] += 1
    return {"basis": basis, "weights": weights, "first": first, "rank": rank, "train_accuracy": acc_tr,
            "heldout_accuracy": acc_he}


def _components(acts: torch.Tensor, what: str) -> torch.Tensor:
    if acts.ndim == 4:
        return acts.reshape(-1, *acts.shape[2:])
    if acts.ndim != 3:
        raise ValueError(f"{what} activations must be (C, N, d) or (n_positions, n_layers, N, d); got "
                         f"{tuple(acts.shape)}")
    return acts


def inlp(
    harmful_acts: torch.Tensor, harmless_acts: torch.Tensor, *, n_iterations: int = 16, min_accuracy: float = 0.55,
    margin: float = 0.02, heldout_fraction: float = 0.2, classifier: str = "logistic", l2: float = 1e-3,
    seed: int = 0, positions: Sequence[int] | None = None, layers: Sequence[int] | None = None,
    component_batch: int | None = None, max_newton: int = 100, model_name: str = "",
) -> InlpResult:
    """Iterative nullspace projection at every component, batched over components.

    ``harmful_acts`` ``(C, N_h, d)`` and ``harmless_acts`` ``(C, N_b, d)``, or the 4-D output of
    :func:`collect_activations` (flattened position-major). A 4-D input's components are ``positions`` (default
    ``-n_positions..-1``) × ``layers`` (default ``0..n_layers-1``; pass the layers that were collected); a 3-D input's
    are ``layers`` (default ``0..C-1``) at ``positions`` (default ``[-1]``).

    Each class is split at random (``seed``) into ``heldout_fraction`` held out and the rest for training, the same
    prompts for every component. A round trains the classifier (``"logistic"`` or ``"svm"``, squared hinge; L2
    strength ``l2`` on activations scaled to unit mean squared norm per component, see :func:`fit_linear`) and
    measures its balanced accuracy on the held-out prompts (on the training ones if ``heldout_fraction == 0``). Its
    direction is accepted if that accuracy is at least ``min_accuracy`` and more than ``0.5 + margin`` (not within
    ``margin`` of chance). Otherwise the component stops: no direction is added, so the next round would see the
    same activations and train the same classifier (the reference implementation keeps going with ``continue``
    because its rounds are randomised; ours are deterministic given ``seed``). At most ``n_iterations`` rounds.

    ``component_batch`` bounds how many components are processed at once (memory: about ``3 * N * d`` float64
    values per component); None does all together."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}; got {classifier!r}")
    if n_iterations < 1 or l2 <= 0 or not 0 <= heldout_fraction < 1:
        raise ValueError("need n_iterations >= 1, l2 > 0 and 0 <= heldout_fraction < 1")
    four_d = harmful_acts.ndim == 4
    if four_d:
        positions = list(range(-harmful_acts.shape[0], 0)) if positions is None else list(positions)
        layers = list(range(harmful_acts.shape[1])) if layers is None else list(layers)
        if (len(positions), len(layers)) != tuple(harmful_acts.shape[:2]):
            raise ValueError(f"{len(positions)} positions × {len(layers)} layers do not match activations of shape "
                             f"{tuple(harmful_acts.shape)}")
    h, b = _components(harmful_acts, "harmful"), _components(harmless_acts, "harmless")
    if h.shape[0] != b.shape[0] or h.shape[2] != b.shape[2]:
        raise ValueError(f"harmful {tuple(h.shape)} and harmless {tuple(b.shape)} activations must have the same "
                         "components and hidden size")
    C = h.shape[0]
    if not four_d:
        positions = [-1] if positions is None else list(positions)
        layers = list(range(C // max(1, len(positions)))) if layers is None else list(layers)
    if len(positions) * len(layers) != C:
        raise ValueError(f"{len(positions)} positions × {len(layers)} layers != {C} components")
    b = b.to(h.device)

    gen = torch.Generator().manual_seed(seed)
    splits = []
    for n in (h.shape[1], b.shape[1]):
        perm = torch.randperm(n, generator=gen)
        n_he = int(round(n * heldout_fraction))
        if heldout_fraction > 0:
            n_he = max(1, n_he)
        if n - n_he < 1 or (heldout_fraction > 0 and n_he < 1):
            raise ValueError(f"too few prompts ({n}) in a class for a held-out fraction of {heldout_fraction}")
        splits.append((perm[n_he:].sort().values.to(h.device), perm[:n_he].sort().values.to(h.device)))
    (tr_h, he_h), (tr_b, he_b) = splits

    def labels(n_h: int, n_b: int) -> torch.Tensor:
        return torch.cat([torch.ones(n_h, dtype=torch.bool), torch.zeros(n_b, dtype=torch.bool)]).to(h.device)

    ytr, yhe = labels(len(tr_h), len(tr_b)), labels(len(he_h), len(he_b))
    step = C if not component_batch else int(component_batch)
    parts = []
    for c0 in range(0, C, step):
        hc, bc = h[c0:c0 + step].float(), b[c0:c0 + step].float()
        xtr = torch.cat([hc[:, tr_h], bc[:, tr_b]], 1)
        xhe = torch.cat([hc[:, he_h], bc[:, he_b]], 1)
        del hc, bc
        parts.append({k: v.cpu() for k, v in _inlp_chunk(xtr, ytr, xhe, yhe, n_iterations, min_accuracy, margin,
                                                          classifier, l2, max_newton).items()})
        del xtr, xhe
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    k_max = int(out["rank"].max()) if C else 0
    config = {"n_iterations": n_iterations, "min_accuracy": min_accuracy, "margin": margin,
              "heldout_fraction": heldout_fraction, "classifier": classifier, "l2": l2, "seed": seed,
              "n_harmful": int(h.shape[1]), "n_harmless": int(b.shape[1]),
              "n_train": [len(tr_h), len(tr_b)], "n_heldout": [len(he_h), len(he_b)]}
    return InlpResult(out["basis"][:, :k_max].float().contiguous(), out["rank"], out["train_accuracy"],
                      out["heldout_accuracy"], positions, layers, out["weights"][:, :k_max].float().contiguous(),
                      out["first"].float(), config, model_name)


@with_fused_norms
def extract_inlp(
    model, tokenizer, harmful_prompts: Sequence[str], harmless_prompts: Sequence[str], n_positions: int,
    layers: Sequence[int] | None = None, *, batch_size: int = 32, model_name: str = "", **kw,
) -> InlpResult:
    """Collect per-prompt activations (:func:`collect_activations`) and run :func:`inlp` on them (``**kw``)."""
    if not harmful_prompts or not harmless_prompts:
        raise ValueError("extract_inlp needs harmful and harmless prompts")
    if getattr(tokenizer, "chat_template", None):  # the last positions must be the post-instruction tokens
        check_prompts_end_with(tokenizer, list(harmful_prompts) + list(harmless_prompts),
                               post_instruction_ids(tokenizer))
    layers = list(range(find_parts(model).n_layers)) if layers is None else list(layers)
    h = collect_activations(model, tokenizer, harmful_prompts, n_positions, layers, batch_size,
                            "Collecting activations (harmful)")
    b = collect_activations(model, tokenizer, harmless_prompts, n_positions, layers, batch_size,
                            "Collecting activations (harmless)")
    return inlp(h, b, positions=list(range(-n_positions, 0)), layers=layers, model_name=model_name, **kw)


def plot_accuracy(result: InlpResult, pos: int, layer: int, path: str | Path) -> None:
    """PNG of the train and held-out accuracy of each round's classifier at one component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    c = result.index(pos, layer)
    rounds = list(range(1, result.n_iterations + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    ax.plot(rounds, result.train_accuracy[c].numpy(), marker="o", lw=1.4, label="train")
    ax.plot(rounds, result.heldout_accuracy[c].numpy(), marker="s", lw=1.4, label="held out")
    ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    min_acc = result.config.get("min_accuracy")
    if min_acc is not None:
        ax.axhline(min_acc, color="red", ls=":", lw=1, label="min accuracy")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round (directions removed before it = round - 1)")
    ax.set_ylabel("balanced accuracy")
    ax.set_ylim(0.3, 1.02)
    ax.set_title(f"INLP at position {pos}, layer {layer}: rank {int(result.rank[c])}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    io.write_bytes(Path(path), buf.getvalue())
