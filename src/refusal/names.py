"""The names a run's configuration may use, and their checks, at the bottom of the package.

:mod:`refusal.config` validates a config against these without importing the layers that implement them (the
interventions, the judges), so configuration stays the bottom layer: an intervention's sites and token scope, the
shape of its layer scope, and the built-in judge types. The implementing modules import the same names from here,
so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import RefusalError

SITES = ("input", "attn", "mlp")  # the residual stream entering a block, the attention output, the MLP output
TOKENS = ("all", "prompt", "generated")  # which positions an intervention edits
JUDGES = ("substring", "refusal_score", "guard", "llm", "openai")  # built-in judge types (others may be registered)


def check_scope(layers: Any, sites: str | Sequence[str], tokens: str) -> tuple[Any, tuple[str, ...]]:
    """``(layers, sites)`` normalised (a list of layers as a tuple of ints, one site as a 1-tuple); a
    :class:`RefusalError` for an unknown site, token scope or layer scope."""
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise RefusalError(f"Unknown intervention site(s) {bad or 'none'}.", f"Sites are: {', '.join(SITES)}.")
    if tokens not in TOKENS:
        raise RefusalError(f"Unknown token scope '{tokens}'.", f"Use one of: {', '.join(TOKENS)}.")
    if isinstance(layers, dict):
        top = layers.get("top")
        if set(layers) != {"top"} or not isinstance(top, (int, float)) or not 0 < top <= 1:
            raise RefusalError(f"Bad layer scope {layers}.", "Write the top share as {top: 0.5} (0 < top <= 1).")
    elif isinstance(layers, str) and layers not in ("all", "source"):
        raise RefusalError(f"Unknown layer scope '{layers}'.", "Use all, source, a list of layers or {top: p}.")
    elif isinstance(layers, (list, tuple)):
        layers = tuple(int(x) for x in layers)
    return layers, sites


def judge_type(spec: Any, known: Sequence[str] | None = None) -> str:
    """The normalised ``type`` of a judge spec (``refusal-score`` -> ``refusal_score``); a :class:`RefusalError` if
    ``spec`` is not a mapping with a type (among ``known``, when given). Config checks the shape only: a judge
    registered from outside the package is known to the judge registry, which checks every option before a run loads
    its model (:func:`refusal.evaluation.judges.validate_spec`)."""
    names = ", ".join(sorted(known or JUDGES))
    if not isinstance(spec, Mapping):
        raise RefusalError(f"A judge spec must be a mapping such as {{\"type\": \"substring\"}}, not {spec!r}.",
                           f"Give a dict with a 'type' ({names}).")
    t = spec.get("type")
    if not isinstance(t, str) or not t.strip():
        raise RefusalError(f"The judge spec {dict(spec)!r} has no 'type'.", f"Add \"type\": one of {names}.")
    key = t.strip().lower().replace("-", "_")
    if known is not None and key not in known:
        raise RefusalError(f"Unknown judge type '{t}'.", f"Use one of: {names}.")
    return key
