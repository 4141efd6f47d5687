"""From configuration to interventions: an :class:`~refusal.config.InterventionSpec` names an operator, a direction
of the run's set and a scope; :func:`from_spec` makes the :class:`~.scopes.Intervention`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..config import Condition, InterventionSpec
from ..directions.base import Direction
from ..errors import RefusalError
from .hooks import ablation, addition, reflection
from .scopes import SITES, Intervention, Scope

_DEFAULT_SITES = {"ablate": SITES, "add": ("input",), "reflect": ("input",)}
_DEFAULT_LAYERS = {"ablate": "all", "add": "source", "reflect": "source"}


def from_spec(spec: InterventionSpec, directions: Mapping[str, Direction],
              rankings: Mapping[str, Sequence[int]] | Sequence[int] | None = None) -> Intervention:
    """The intervention a spec describes, on a direction of ``directions``. ``rankings``: layers best first (per
    direction method, e.g. ``{"diff_means": [...], "inlp": [...]}``, or one list), for a ``{top: p}`` layer scope."""
    if spec.direction not in directions:
        raise RefusalError(f"The intervention names the direction '{spec.direction}', which the run does not have "
                           f"(it has: {', '.join(directions)}).", "Name one of those directions.")
    d = directions[spec.direction]
    ranking: Sequence[int] | None
    if isinstance(rankings, Mapping):
        method = "inlp" if d.method.startswith("inlp") else "diff_means"
        ranking = rankings.get(method)
    else:
        ranking = rankings
    layers = spec.layers if spec.layers is not None else _DEFAULT_LAYERS[spec.op]
    make = {"ablate": lambda: ablation(d, layers, spec.tokens),
            "add": lambda: addition(d, spec.coeff, layers, spec.tokens),
            "reflect": lambda: reflection(d, spec.alpha, layers, spec.tokens)}
    iv = make[spec.op]()
    sites = tuple(spec.sites) if spec.sites else _DEFAULT_SITES[spec.op]
    return Intervention(iv.operator, Scope(iv.scope.layers, sites, iv.scope.tokens), iv.source,
                        tuple(ranking) if ranking is not None else None)


def condition_interventions(condition: Condition, directions: Mapping[str, Direction],
                            rankings: Mapping[str, Sequence[int]] | Sequence[int] | None = None) -> list[Intervention]:
    return [from_spec(s, directions, rankings) for s in condition.interventions]
