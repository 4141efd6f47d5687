"""Prompt layouts for scoring and extraction: a shared prefix (the template opening) and right-padded length
buckets; the prefix's key/value cache, shared read-only by every bucket; and a decoder pass over a layout.
Generation finds its prompts' shared prefix with :func:`common_prefix` too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .errors import RefusalError
from .models.parts import cache_kwarg, decoder


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


def partition(lengths: list[int], max_parts: int, slack: float) -> list[int]:
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


def common_prefix(ids: list[list[int]], min_prefix: int = 4) -> int:
    """Length of the token prefix every sequence shares, leaving at least one token of each after it; 0 when that
    is shorter than ``min_prefix`` (running it apart would cost more than it saves)."""
    shortest = min(len(x) for x in ids)
    first, p = ids[0], 0
    while p < shortest - 1 and all(x[p] == first[p] for x in ids):
        p += 1
    return p if p >= min_prefix else 0


def layout(tokenizer: Any, prompts: list[str], device: torch.device | str, *, share_prefix: bool = True,
           min_prefix: int = 4, max_buckets: int = 4, slack: float = 0.1) -> Layout:
    """Split already-templated prompts into a shared prefix and at most ``max_buckets`` length buckets.

    A prefix shorter than ``min_prefix`` tokens is not split off (running it separately costs an extra pass and a
    key/value cache). Buckets are as wide as their longest row: after a cached prefix the attention mask is then of
    any width, which costs less than padding the bucket to an aligned width (benchmarks/speed/prefix_attention.py
    measures both)."""
    if not prompts:
        raise RefusalError("No prompts to lay out.", "Pass at least one prompt.")
    ids = [list(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    shortest = min(len(x) for x in ids)
    if shortest == 0:
        raise RefusalError("A prompt tokenized to no tokens.", "Remove empty prompts from the set.")
    p = common_prefix(ids, min_prefix) if share_prefix and len(ids) > 1 else 0
    rest = [x[p:] for x in ids]
    order = sorted(range(len(rest)), key=lambda i: len(rest[i]))
    cuts = partition([len(rest[i]) for i in order], max(1, min(max_buckets, len(order))), slack)
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


def prefix_cache(model: Any, lay: Layout, reps: int) -> DynamicCache:
    """The key/value cache of the layout's shared prefix, ``reps`` rows (under whatever hooks are active)."""
    assert lay.prefix is not None, "prefix_cache needs a layout with a shared prefix"
    ids = lay.prefix[None].expand(reps, -1)
    base = decoder(model)  # no output head
    return getattr(base(input_ids=ids, use_cache=True), cache_kwarg(base))


class SharedPrefix(DynamicCache):
    """A prefix's key/value cache, each of its rows seen by ``reps`` consecutive batch rows, and only read: a
    forward joins it to the new keys and values without copying it per bucket or storing what it adds."""

    def __init__(self, prefix: DynamicCache, reps: int) -> None:
        super().__init__()
        self.layers, self.reps = prefix.layers, reps

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer: Any = self.layers[layer_idx]  # an attention layer's keys and values (transformers' union of kinds)
        return _join(layer.keys, key_states, self.reps), _join(layer.values, value_states, self.reps)


def _join(past: torch.Tensor, new: torch.Tensor, reps: int) -> torch.Tensor:
    """``past`` (rows, heads, P, d) with each row repeated ``reps`` times, then ``new`` (rows * reps, heads, L, d),
    along the sequence, written once."""
    rows, heads, p, d = past.shape
    width = p + new.shape[2]
    out = new.new_empty(new.shape[0], heads, width, d)
    out.view(rows, reps, heads, width, d)[:, :, :, :p] = past[:, None]
    out[:, :, p:] = new
    return out


@torch.no_grad()
def run_decoder(model: Any, lay: Layout, before: Callable[[Bucket | None], None]) -> None:
    """Run the decoder (no output head) over a layout: the shared prefix once, then every bucket after the cached
    prefix. ``before`` is called with ``None`` before the prefix pass and with each bucket before its pass, so that
    hooks know which rows and positions they are seeing."""
    base = decoder(model)
    prefix = None
    if lay.prefix is not None:
        before(None)
        prefix = prefix_cache(model, lay, 1)
    for b in lay.buckets:
        before(b)
        cache = None if prefix is None else SharedPrefix(prefix, len(b.rows))
        base(input_ids=b.input_ids, **{cache_kwarg(base): cache}, use_cache=cache is not None)
