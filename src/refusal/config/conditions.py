"""Conditions: what ``generate`` runs, each a prompt set under a list of interventions (an operator on a named
direction, at a scope), and how a condition written in YAML is checked and built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import RefusalError
from .checks import _check_fields
from .schema import setting

OPS = ("ablate", "add", "reflect")
PROMPT_SETS = ("harmful", "harmless")


@dataclass
class InterventionSpec:
    """One intervention of a condition: an operator on a named direction of the run, at a scope."""

    op: str = setting(help="ablate (project out), add (activation addition) or reflect (counterfactual reflection)")
    direction: str = setting("selected", "a name in the run's direction set (directions.safetensors): selected, 0, "
                                         "1, ... by rank, inlp, inlp_first, kept, set")
    coeff: float = setting(1.0, "add: multiplier of the raw vector (negative: subtraction)")
    alpha: float = setting(1.0, "reflect: x - (1 + alpha) P x")
    layers: Any = setting(None, "source, all, a list, or {top: p}; default: the operator's (ablate: all; add, "
                                "reflect: the direction's layer)")
    sites: list[str] | None = setting(None, "input, attn, mlp; default: ablate at all three, add/reflect at the "
                                            "input")
    tokens: str = setting("all", "all, prompt or generated")


@dataclass
class Condition:
    """A named condition: a prompt set (harmful or harmless test prompts) under a list of interventions."""

    name: str = setting(help="its name in the reports (unique per prompt set)")
    prompts: str = setting(help="harmful or harmless (the test prompts)")
    interventions: list[InterventionSpec] = setting(help="what is applied while the model reads and decodes",
                                                    factory=list)
    max_new_tokens: int | None = setting(None, "this condition's generation budget; default: "
                                               "generate.max_new_tokens")


def default_conditions() -> list[Condition]:
    """The paper's five: harmful under baseline, ablation and ActAdd(-); harmless under baseline and ActAdd(+)."""
    return [Condition("baseline", "harmful"), Condition("ablation", "harmful", [InterventionSpec("ablate")]),
            Condition("actadd", "harmful", [InterventionSpec("add", coeff=-1.0)]),
            Condition("baseline", "harmless"), Condition("actadd", "harmless", [InterventionSpec("add", coeff=1.0)])]


def _condition(c: Any, i: int) -> Condition:
    if isinstance(c, Condition):
        return c
    where = f"generate.conditions[{i}]"
    if not isinstance(c, dict) or not {"name", "prompts"} <= set(c):
        raise RefusalError(f"{where} must be a mapping with at least 'name' and 'prompts'.",
                           "Write e.g. {name: ablation, prompts: harmful, interventions: [{op: ablate}]}.")
    unknown = set(c) - {f.name for f in dataclasses.fields(Condition)}
    if unknown:
        raise RefusalError(f"Unknown key(s) {sorted(unknown)} in {where}.",
                           "Keys are: name, prompts, interventions, max_new_tokens.")
    ivs = []
    if not isinstance(c.get("interventions") or [], list):
        raise RefusalError(f"{where}.interventions must be a list (got {c['interventions']!r}).",
                           "Write e.g. interventions: [{op: ablate}].")
    for j, iv in enumerate(c.get("interventions") or []):
        if isinstance(iv, InterventionSpec):
            ivs.append(iv)
            continue
        known = {f.name for f in dataclasses.fields(InterventionSpec)}
        if not isinstance(iv, dict) or "op" not in iv or set(iv) - known:
            raise RefusalError(f"{where}.interventions[{j}] is not a valid intervention ({iv}).",
                               f"Give 'op' ({', '.join(OPS)}) and optionally: {', '.join(sorted(known - {'op'}))}.")
        _check_fields(iv, InterventionSpec, f"{where}.interventions[{j}].")
        ivs.append(InterventionSpec(**iv))
    budget = c.get("max_new_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise RefusalError(f"{where}.max_new_tokens must be a positive integer (got {budget!r}).",
                           "Give this condition's generation budget in tokens, or leave it out for "
                           "generate.max_new_tokens.")
    return Condition(str(c["name"]), str(c["prompts"]), ivs, budget)


def _parse_conditions(v: list, where: str) -> list[Condition]:
    return [_condition(c, i) for i, c in enumerate(v)]
