"""What INLP found, as an :class:`InlpResult`: per component its orthonormal subspace, the classifiers' unit weight
vectors, the first direction and the per-round accuracy curves; looked up by (position, layer), turned into a
:class:`~refusal.directions.base.Direction`, summarised as JSON and saved to or loaded from safetensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ... import io

if TYPE_CHECKING:
    from ..base import Direction


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

    def direction(self, pos: int, layer: int) -> Direction:
        """The subspace at that component as a :class:`~refusal.directions.base.Direction` (method ``inlp``)."""
        from ..base import Direction

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

