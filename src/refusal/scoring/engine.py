"""The batched scoring engine: bypass, induce and KL of candidate directions, many per forward pass
(Arditi et al. 2024, section 2.3 and appendix C).

For each candidate ``r`` at (position, layer):

* **bypass**: mean refusal score on harmful validation prompts with ``r`` ablated at every layer (lower is better);
* **induce**: mean refusal score on harmless validation prompts with ``r`` added at its source layer;
* **KL**: mean KL(baseline || ablated) of the last-position distribution on harmless validation prompts.

Candidates are scored many at a time: the prompts are repeated once per candidate along the batch, and each batch
row gets its own direction (see ``per_row`` in :mod:`refusal.interventions`). Only the last position's logits are
computed, and scores are reduced on the device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..batching import Batching, in_batches
from ..directions.diff_means import Candidates
from ..interventions.hooks import ablate, add
from ..layout import Bucket, Layout, SharedPrefix, layout, prefix_cache
from ..models.head import keep_last
from ..models.norms import with_fused_norms
from ..models.parts import cache_kwarg, find_parts, model_device
from .refusal import refusal_score
from .selection import Scores


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can compute the output head at chosen positions only."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def last_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits at the last position of a left-padded batch, ``(batch, vocab)``; the output head runs on that
    position only. Positions count real tokens only (padding does not shift them), as in ``generate``."""
    kwargs = {"logits_to_keep": keep_last(input_ids.shape[1], input_ids.device)} if _takes_logits_to_keep(model) \
        else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=(attention_mask.cumsum(-1) - 1).clamp_min(0), use_cache=False, **kwargs)
    return out.logits[:, -1, :]


def _bucket_logits(model: Any, bucket: Bucket, reps: int, prefix: DynamicCache | None = None) -> torch.Tensor:
    """Logits at each row's last real position for a bucket repeated ``reps`` times (all of the bucket, then
    again), after ``prefix`` (the prefix's cache with ``reps`` rows, or None without a prefix): ``(reps * n, V)``.

    The output head runs only at the bucket's distinct last positions."""
    n = len(bucket.rows)
    ids = bucket.input_ids.repeat(reps, 1)
    cache = None if prefix is None else SharedPrefix(prefix, n)
    cols, which = bucket.cols, bucket.which
    keep = _takes_logits_to_keep(model)
    out = model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=cache is not None,
                **({"logits_to_keep": cols} if keep else {}))
    logits = out.logits if keep else out.logits[:, cols]
    return logits[torch.arange(len(ids), device=ids.device), which.repeat(reps)]


@torch.no_grad()
def layout_logits(model: Any, lay: Layout) -> torch.Tensor:
    """Last-position logits of every prompt of a layout, in the original order, with no intervention."""
    out = None
    prefix = prefix_cache(model, lay, 1) if lay.prefix is not None else None
    for bucket in lay.buckets:
        logits = _bucket_logits(model, bucket, 1, prefix)
        if out is None:
            out = logits.new_empty(lay.n, logits.shape[-1])
        out[bucket.rows] = logits
    assert out is not None, "a layout has at least one bucket (layout() refuses an empty prompt list)"
    return out


def kl_div(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P) per row, from log-probabilities."""
    return (base_logp.exp() * (base_logp - logp)).sum(-1)


@torch.no_grad()
@with_fused_norms
def refusal_scores(model: Any, tokenizer: Any, prompts: Sequence[str], refusal_ids: Sequence[int], batch_size: int = 32,
                   description: str = "", *, batching: Batching | None = None) -> torch.Tensor:
    """Per-prompt refusal score (log-odds of refusal tokens at the first generated position), in length buckets."""
    dev = model_device(model)
    ids = torch.tensor(list(refusal_ids), device=dev)
    out: list[torch.Tensor] = []

    def run(chunk: Sequence[str]) -> None:
        lay = layout(tokenizer, list(chunk), dev)
        out.append(refusal_score(layout_logits(model, lay), ids).cpu())

    in_batches(run, list(prompts), batch_size, description, batching=batching)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
@with_fused_norms
def score_candidates(
    model: Any, tokenizer: Any, candidates: Candidates, harmful_val: Sequence[str], harmless_val: Sequence[str],
    refusal_ids: Sequence[int], *, layers: Sequence[int] | None = None, batch_size: int = 64,
    prune_induce_below: float | None = None, share_prefix: bool = True, min_prefix: int = 4,
    max_buckets: int = 8, slack: float = 0.03, batching: Batching | None = None,
) -> Scores:
    """Bypass, induce and KL scores for every (position, layer) candidate in ``layers`` (default: all).

    ``batch_size`` is the number of sequences per forward pass; candidates are packed into it. With
    ``prune_induce_below``, bypass and KL are computed only for candidates whose induce score exceeds it (the
    selection filter would discard the others; their bypass and KL stay NaN).

    The work is cut without changing any score: the template's opening, the same in every prompt, is run once per
    candidate instead of once per prompt (``share_prefix``, when it is at least ``min_prefix`` tokens), and prompts
    are grouped into up to ``max_buckets`` length buckets so that padding adds at most ``slack`` of the tokens where
    that many buckets allow it.

    ``batching``: the caller's :class:`~refusal.batching.Batching` (batch sizes remembered after out-of-memory from
    one call to the next, quietness); none: a fresh one.
    """
    dev = model_device(model)
    n_pos, n_layers = len(candidates.positions), candidates.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    diffs = candidates.diffs.to(dev)
    all_cand = _with_direction(diffs, n_pos, layers)
    nh, nb = len(harmful_val), len(harmless_val)
    lay = partial(layout, tokenizer, device=dev, share_prefix=share_prefix, min_prefix=min_prefix,
                  max_buckets=max_buckets, slack=slack)
    both = lay(list(harmful_val) + list(harmless_val))
    harmless = lay(list(harmless_val))
    shape = (n_pos, n_layers)
    passes = _Passes(model, diffs, torch.tensor(list(refusal_ids), device=dev), both, harmless, nh, nb, shape)
    base_scores = passes.prepare()

    # candidates are packed into each forward pass; on out-of-memory the pack halves (down to one candidate)
    # A pass costs its rows times the layers from its lowest source layer up: candidates come in layer order, so
    # small packs (batch / 64 candidates, at least one layer's positions) start near their own layers.
    widest = max(len(b.rows) for b in harmless.buckets)
    in_batches(passes.induce_pass, all_cand, max(1, min(batch_size // widest, max(n_pos, batch_size // 64))),
               "Scoring induce", batching=batching)
    cand = all_cand
    if prune_induce_below is not None:  # the filter would drop these anyway: skip their bypass and KL forwards
        cand = [(p, lay) for p, lay in cand if float(passes.induce[p, lay]) > prune_induce_below]
    widest = max(len(b.rows) for b in both.buckets)
    in_batches(passes.ablation_pass, cand, max(1, batch_size // widest), "Scoring bypass + KL", batching=batching)

    return Scores(list(candidates.positions), _scored(passes.bypass, cand, shape),
                  _scored(passes.induce, all_cand, shape), _scored(passes.kl, cand, shape),
                  float(base_scores[:nh].mean()), float(base_scores[nh:].mean()))


def _with_direction(diffs: torch.Tensor, n_pos: int, layers: list[int]) -> list[tuple[int, int]]:
    """The (position, layer) candidates of ``layers``, in layer order, whose difference is not zero (a zero
    difference, e.g. at layer 0 where every prompt has the same post-instruction tokens, has no direction)."""
    norms = diffs.norm(dim=-1).cpu()
    return [(p, layer) for layer in layers for p in range(n_pos) if norms[p, layer] > 1e-6 * norms.max()]


def _scored(t: torch.Tensor, which: list[tuple[int, int]], shape: tuple[int, int]) -> torch.Tensor:
    """``t`` on the CPU at the candidates ``which``, NaN elsewhere."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for p, lay in which:
        mask[p, lay] = True
    return torch.where(mask, t.cpu(), torch.full_like(mask, float("nan"), dtype=torch.float32))


class _Passes:
    """The forward passes of :func:`score_candidates`, sharing the baseline computed once by :meth:`prepare`.

    :meth:`ablation_pass` and :meth:`induce_pass` each take a chunk of candidates and run it over every bucket (a
    shared prefix runs once per candidate); a chunk's scores are written into ``bypass`` / ``kl`` / ``induce`` only
    once all its buckets are done, so an out-of-memory retry cannot count one twice."""

    def __init__(self, model: Any, diffs: torch.Tensor, rids: torch.Tensor, both: Layout, harmless: Layout,
                 nh: int, nb: int, shape: tuple[int, int]) -> None:
        self.model, self.diffs, self.rids, self.both, self.harmless = model, diffs, rids, both, harmless
        self.dev = diffs.device
        self.units = diffs / diffs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.nh, self.nb = nh, nb
        zeros = torch.zeros(shape, device=self.dev)
        self.bypass, self.induce, self.kl = zeros.clone(), zeros.clone(), zeros.clone()
        self.ablation_buckets: list = []
        self.induce_buckets: list = []

    def prepare(self) -> torch.Tensor:
        """The baseline pass (returns every prompt's refusal score), each bucket's harmful and harmless rows and
        baseline log-probabilities, and the harmless prompts' input to every layer."""
        model, both, nh, dev = self.model, self.both, self.nh, self.dev
        base_logits = layout_logits(model, both)
        base_scores = refusal_score(base_logits, self.rids)
        base_logp = torch.log_softmax(base_logits[nh:].float(), -1)
        is_harmful = torch.arange(nh + self.nb, device=dev) < nh
        for bucket in both.buckets:
            harm = is_harmful[bucket.rows].cpu()
            h_idx, b_idx = harm.nonzero()[:, 0].to(dev), (~harm).nonzero()[:, 0].to(dev)  # no device syncs per chunk
            self.ablation_buckets.append((bucket, h_idx, b_idx, base_logp[bucket.rows[b_idx] - nh]))
        # Induce adds at the source layer only, so below it every candidate sees the baseline residual stream:
        # cache the harmless prompts' input to every layer once, and start each pass at its lowest source layer.
        base_prefix = prefix_cache(model, self.harmless, 1) if self.harmless.prefix is not None else None
        for bucket in self.harmless.buckets:
            layer_inputs, returns_tuple = _layer_inputs(model, partial(_bucket_logits, model, bucket, 1, base_prefix))
            self.induce_buckets.append((bucket, layer_inputs, returns_tuple))
        return base_scores

    def _index(self, chunk: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor([p for p, _ in chunk], device=self.dev),
                torch.tensor([lay for _, lay in chunk], device=self.dev))

    def ablation_pass(self, chunk: Sequence[tuple[int, int]]) -> None:
        """Bypass (harmful rows) and KL (harmless rows) of the candidates of ``chunk``, ablated at every layer."""
        model, both, rids, dev = self.model, self.both, self.rids, self.dev
        c = len(chunk)
        pi, li = self._index(chunk)
        dirs = self.units[pi, li]
        prefix = None
        if both.prefix is not None:
            with ablate(model, dirs, per_row=True):
                prefix = prefix_cache(model, both, c)
        b_sum, k_sum = torch.zeros(c, device=dev), torch.zeros(c, device=dev)
        for bucket, h_idx, b_idx, logp_base in self.ablation_buckets:
            n = len(bucket.rows)
            with ablate(model, dirs.repeat_interleave(n, 0), per_row=True):
                logits = _bucket_logits(model, bucket, c, prefix).view(c, n, -1)
            b_sum += refusal_score(logits[:, h_idx], rids).sum(1)
            k_sum += kl_div(logp_base.unsqueeze(0), torch.log_softmax(logits[:, b_idx].float(), -1)).sum(1)
        self.bypass[pi, li], self.kl[pi, li] = b_sum / self.nh, k_sum / self.nb

    def _adding(self, pi: torch.Tensor, li: torch.Tensor, vecs: torch.Tensor, reps: int) -> ExitStack:
        stack = ExitStack()
        for layer in sorted(set(li.tolist())):
            rows = (li == layer).to(vecs.dtype)[:, None] * vecs  # zero for candidates of other layers
            stack.enter_context(add(self.model, rows.repeat_interleave(reps, 0), layer, per_row=True))
        return stack

    def induce_pass(self, chunk: Sequence[tuple[int, int]]) -> None:
        """Induce of the candidates of ``chunk`` on the harmless rows, each added at its source layer; the pass
        starts at the chunk's lowest source layer."""
        model, harmless = self.model, self.harmless
        c = len(chunk)
        pi, li = self._index(chunk)
        vecs = self.diffs[pi, li]
        start = min(lay for _, lay in chunk)
        prefix = None
        if harmless.prefix is not None:  # the prefix runs at full depth, so the cache holds every layer
            with self._adding(pi, li, vecs, 1):
                prefix = prefix_cache(model, harmless, c)
        total = torch.zeros(c, device=self.dev)
        for bucket, layer_inputs, returns_tuple in self.induce_buckets:
            n = len(bucket.rows)
            with ExitStack() as stack:
                stack.enter_context(_start_at(model, start, layer_inputs[start], c, returns_tuple))
                stack.enter_context(self._adding(pi, li, vecs, n))
                logits = _bucket_logits(model, bucket, c, prefix)
            total += refusal_score(logits.view(c, n, -1), self.rids).sum(1)
        self.induce[pi, li] = total / self.nb


@torch.no_grad()
def _layer_inputs(model: Any, forward: Callable[[], object]) -> tuple[list[torch.Tensor], bool]:
    """The residual stream at the input of every layer during ``forward()``, and whether a layer returns a tuple
    (transformers 4)."""
    parts = find_parts(model)
    saved: list = [None] * parts.n_layers
    kind = {}

    def pre(i: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            saved[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    def post(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> None:
        kind["tuple"] = isinstance(out, tuple)

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(parts.layers)]
    handles.append(parts.layers[0].register_forward_hook(post))
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return saved, kind["tuple"]


@contextmanager
def _start_at(model: Any, start: int, x: torch.Tensor, reps: int, returns_tuple: bool) -> Iterator[None]:
    """Skip the layers below ``start`` (they pass their input through) and feed ``x`` repeated ``reps`` times
    into layer ``start``: the forward then costs only the layers from ``start`` on."""
    parts = find_parts(model)
    if start == 0:
        yield
        return
    xr = x.repeat(reps, *([1] * (x.ndim - 1)))

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if returns_tuple else h

    def feed(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (xr,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": xr}

    below = list(parts.layers)[:start]
    saved = [layer.__dict__.get("forward") for layer in below]  # accelerate keeps its wrapper there
    for layer in below:
        layer.forward = passthrough
    handle = parts.layers[start].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for layer, fwd in zip(below, saved):
            if fwd is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = fwd


