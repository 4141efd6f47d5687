"""refusal: find, select and apply the directions that mediate refusal in chat models.

The Python API in one screen::

    from refusal import load_model, extract, score_candidates, choose, ablate, add, generate

    model, tok = load_model("qwen2.5-coder-1.5b-instruct")
    cands = extract(model, tok, harmful_prompts, harmless_prompts, n_positions=5)
    scores = score_candidates(model, tok, cands, harmful_val, harmless_val, refusal_token_ids(tok))
    sel = choose(scores, n_layers=cands.n_layers)
    direction = cands.direction(sel.pos, sel.layer)
    with direction.ablate(model):
        print(generate(model, tok, prompts))
"""

from .chat import format_prompts, post_instruction_ids, refusal_score, refusal_token_ids
from .config import RunConfig, resolve
from .directions import Candidates, Direction, extract, mean_activations
from .errors import RefusalError
from .generate import generate
from .interventions import ablate, add, orthogonalize_, orthogonalized
from .models import find_parts, load_model
from .pipeline import Run
from .select import Scores, choose, refusal_scores, score_candidates

__all__ = [
    "Candidates", "Direction", "RefusalError", "Run", "RunConfig", "Scores", "ablate", "add", "choose", "extract",
    "find_parts", "format_prompts", "generate", "load_model", "mean_activations", "orthogonalize_", "orthogonalized",
    "post_instruction_ids", "refusal_score", "refusal_scores", "refusal_token_ids", "resolve", "score_candidates",
]
__version__ = "0.1.0"
