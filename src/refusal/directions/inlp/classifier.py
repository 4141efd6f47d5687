"""The linear classifier INLP trains at every round, batched over components, and its balanced accuracy.

The classifier is L2-regularised logistic regression (or a squared-hinge linear SVM) with balanced class weights,
fitted by damped Newton's method to convergence. When ``d > N`` (the usual case: d_model in the thousands, a few
hundred prompts) it is solved in the ``N``-dimensional span of the training activations (the representer theorem:
the optimal ``w`` is a combination of the centred activations), so the cost does not grow with ``d`` beyond a few
matmuls; otherwise in the ``d`` features directly.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

CLASSIFIERS = ("logistic", "svm")
_LINE_STEPS = 0.5 ** torch.arange(0, 40, dtype=torch.float64)  # backtracking step sizes 1, 1/2, ..., 2^-39


@overload
def _loss_terms(m: torch.Tensor, classifier: str, derivatives: Literal[True] = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@overload
def _loss_terms(m: torch.Tensor, classifier: str, derivatives: Literal[False]) -> torch.Tensor: ...


def _loss_terms(m: torch.Tensor, classifier: str, derivatives: bool = True
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

