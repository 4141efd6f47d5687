"""Batched greedy generation.

Prompts are sorted by length so each batch carries little padding, generated in batches (halving the batch on
out-of-memory), and returned in the caller's order. Interventions apply by wrapping the call in their context
manager.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .batching import in_batches
from .chat import refusal_score, tokenize
from .models import model_device


class _FirstLogits(LogitsProcessor):
    """Keeps the logits of the first generated position (for the refusal score) without storing the rest."""

    def __init__(self):
        self.first: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = scores.detach().clone()
        return scores


def greedy_config(model, tokenizer, max_new_tokens: int, static_cache: bool = False) -> GenerationConfig:
    """Plain greedy decoding: the model's stop tokens, none of its sampling or repetition-penalty defaults."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    if static_cache:
        cfg.cache_implementation = "static"
    return cfg


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 32,
    static_cache: bool = False, refusal_ids: Sequence[int] | None = None, description: str = "Generating",
) -> list[str] | tuple[list[str], torch.Tensor]:
    """Greedy completions of already-templated prompts.

    With ``refusal_ids``, also returns each prompt's refusal score at the first generated position, read from the
    same forward pass that generates the first token.
    """
    dev = model_device(model)
    lengths = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(lengths[i]))
    out: dict[int, str] = {}
    first: dict[int, float] = {}
    gen_cfg = greedy_config(model, tokenizer, max_new_tokens, static_cache)
    rids = None if refusal_ids is None else torch.tensor(list(refusal_ids), device=dev)

    def run(chunk):
        b = tokenize(tokenizer, [prompts[i] for i in chunk], dev)
        keep = _FirstLogits()
        seq = model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, generation_config=gen_cfg,
                             logits_processor=LogitsProcessorList([keep]))
        texts = tokenizer.batch_decode(seq[:, b.input_ids.shape[1]:], skip_special_tokens=True)
        scores = refusal_score(keep.first, rids).tolist() if rids is not None else [None] * len(chunk)
        for i, t, s in zip(chunk, texts, scores):
            out[i] = t.strip()
            first[i] = s

    in_batches(run, order, batch_size, description)
    texts = [out[i] for i in range(len(prompts))]
    if refusal_ids is None:
        return texts
    return texts, torch.tensor([first[i] for i in range(len(prompts))])
