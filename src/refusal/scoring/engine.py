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
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import torch

from ..batching import Batching, in_batches
from ..directions.diff_means import Candidates
from ..interventions.hooks import ablate, add
from ..layout import Bucket, Layout, SharedPrefix, layout, prefix_cache
from ..models.head import keep_last
from ..models.norms import with_fused_norms
from ..models.parts import cache_kwarg, find_parts, model_device
from .refusal import refusal_score
from .selection import Scores


def _takes_logits_to_keep(model) -> bool:
    """Whether the model's forward can compute the output head at chosen positions only."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def last_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits at the last position of a left-padded batch, ``(batch, vocab)``; the output head runs on that
    position only. Positions count real tokens only (padding does not shift them), as in ``generate``."""
    kwargs = {"logits_to_keep": keep_last(input_ids.shape[1], input_ids.device)} if _takes_logits_to_keep(model) \
        else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=(attention_mask.cumsum(-1) - 1).clamp_min(0), use_cache=False, **kwargs)
    return out.logits[:, -1, :]


def _bucket_logits(model, bucket: Bucket, reps: int, prefix=None) -> torch.Tensor:
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
def layout_logits(model, lay: Layout) -> torch.Tensor:
    """Last-position logits of every prompt of a layout, in the original order, with no intervention."""
    out = None
    prefix = prefix_cache(model, lay, 1) if lay.prefix is not None else None
    for bucket in lay.buckets:
        logits = _bucket_logits(model, bucket, 1, prefix)
        if out is None:
            out = logits.new_empty(lay.n, logits.shape[-1])
        out[bucket.rows] = logits
    return out


def kl_div(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P) per row, from log-probabilities."""
    return (base_logp.exp() * (base_logp - logp)).sum(-1)


@torch.no_grad()
@with_fused_norms
def refusal_scores(model, tokenizer, prompts: Sequence[str], refusal_ids: Sequence[int], batch_size: int = 32,
                   description: str = "", *, batching: Batching | None = None) -> torch.Tensor:
    """Per-prompt refusal score (log-odds of refusal tokens at the first generated position), in length buckets."""
    dev = model_device(model)
    ids = torch.tensor(list(refusal_ids), device=dev)
    out: list[torch.Tensor] = []

    def run(chunk):
        lay = layout(tokenizer, list(chunk), dev)
        out.append(refusal_score(layout_logits(model, lay), ids).cpu())

    in_batches(run, list(prompts), batch_size, description, batching=batching)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
@with_fused_norms
def score_candidates(
    model, tokenizer, candidates: Candidates, harmful_val: Sequence[str], harmless_val: Sequence[str],
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
    units = diffs / diffs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rids = torch.tensor(list(refusal_ids), device=dev)
    norms = diffs.norm(dim=-1).cpu()
    # a zero difference (e.g. layer 0, where every prompt has the same post-instruction tokens) has no direction
    cand = [(p, layer) for layer in layers for p in range(n_pos) if norms[p, layer] > 1e-6 * norms.max()]
    nh, nb = len(harmful_val), len(harmless_val)
    opts = {"share_prefix": share_prefix, "min_prefix": min_prefix, "max_buckets": max_buckets, "slack": slack}
    both = layout(tokenizer, list(harmful_val) + list(harmless_val), dev, **opts)
    harmless = layout(tokenizer, list(harmless_val), dev, **opts)

    base_logits = layout_logits(model, both)
    base_scores = refusal_score(base_logits, rids)
    base_logp = torch.log_softmax(base_logits[nh:].float(), -1)
    is_harmful = torch.arange(nh + nb, device=dev) < nh

    zeros = torch.zeros((n_pos, n_layers), device=dev)
    bypass, induce, kl = zeros.clone(), zeros.clone(), zeros.clone()

    def index(chunk):
        return (torch.tensor([p for p, _ in chunk], device=dev), torch.tensor([lay for _, lay in chunk], device=dev))

    # Chunks of candidates, each run over every bucket: a shared prefix runs once per candidate, and a chunk's
    # scores are written only once all its buckets are done (so an out-of-memory retry cannot count one twice).
    ablation_buckets = []
    for bucket in both.buckets:
        harm = is_harmful[bucket.rows].cpu()
        h_idx, b_idx = harm.nonzero()[:, 0].to(dev), (~harm).nonzero()[:, 0].to(dev)  # no device syncs per chunk
        ablation_buckets.append((bucket, h_idx, b_idx, base_logp[bucket.rows[b_idx] - nh]))

    def run_ablation(chunk):
        c = len(chunk)
        pi, li = index(chunk)
        dirs = units[pi, li]
        prefix = None
        if both.prefix is not None:
            with ablate(model, dirs, per_row=True):
                prefix = prefix_cache(model, both, c)
        b_sum, k_sum = torch.zeros(c, device=dev), torch.zeros(c, device=dev)
        for bucket, h_idx, b_idx, logp_base in ablation_buckets:
            n = len(bucket.rows)
            with ablate(model, dirs.repeat_interleave(n, 0), per_row=True):
                logits = _bucket_logits(model, bucket, c, prefix).view(c, n, -1)
            b_sum += refusal_score(logits[:, h_idx], rids).sum(1)
            k_sum += kl_div(logp_base.unsqueeze(0), torch.log_softmax(logits[:, b_idx].float(), -1)).sum(1)
        bypass[pi, li], kl[pi, li] = b_sum / nh, k_sum / nb

    # Induce adds at the source layer only, so below it every candidate sees the baseline residual stream:
    # cache the harmless prompts' input to every layer once, and start each pass at its lowest source layer.
    induce_buckets = []
    base_prefix = prefix_cache(model, harmless, 1) if harmless.prefix is not None else None
    for bucket in harmless.buckets:
        layer_inputs, returns_tuple = _layer_inputs(
            model, lambda b=bucket: _bucket_logits(model, b, 1, base_prefix))
        induce_buckets.append((bucket, layer_inputs, returns_tuple))

    def adding(pi, li, vecs, reps):
        stack = ExitStack()
        for layer in sorted(set(li.tolist())):
            rows = (li == layer).to(vecs.dtype)[:, None] * vecs  # zero for candidates of other layers
            stack.enter_context(add(model, rows.repeat_interleave(reps, 0), layer, per_row=True))
        return stack

    def run_induce(chunk):
        c = len(chunk)
        pi, li = index(chunk)
        vecs = diffs[pi, li]
        start = min(lay for _, lay in chunk)
        prefix = None
        if harmless.prefix is not None:  # the prefix runs at full depth, so the cache holds every layer
            with adding(pi, li, vecs, 1):
                prefix = prefix_cache(model, harmless, c)
        total = torch.zeros(c, device=dev)
        for bucket, layer_inputs, returns_tuple in induce_buckets:
            n = len(bucket.rows)
            with ExitStack() as stack:
                stack.enter_context(_start_at(model, start, layer_inputs[start], c, returns_tuple))
                stack.enter_context(adding(pi, li, vecs, n))
                logits = _bucket_logits(model, bucket, c, prefix)
            total += refusal_score(logits.view(c, n, -1), rids).sum(1)
        induce[pi, li] = total / nb

    # candidates are packed into each forward pass; on out-of-memory the pack halves (down to one candidate)
    # A pass costs its rows times the layers from its lowest source layer up: candidates come in layer order, so
    # small packs (batch / 64 candidates, at least one layer's positions) start near their own layers.
    widest = max(len(b.rows) for b in harmless.buckets)
    in_batches(run_induce, cand, max(1, min(batch_size // widest, max(n_pos, batch_size // 64))), "Scoring induce",
               batching=batching)
    if prune_induce_below is not None:  # the filter would drop these anyway: skip their bypass and KL forwards
        cand = [(p, lay) for p, lay in cand if float(induce[p, lay]) > prune_induce_below]
    widest = max(len(b.rows) for b in both.buckets)
    in_batches(run_ablation, cand, max(1, batch_size // widest), "Scoring bypass + KL", batching=batching)

    def scored(t, which):
        mask = torch.zeros((n_pos, n_layers), dtype=torch.bool)
        for p, lay in which:
            mask[p, lay] = True
        return torch.where(mask, t.cpu(), torch.full_like(mask, float("nan"), dtype=torch.float32))

    all_cand = [(p, layer) for layer in layers for p in range(n_pos) if norms[p, layer] > 1e-6 * norms.max()]
    return Scores(list(candidates.positions), scored(bypass, cand), scored(induce, all_cand), scored(kl, cand),
                  float(base_scores[:nh].mean()), float(base_scores[nh:].mean()))


@torch.no_grad()
def _layer_inputs(model, forward) -> tuple[list[torch.Tensor], bool]:
    """The residual stream at the input of every layer during ``forward()``, and whether a layer returns a tuple
    (transformers 4)."""
    parts = find_parts(model)
    saved: list = [None] * parts.n_layers
    kind = {}

    def pre(i):
        def hook(_m, args, kwargs):
            saved[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    def post(_m, _a, out):
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
def _start_at(model, start: int, x: torch.Tensor, reps: int, returns_tuple: bool):
    """Skip the layers below ``start`` (they pass their input through) and feed ``x`` repeated ``reps`` times
    into layer ``start``: the forward then costs only the layers from ``start`` on."""
    parts = find_parts(model)
    if start == 0:
        yield
        return
    xr = x.repeat(reps, *([1] * (x.ndim - 1)))

    def passthrough(*args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if returns_tuple else h

    def feed(_m, args, kwargs):
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


