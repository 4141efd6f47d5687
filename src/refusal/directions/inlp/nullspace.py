"""The rounds of iterative nullspace projection on one block of components: each round projects the original
activations onto the nullspace of the directions found so far (``x (I - B^T B)``), trains the classifier there,
accepts its unit weight vector or stops the component, and re-orthonormalises the accepted rows ``W`` into ``B``
(Cholesky QR, from ``W`` itself rather than a product of per-step projections).
"""

from __future__ import annotations

import torch

from .classifier import _balanced_accuracy, _fit_centred

_INDEPENDENT = 1e-3  # a new direction must keep this much of its norm after removing the ones found before


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

