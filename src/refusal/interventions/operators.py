"""Operators: how an intervention changes an activation ``x`` (where it acts is a :mod:`scope <.scopes>`).

* :class:`ProjectOut` — directional ablation, ``x − P x`` with ``P`` the projection onto a direction or subspace;
* :class:`Add` — activation addition, ``x + c·v`` with the raw vector ``v`` (the difference in means, as the paper);
* :class:`Reflect` — counterfactual reflection, ``x − (1 + α)·P x``: α = 1 mirrors ``x`` across the hyperplane, so an
  activation on one side of it lands on the other; α = 0 is ablation;
* :class:`Compose` — several operators applied in order.

Every operator lowers to :class:`Edit` steps of one form, ``x ← x − ((x·U)·c)·U + v`` with ``U`` orthonormal rows,
so operators of different kinds for different batch rows run as one batched kernel at each site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import orthonormalize


@dataclass(frozen=True)
class Edit:
    """``x ← x − ((x·Uᵀ)·c)·U + v``: ``U`` ``(k, d)`` orthonormal or None, ``c`` ``(k,)``, ``v`` ``(d,)`` or None."""

    basis: torch.Tensor | None
    coeffs: torch.Tensor | None
    shift: torch.Tensor | None


class Operator:
    """Something that changes an activation; lowers to a sequence of :class:`Edit` steps."""

    def edits(self) -> list[Edit]:  # pragma: no cover - interface
        raise NotImplementedError

    def __rshift__(self, other: Operator) -> Compose:
        """``a >> b``: apply ``a``, then ``b``."""
        return Compose((self, other))

    @property
    def additive(self) -> bool:
        return all(e.basis is None for e in self.edits())


def _basis(vectors: torch.Tensor) -> torch.Tensor:
    return orthonormalize(torch.as_tensor(vectors).float())


@dataclass(frozen=True)
class ProjectOut(Operator):
    """Remove the component in the span of ``vectors`` (``(d,)`` or ``(k, d)``; orthonormalised here)."""

    vectors: torch.Tensor

    def edits(self) -> list[Edit]:
        u = _basis(self.vectors)
        return [Edit(u, torch.ones(u.shape[0]), None)]


@dataclass(frozen=True)
class Add(Operator):
    """Add ``coeff * vector`` (the raw vector: its norm matters)."""

    vector: torch.Tensor
    coeff: float = 1.0

    def edits(self) -> list[Edit]:
        v = torch.as_tensor(self.vector).float()
        if v.ndim != 1:
            raise ValueError(f"Add takes one vector of shape (d,), not {tuple(v.shape)}")
        return [Edit(None, None, self.coeff * v)]


@dataclass(frozen=True)
class Reflect(Operator):
    """``x − (1 + alpha)·P x`` with ``P`` the projection onto the span of ``vectors``."""

    vectors: torch.Tensor
    alpha: float = 1.0

    def edits(self) -> list[Edit]:
        u = _basis(self.vectors)
        return [Edit(u, torch.full((u.shape[0],), 1.0 + self.alpha), None)]


@dataclass(frozen=True)
class Compose(Operator):
    """Operators applied in order (a projection followed by an addition is one step)."""

    ops: tuple[Operator, ...]

    def edits(self) -> list[Edit]:
        out: list[Edit] = []
        for op in self.ops:
            for e in op.edits():
                last = out[-1] if out else None
                if last is not None and last.shift is None and e.basis is None:
                    out[-1] = Edit(last.basis, last.coeffs, e.shift)  # project, then add: one step
                else:
                    out.append(e)
        return out


def apply_edit(x: torch.Tensor, basis: torch.Tensor | None, coeffs: torch.Tensor | None,
               shift: torch.Tensor | None) -> torch.Tensor:
    """One edit on ``x`` ``(B, T, d)`` (or ``(T, d)``); tensors either shared (``(k, d)``, ``(k,)``, ``(d,)``) or per
    batch row (``(B, k, d)``, ``(B, k)``, ``(B, d)``). A single direction costs a dot product and a fused
    multiply-subtract, not a matmul with an inner dimension of one."""
    if basis is not None:
        assert coeffs is not None, "an edit with a basis has its coefficients"
        per_row = basis.ndim == 3
        if basis.shape[-2] == 1:
            u = basis[..., 0, :]
            if per_row and x.ndim == 3:
                u = u[:, None, :]
            dot = torch.linalg.vecdot(x, u).unsqueeze(-1)
            c = coeffs[..., 0]
            if per_row and x.ndim == 3:
                c = c[:, None, None]
            x = torch.addcmul(x, dot * c, u, value=-1)
        elif per_row:
            coef = torch.einsum("btd,bkd->btk", x, basis) * coeffs[:, None, :]
            x = x - torch.einsum("btk,bkd->btd", coef, basis)
        else:
            x = x - ((x @ basis.T) * coeffs) @ basis
    if shift is not None:
        x = x + (shift[:, None, :] if shift.ndim == 2 and x.ndim == 3 else shift)
    return x
