"""The refusal score: log-odds of the probability mass on refusal tokens at the first generated position."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RefusalError
from ..templates import builtin_phrases


def refusal_token_ids(tokenizer: Any, openings: list[str] | None = None) -> list[int]:
    """First token ids of typical refusal openings, as the answer's first token (no leading space)."""
    openings = openings if openings is not None else builtin_phrases()["refusal_openings"]
    ids: list[int] = []
    for text in openings:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if toks and toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise RefusalError("No refusal tokens could be derived from the refusal openings.",
                           "Set refusal_tokens in the config to a list of strings such as ['I', 'As'].")
    return ids


def refusal_score(logits: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """Log-odds of the probability mass on refusal tokens: ``log p - log(1 - p)``, from logits of shape (..., V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = torch.logsumexp(logp[..., refusal_ids], dim=-1)
    lp = lp.clamp(max=-1e-6)
    return lp - torch.log(-torch.expm1(lp))


