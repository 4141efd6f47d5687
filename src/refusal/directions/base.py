"""The value type for what a method finds: a direction or a subspace, with its provenance.

A :class:`Direction` holds a ``(k, d)`` basis (k = 1 for a single direction), or ``(n_layers, k, d)`` for one basis
per layer, with where it came from: the model's identity, the method (``diff_means``, ``inlp``, ...), the layer and
post-instruction position it was read at, the digest of the data it came from, and its scores. The rows are kept as
found (a difference in means keeps its norm, which activation addition uses); :meth:`Direction.orthonormal` gives
the orthonormal basis that projections use.

A :class:`DirectionSet` is a named collection (by rank, by method, later by language), saved as one safetensors file
with a JSON header; nothing is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..errors import RefusalError
from ..linalg import orthonormalize


@dataclass
class Direction:
    """A ``(k, d)`` basis (or ``(n_layers, k, d)``, one per layer) and where it came from.

    ``Direction(vector, layer, pos)`` with a ``(d,)`` vector makes a single direction; ``vector`` gives it back."""

    vectors: torch.Tensor
    layer: int | None = None
    pos: int | None = None
    model: str = ""  # the model's identity: hub id@revision, or sha256 of the weight files
    method: str = "diff_means"
    scores: dict[str, float] = field(default_factory=dict)
    data_digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vectors).detach().float()
        if v.ndim == 1:
            v = v[None]
        if v.ndim not in (2, 3) or v.shape[-1] == 0 or v.shape[-2] == 0:
            raise RefusalError(f"A direction needs shape (d,), (k, d) or (n_layers, k, d); got {tuple(v.shape)}.",
                               "Pass one vector, a stack of k vectors, or one stack per layer.")
        self.vectors = v

    # ---- shape ---------------------------------------------------------------------------------------------------

    @property
    def per_layer(self) -> bool:
        return self.vectors.ndim == 3

    @property
    def k(self) -> int:
        return self.vectors.shape[-2]

    @property
    def d(self) -> int:
        return self.vectors.shape[-1]

    @property
    def vector(self) -> torch.Tensor:
        """The single raw vector (``(d,)``) of a one-direction, one-layer basis."""
        if self.k != 1 or self.per_layer:
            raise RefusalError(f"This direction is a basis of shape {tuple(self.vectors.shape)}, not one vector.",
                               "Use .vectors, or .at_layer(i) for a per-layer basis.")
        return self.vectors[0]

    @property
    def unit(self) -> torch.Tensor:
        v = self.vector
        return v / v.norm()

    def orthonormal(self) -> torch.Tensor:
        """Orthonormal basis rows: ``(k', d)``, or ``(n_layers, k, d)`` with zero rows where a layer has fewer."""
        return orthonormalize(self.vectors)

    def at_layer(self, layer: int) -> torch.Tensor:
        """The raw ``(k, d)`` basis used at ``layer`` (the same one everywhere unless per-layer)."""
        return self.vectors[layer] if self.per_layer else self.vectors

    # ---- algebra -------------------------------------------------------------------------------------------------

    def stack(self, *others: Direction) -> Direction:
        """One basis holding the rows of this and the others (provenance of each kept in ``extra['parts']``)."""
        parts = (self, *others)
        if len({p.d for p in parts}) != 1 or len({p.per_layer for p in parts}) != 1:
            raise RefusalError("Directions of different hidden sizes (or per-layer and not) cannot be stacked.",
                               "Stack directions of the same model.")
        return Direction(torch.cat([p.vectors for p in parts], dim=-2), None, None, self.model, "stack",
                         extra={"parts": [p.metadata() for p in parts]})

    def cosine(self, other: Direction) -> torch.Tensor:
        """Cosine similarity of every row of this basis with every row of ``other``: ``(k, k_other)``."""
        if self.d != other.d:
            raise RefusalError(f"Hidden sizes differ ({self.d} vs {other.d}).", "Compare directions of one model.")
        a = torch.nn.functional.normalize(self.vectors.reshape(-1, self.d), dim=-1)
        b = torch.nn.functional.normalize(other.vectors.reshape(-1, other.d), dim=-1)
        return a @ b.T

    def check_model(self, hidden_size: int, n_layers: int) -> None:
        """Raise a clear error if this direction cannot belong to a model of that shape."""
        if self.d != hidden_size:
            raise RefusalError(f"The direction has size {self.d} but the model's hidden size is {hidden_size}: it "
                               "comes from another model.", "Use a direction extracted from this model.")
        if self.per_layer and self.vectors.shape[0] != n_layers:
            raise RefusalError(f"The direction has one basis for each of {self.vectors.shape[0]} layers but the model "
                               f"has {n_layers}.", "Use a direction extracted from this model.")
        if self.layer is not None and not 0 <= self.layer < n_layers:
            raise RefusalError(f"The direction's layer {self.layer} is outside the model's {n_layers} layers.",
                               "Use a direction extracted from this model.")

    # ---- interventions -------------------------------------------------------------------------------------------

    def ablate(self, model: Any, **kwargs: Any) -> AbstractContextManager[object]:
        """Context manager: project this direction (or subspace) out of the residual stream at every layer
        (``kwargs``: those of :func:`refusal.interventions.hooks.ablate`)."""
        from ..interventions import hooks

        return hooks.ablate(model, self.vectors, **kwargs)

    def add(self, model: Any, coeff: float = 1.0, layer: int | None = None) -> AbstractContextManager[object]:
        """Context manager: add ``coeff`` times the raw vector at the input of its source layer."""
        from ..interventions import hooks

        layer = self.layer if layer is None else layer
        if layer is None:
            raise RefusalError("This direction has no source layer to add it at.", "Pass layer=...")
        return hooks.add(model, self.vector, layer, coeff=coeff)

    # ---- persistence ---------------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {"layer": self.layer, "pos": self.pos, "model": self.model, "method": self.method,
                "scores": self.scores, "data_digest": self.data_digest, "extra": self.extra,
                "shape": list(self.vectors.shape)}

    def save(self, path: str | Path) -> None:
        io.write_tensors(Path(path), {"direction": self.vectors}, self.metadata())

    @classmethod
    def from_tensors(cls, vectors: torch.Tensor, meta: Mapping[str, Any]) -> Direction:
        def opt_int(x: Any) -> int | None:
            return None if x is None else int(x)
        return cls(vectors, opt_int(meta.get("layer")), opt_int(meta.get("pos")), meta.get("model", ""),
                   meta.get("method", "diff_means"), dict(meta.get("scores") or {}), meta.get("data_digest", ""),
                   dict(meta.get("extra") or {}))

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        if not Path(path).is_file():
            raise RefusalError(f"No direction file at '{path}'.", "Run 'refusal select' first, or check the path.")
        tensors, meta = io.read_tensors(Path(path))
        if "direction" not in tensors:
            raise RefusalError(f"'{path}' holds no tensor named 'direction'.", "Save it with Direction.save.")
        return cls.from_tensors(tensors["direction"], meta)

    def with_scores(self, **scores: float) -> Direction:
        return replace(self, scores={**self.scores, **scores})


class DirectionSet(Mapping[str, Direction]):
    """Named directions (``"0"``, ``"1"``, … by rank, ``"inlp"``, ``"fr"``, …), in insertion order."""

    def __init__(self, items: Mapping[str, Direction] | Iterable[tuple[str, Direction]] = ()):
        self._items: dict[str, Direction] = dict(items)

    def __getitem__(self, name: str) -> Direction:
        if name not in self._items:
            raise RefusalError(f"No direction named '{name}' (have: {', '.join(self._items) or 'none'}).",
                               "Pick one of those names.")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setitem__(self, name: str, d: Direction) -> None:
        self._items[name] = d

    def similarity(self) -> torch.Tensor:
        """Cosine similarity between the first rows of every pair: ``(n, n)``."""
        rows = torch.stack([torch.nn.functional.normalize(d.vectors.reshape(-1, d.d)[0], dim=0)
                            for d in self._items.values()])
        return rows @ rows.T

    def save(self, path: str | Path) -> None:
        tensors = {f"{i}": d.vectors.clone() for i, d in enumerate(self._items.values())}  # no shared storage
        meta = {"names": list(self._items), "directions": [d.metadata() for d in self._items.values()]}
        io.write_tensors(Path(path), tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        tensors, meta = io.read_tensors(Path(path))
        names = meta.get("names")
        if names is None or len(names) != len(tensors):
            raise RefusalError(f"'{path}' is not a direction set.", "Save it with DirectionSet.save.")
        return cls((n, Direction.from_tensors(tensors[f"{i}"], m))
                   for i, (n, m) in enumerate(zip(names, meta["directions"])))


def parse_ranks(spec: str, n: int) -> list[int]:
    """``"0-2"`` → [0, 1, 2]; ``"0,3,5"`` → [0, 3, 5]; every rank must be below ``n``."""
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise RefusalError(f"Cannot read the ranks '{spec}'.", "Write them like 0-2 or 0,3,5.") from None
    bad = [r for r in out if not 0 <= r < n]
    if not out or bad:
        raise RefusalError(f"Ranks {bad or spec} are out of range: there are {n} ranked directions (0..{n - 1}).",
                           "Pick ranks that exist.")
    return out

