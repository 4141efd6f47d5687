"""The prompt prefill of a generation batch, split so that it skips work that a padded batch does.

* The prefix every prompt shares (the chat template's opening, e.g. Qwen's 24-token default system prompt) runs once
  per group of rows whose prompt-phase interventions are the same (a per-row plan of 5 conditions: 4 groups), not
  once per row.
* The rest of each prompt, but its last token, runs in length buckets after that cached prefix: a batch whose
  prompts range from 12 to 54 tokens no longer computes every row at 54.

The buckets' keys and values are then joined into one left-padded batch cache (padding between each row's prefix
and its rest, masked out), so the rows decode together; decoding starts from each row's last prompt token, which is
the last column of every row. Same tokens as running each padded row whole (tests), less prefill compute: the
shared prefix is computed once per group instead of once per row, and no row is computed at the batch's longest
width unless it is that long.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..interventions.hooks import Plan, apply, token_phase
from ..layout import common_prefix, partition
from ..models.parts import cache_kwarg, decoder
from ..templates import Batch


def prefill(model: Any, ids: list[list[int]], plan: Plan | None, pad: int, device: torch.device | str, *,
            max_buckets: int = 4, slack: float = 0.1) -> tuple[Batch, object] | None:
    """``(batch, cache)`` for ``model.generate``: the batch is ``[prefix][padding][rest]`` per row, the cache holds
    every column but the last. None when the prompts share no prefix of 4 tokens or more, or the model's cache
    cannot be split by row (then the caller runs the padded batch whole: same tokens, no saving)."""
    n, p = len(ids), common_prefix(ids)
    if p == 0 or n < 2:
        return None
    base = decoder(model)
    kw = cache_kwarg(base)
    if plan is None or plan.n_rows is None:
        groups, reps = torch.zeros(n, dtype=torch.long), [0]
    else:
        groups, reps = plan.row_groups("prompt")
    clock = token_phase(model)
    with _hooks(model, plan, reps), clock.during("prompt"):
        shared = getattr(base(input_ids=torch.tensor([ids[0][:p]] * len(reps), device=device), use_cache=True), kw)
    if not hasattr(shared, "batch_select_indices") or not hasattr(shared, "layers"):
        return None  # a cache kind that cannot be shared out by row (e.g. a recurrent state)

    rests = [x[p:-1] for x in ids]  # each row's last token is left to generate(), in the last column
    order = sorted(range(n), key=lambda r: len(rests[r]))
    cuts = partition([len(rests[r]) for r in order], max(1, min(max_buckets, n)), slack)
    width = max(len(x) for x in rests)
    n_layers = len(shared.layers)
    keys: list[torch.Tensor | None] = [None] * n_layers
    values: list[torch.Tensor | None] = [None] * n_layers
    start = 0
    for end in cuts:
        rows = order[start:end]
        start = end
        w = max(len(rests[r]) for r in rows)
        if w == 0:
            continue
        ids_b = torch.full((len(rows), w), pad, dtype=torch.long)
        mask_b = torch.zeros((len(rows), w), dtype=torch.long)
        for i, r in enumerate(rows):
            if rests[r]:
                ids_b[i, w - len(rests[r]):] = torch.tensor(rests[r])
                mask_b[i, w - len(rests[r]):] = 1
        past = copy.deepcopy(shared)
        past.batch_select_indices(groups[rows])  # CPU indices: a split model's layers sit on several devices
        mask = torch.cat([torch.ones(len(rows), p, dtype=torch.long), mask_b], 1).to(device)
        pos = (p + mask_b.cumsum(-1) - 1).clamp_min(0).to(device)
        with _hooks(model, plan, rows), clock.during("prompt"):
            base(input_ids=ids_b.to(device), attention_mask=mask, position_ids=pos, **{kw: past}, use_cache=True)
        for layer_idx, layer in enumerate(past.layers):
            if layer.keys.shape[-2] != p + w:  # a sliding-window layer dropped the start: not joinable here
                return None
            k, v = keys[layer_idx], values[layer_idx]
            if k is None or v is None:  # both made at once, on the first group
                shape = (n, layer.keys.shape[1], width, layer.keys.shape[-1])
                k = keys[layer_idx] = layer.keys.new_zeros(shape)
                v = values[layer_idx] = layer.values.new_zeros(
                    (n, layer.values.shape[1], width, layer.values.shape[-1]))
            idx = torch.tensor(rows)
            k[idx, :, width - w:] = layer.keys[:, :, p:]
            v[idx, :, width - w:] = layer.values[:, :, p:]

    shared.batch_select_indices(groups)  # the prefix, one copy per row; then the joined rests after it
    if width:
        for layer_idx in range(n_layers):
            shared.update(keys[layer_idx], values[layer_idx], layer_idx)

    out = torch.full((n, p + width + 1), pad, dtype=torch.long)
    att = torch.zeros((n, p + width + 1), dtype=torch.long)
    out[:, :p] = torch.tensor(ids[0][:p])
    att[:, :p] = 1
    for r, x in enumerate(ids):
        rest = x[p:]  # the cached rest and the last token, right-aligned
        out[r, p + width + 1 - len(rest):] = torch.tensor(rest)
        att[r, p + width + 1 - len(rest):] = 1
    return Batch(out.to(device), att.to(device)), shared


def _hooks(model: Any, plan: Plan | None, rows: torch.Tensor | Sequence[int]) -> AbstractContextManager[object]:
    return apply(model, plan.take(rows)) if plan is not None else nullcontext()
