"""Chat templates and post-instruction positions, derived from the tokenizer.

The post-instruction tokens are the ones a chat template puts between the end of the user's instruction and the
start of the model's answer (for ChatML: ``<|im_end|>\\n<|im_start|>assistant\\n``). They are found by templating
a sentinel instruction and reading what follows it, so no table of model families is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch

from .errors import RefusalError

_SENTINEL = "Zq7 sentinel instruction Xw9"

@lru_cache(maxsize=1)
def builtin_phrases() -> dict:
    return json.loads(resources.files("refusal").joinpath("data/builtin/refusal_phrases.json").read_text("utf-8"))


def format_prompts(tokenizer, instructions: list[str], system: str | None = None) -> list[str]:
    """Apply the tokenizer's own chat template, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise RefusalError(
            f"The tokenizer of this model ({type(tokenizer).__name__}) has no chat template, so it is not a "
            "chat model.",
            "Use an instruction-tuned model, or set a chat template on the tokenizer before calling refusal.",
        )
    out = []
    for ins in instructions:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ins}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def post_instruction_ids(tokenizer, system: str | None = None) -> list[int]:
    """Token ids the template places after every instruction (the end-of-instruction positions)."""
    text = format_prompts(tokenizer, [_SENTINEL], system)[0]
    suffix = text[text.rindex(_SENTINEL) + len(_SENTINEL):]
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if not ids or full[-len(ids):] != ids:
        # the suffix tokenizes differently on its own: count the tokens that start after the sentinel instead
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start = text.rindex(_SENTINEL) + len(_SENTINEL)
        ids = [i for i, (s, _) in zip(enc["input_ids"], enc["offset_mapping"]) if s >= start]
    if not ids:
        raise RefusalError(
            "The chat template adds no tokens after the instruction, so there are no post-instruction positions.",
            "Use a chat model whose template marks the start of the assistant's turn.",
        )
    return ids


def check_prompts_end_with(tokenizer, prompts: list[str], post_ids: list[int], what: str = "prompt") -> None:
    """Raise a :class:`RefusalError` naming the first prompt (``what`` and its index, e.g. "harmful prompt 3")
    whose tokens do not end with ``post_ids``.

    The post-instruction positions are the last ``len(post_ids)`` tokens of every prompt; that holds only if each
    prompt ends with the template's post-instruction tokens. It fails when an instruction itself ends with template
    tokens (which then merge differently), or when the tokenizer truncates prompts (``model_max_length``). All
    prompts are tokenized in one batched call, as :func:`tokenize` does."""
    post_ids = list(post_ids)
    n = len(post_ids)
    if not prompts or not n:
        return
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for i, row in enumerate(ids):
        if list(row[-n:]) != post_ids:
            preview = prompts[i] if len(prompts[i]) <= 120 else "..." + prompts[i][-117:]
            raise RefusalError(
                f"{what[:1].upper()}{what[1:]} {i} does not end with the chat template's post-instruction tokens "
                f"{post_ids} after tokenization (it ends with {list(row[-n:])}; prompt: {preview!r}), so its "
                "post-instruction positions would be wrong.",
                "Apply the chat template to every instruction (format_prompts), remove chat-template tokens from the "
                "end of that instruction, and make sure the tokenizer does not truncate prompts (raise its "
                "model_max_length or shorten the instruction).",
            )


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def tokenize(tokenizer, prompts: list[str], device, multiple_of: int = 8) -> Batch:
    """Left-padded batch of already-templated prompts (the template supplies any BOS token).

    The width is rounded up to a multiple of ``multiple_of``: GPU attention kernels want aligned mask widths and
    fall back to slower ones without (the extra columns are padding, masked out)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    extra = -ids.shape[1] % multiple_of
    if extra:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.cat([ids.new_full((len(ids), extra), pad), ids], 1)
        mask = torch.cat([mask.new_zeros((len(mask), extra)), mask], 1)
    return Batch(ids.to(device), mask.to(device))


