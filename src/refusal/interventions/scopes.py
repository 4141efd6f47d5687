"""Scopes: where an operator acts — which layers, which sites of a layer, which token positions.

* layers: ``"source"`` (the direction's own layer), ``"all"``, a list of layer indices, or the top share of a
  ranking (``Scope(layers={"top": 0.5}, ...)`` with a ranking given when the scope is resolved);
* sites: ``"input"`` (the residual stream entering the block), ``"attn"`` (the attention block's output), ``"mlp"``
  (the MLP block's output); ablation at all three leaves no component anywhere in the residual stream;
* tokens: ``"all"``, ``"prompt"`` (the prompt's positions only), ``"generated"`` (generated positions only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import RefusalError
from ..names import SITES, TOKENS, check_scope

__all__ = ["SITES", "TOKENS", "Intervention", "Scope"]


@dataclass(frozen=True)
class Scope:
    layers: Any = "all"  # "all" | "source" | int | list[int] | {"top": fraction}
    sites: tuple[str, ...] = SITES
    tokens: str = "all"

    def __post_init__(self) -> None:
        layers, sites = check_scope(self.layers, self.sites, self.tokens)  # the same checks config makes
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "sites", sites)

    def resolve_layers(self, n_layers: int, source: int | None = None,
                       ranking: Sequence[int] | None = None) -> list[int]:
        """The layer indices this scope covers in a model of ``n_layers`` layers."""
        layers = self.layers
        if layers == "all":
            out = list(range(n_layers))
        elif layers == "source":
            if source is None:
                raise RefusalError("The scope says 'source layer' but the direction has no source layer.",
                                   "Give the layers explicitly.")
            out = [source]
        elif isinstance(layers, int):
            out = [layers]
        elif isinstance(layers, dict):
            if ranking is None:
                raise RefusalError("A 'top share' layer scope needs a ranking of layers.",
                                   "Score the components first (select stage), or give the layers explicitly.")
            n = max(1, round(layers["top"] * len(ranking)))
            out = sorted(int(x) for x in list(ranking)[:n])
        else:
            out = list(layers)
        bad = [i for i in out if not 0 <= i < n_layers]
        if bad:
            raise RefusalError(f"Layers {bad} are outside the model's {n_layers} layers.", "Pick existing layers.")
        return out


@dataclass(frozen=True)
class Intervention:
    """An operator at a scope; ``source`` is the layer the scope's ``"source"`` means."""

    operator: Any  # an Operator
    scope: Scope = field(default_factory=Scope)
    source: int | None = None
    ranking: tuple[int, ...] | None = None

    def layers(self, n_layers: int) -> list[int]:
        return self.scope.resolve_layers(n_layers, self.source, self.ranking)
