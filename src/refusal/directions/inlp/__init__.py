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

The pieces: the per-prompt activations INLP trains on in :mod:`.activations`, the linear classifier (logistic
regression or a linear SVM, fitted by damped Newton) in :mod:`.classifier`, the rounds of nullspace projection in
:mod:`.nullspace`, what they find in :mod:`.result` (:class:`InlpResult`) with its accuracy plot in :mod:`.plot`, and
the entry points :func:`inlp` and :func:`extract_inlp` in :mod:`.extract`.
"""

from __future__ import annotations

from .activations import collect_activations
from .classifier import CLASSIFIERS, _fit_centred, fit_linear
from .extract import extract_inlp, inlp
from .nullspace import _orthonormal_rows
from .plot import plot_accuracy
from .result import InlpResult

__all__ = ["CLASSIFIERS", "InlpResult", "_fit_centred", "_orthonormal_rows", "collect_activations", "extract_inlp",
           "fit_linear", "inlp", "plot_accuracy"]
