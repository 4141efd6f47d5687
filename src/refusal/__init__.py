"""refusal: find, select and apply the directions that mediate refusal in chat models.

The Python API in one screen::

    from refusal import load_model, format_prompts, extract, score_candidates, choose, refusal_token_ids

    model, tok = load_model("qwen2.5-coder-1.5b-instruct")
    cands = extract(model, tok, harmful_prompts, harmless_prompts, n_positions=5)
    scores = score_candidates(model, tok, cands, harmful_val, harmless_val, refusal_token_ids(tok))
    sel = choose(scores, n_layers=cands.n_layers)
    direction = cands.direction(sel.pos, sel.layer)
    with direction.ablate(model):
        print(generate(model, tok, prompts))

Names are imported on first use, so ``import refusal`` (and the catalog commands) start without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RefusalError": "errors",
    "RunConfig": "config", "resolve": "config",
    "format_prompts": "templates", "post_instruction_ids": "templates",
    "refusal_score": "scoring.refusal", "refusal_token_ids": "scoring.refusal",
    "Candidates": "directions.diff_means", "extract": "directions.diff_means",
    "mean_activations": "directions.diff_means",
    "Direction": "directions.base", "DirectionSet": "directions.base",
    "ablate": "interventions.hooks", "add": "interventions.hooks", "orthogonalize_": "interventions.weights",
    "orthogonalized": "interventions.weights",
    "find_parts": "models.parts", "load_model": "models.loading",
    "Run": "runs.pipeline",
    "Scores": "scoring.selection", "choose": "scoring.selection",
    "refusal_scores": "scoring.engine", "score_candidates": "scoring.engine",
    "generate": "generation.batched",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refusal' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
