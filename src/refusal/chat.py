"""Chat templates, post-instruction positions and refusal tokens, all derived from the tokenizer.

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
    return json.loads(resources.files("refusal").joinpath("data/refusal_phrases.json").read_text("utf-8"))


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


def refusal_token_ids(tokenizer, openings: list[str] | None = None) -> list[int]:
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


def refusal_score(logits: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """Log-odds of the probability mass on refusal tokens: ``log p - log(1 - p)``, from logits of shape (..., V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = torch.logsumexp(logp[..., refusal_ids], dim=-1)
    lp = lp.clamp(max=-1e-6)
    return lp - torch.log(-torch.expm1(lp))


@dataclass
class Bucket:
    """Prompts of similar length, right-padded to the longest; ``last`` is each row's last real position and
    ``rows`` its index in the original list. Right padding keeps every real token at its true position and out of
    sight of the padding (attention is causal), so no attention mask or position ids are needed."""

    input_ids: torch.Tensor
    last: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor  # the distinct last positions
    which: torch.Tensor  # for each row, the index of its own last position in ``cols``


@dataclass
class Layout:
    """A prompt set as one shared prefix (the template's opening, the same tokens in every prompt) followed by
    length buckets of what remains. Running the prefix once and the buckets without most of their padding gives the
    same last-position outputs as one padded batch, for less work."""

    prefix: torch.Tensor | None  # (P,) token ids, or None when nothing is shared
    buckets: list[Bucket]
    n: int
    real_tokens: int  # tokens in all prompts, no padding, prefix counted in each

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else int(self.prefix.numel())


def _partition(lengths: list[int], max_parts: int, slack: float) -> list[int]:
    """Cut points splitting sorted ``lengths`` into at most ``max_parts`` runs: the fewest runs whose padded total
    is within ``slack`` of the unpadded total, else the best ``max_parts`` (dynamic programming over cut points)."""
    n, real = len(lengths), sum(lengths)
    # cost[k][j]: least padded tokens for the first j lengths in k runs; a run i..j-1 costs (j - i) * lengths[j-1]
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(max_parts + 1)]
    back = [[0] * (n + 1) for _ in range(max_parts + 1)]
    cost[0][0] = 0
    for k in range(1, max_parts + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = cost[k - 1][i] + (j - i) * lengths[j - 1]
                if c < cost[k][j]:
                    cost[k][j], back[k][j] = c, i
        if cost[k][n] <= real * (1 + slack) or k == max_parts:
            cuts, j = [], n
            for kk in range(k, 0, -1):
                cuts.append(j)
                j = back[kk][j]
            return sorted(cuts)
    return [n]


def layout(tokenizer, prompts: list[str], device, *, share_prefix: bool = True, min_prefix: int = 4,
           max_buckets: int = 4, slack: float = 0.1) -> Layout:
    """Split already-templated prompts into a shared prefix and at most ``max_buckets`` length buckets.

    A prefix shorter than ``min_prefix`` tokens is not split off (running it separately costs an extra pass and a
    key/value cache). Buckets are as wide as their longest row: after a cached prefix the attention mask is then of
    any width, which on an H100 cost nothing measurable, while padding to an aligned width cost more than the prefix
    saved (benchmarks/prefix_attention.py)."""
    if not prompts:
        raise RefusalError("No prompts to lay out.", "Pass at least one prompt.")
    ids = [list(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    shortest = min(len(x) for x in ids)
    if shortest == 0:
        raise RefusalError("A prompt tokenized to no tokens.", "Remove empty prompts from the set.")
    p = 0
    if share_prefix and len(ids) > 1:
        first = ids[0]
        while p < shortest - 1 and all(x[p] == first[p] for x in ids):  # keep at least one token after it
            p += 1
        if p < min_prefix:
            p = 0
    rest = [x[p:] for x in ids]
    order = sorted(range(len(rest)), key=lambda i: len(rest[i]))
    cuts = _partition([len(rest[i]) for i in order], max(1, min(max_buckets, len(order))), slack)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    buckets, start = [], 0
    for end in cuts:
        rows = order[start:end]
        width = max(len(rest[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, :len(rest[i])] = torch.tensor(rest[i])
        last = torch.tensor([len(rest[i]) - 1 for i in rows])
        cols, which = torch.unique(last, return_inverse=True)  # here, on the host: no device sync per forward
        buckets.append(Bucket(input_ids.to(device), last.to(device), torch.tensor(rows, device=device),
                              cols.to(device), which.to(device)))
        start = end
    prefix = torch.tensor(ids[0][:p], device=device) if p else None
    return Layout(prefix, buckets, len(ids), sum(len(x) for x in ids))
