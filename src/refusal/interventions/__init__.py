"""Interventions: operators (how an activation changes) × scopes (where), applied through hooks or baked into
weights."""

from .hooks import Plan, TokenPhase, ablate, ablation, add, addition, apply, phase, reflection, token_phase
from .operators import Add, Compose, Edit, Operator, ProjectOut, Reflect
from .scopes import SITES, TOKENS, Intervention, Scope

__all__ = ["SITES", "TOKENS", "Add", "Compose", "Edit", "Intervention", "Operator", "Plan", "ProjectOut", "Reflect",
           "Scope", "TokenPhase", "ablate", "ablation", "add", "addition", "apply", "phase", "reflection",
           "token_phase"]
