"""Small linear algebra shared by the value types and the interventions: orthonormal bases of directions.

It sits below both :mod:`refusal.directions` and :mod:`refusal.interventions` (and imports neither), so that a
direction can give its orthonormal basis and an operator can build one without either importing the other.
"""

from __future__ import annotations

import torch


def orthonormalize(rows: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Orthonormal rows spanning ``rows`` (``(k, d)``, or ``(..., k, d)`` batched); rows that add nothing new (zero or
    dependent) are dropped for a 2-D input and zeroed for a batched one, so a batch keeps its shape."""
    r = rows.float()
    if r.ndim == 1:
        r = r[None]
    q, upper = torch.linalg.qr(r.transpose(-1, -2))  # (..., d, k)
    diag = upper.diagonal(dim1=-2, dim2=-1).abs()
    scale = r.norm(dim=-1).amax(-1, keepdim=True).clamp_min(1e-30)
    keep = diag > eps * scale
    q = q.transpose(-1, -2) * keep[..., None]
    if q.ndim == 2:
        q = q[keep]
    return q.contiguous()


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length (a zero row stays zero)."""
    r = rows.float()
    return r / r.norm(dim=-1, keepdim=True).clamp_min(1e-30)
