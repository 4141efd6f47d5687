"""Batched greedy generation.

Prompts are sorted by length so each batch carries little padding, generated in batches (halving the batch on
out-of-memory), and returned in the caller's order. Interventions apply by wrapping the call in their context
manager.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..batching import in_batches
from ..interventions.hooks import Plan, apply, phase, set_phase
from ..models.norms import fused_norms
from ..models.parts import cache_kwarg, model_device
from ..scoring.refusal import refusal_score
from ..templates import tokenize
from .prefill import prefill


class _FirstLogits(LogitsProcessor):
    """Keeps the logits of the first generated position (for the refusal score) without storing the rest."""

    def __init__(self):
        self.first: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = scores.detach().clone()
            set_phase("generated")  # called after the prefill forward: the next forwards generate
        return scores


def greedy_config(model, tokenizer, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding: the model's stop tokens, none of its sampling or repetition-penalty defaults."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


_GQA = "refusal_gqa"


def gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that groups query heads over their shared K/V head instead of expanding K/V (``repeat_kv``).

    Same result as transformers' SDPA path; for decoding (one query token over a long static cache) it avoids
    materialising 4-8x copies of the cache every step. Inputs ``(batch, heads, q, dim)``; returns
    ``(batch, q, heads, dim)`` as transformers' attention functions do.
    """
    b, h, q, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    scale = scaling if scaling is not None else d ** -0.5
    qg = query.reshape(b, hkv, g * q, d)  # heads j*g .. j*g+g-1 share K/V head j (repeat_kv's order)
    scores = torch.matmul(qg, key.transpose(-1, -2)).float() * scale  # (b, hkv, g*q, k)
    scores = scores.view(b, hkv, g, q, -1)
    k = scores.shape[-1]
    if attention_mask is not None:
        m = attention_mask[:, :, None, :, :k]  # (b, 1, 1, q, k)
        # a finite minimum, as eager attention uses: rows that are all padding then stay finite (their output is unused)
        scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min) if m.dtype == torch.bool else scores + m
    elif q > 1:  # no mask means plain causal attention (SDPA's is_causal): in the static decoder that is the
        # prefill, whose queries sit at cache positions 0..q-1, ahead of the cache's unfilled slots
        causal = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(0)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b, hkv, g * q, -1)
    out = torch.matmul(probs, value).view(b, h, q, d)
    return out.transpose(1, 2).contiguous(), None


def _register_gqa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(_GQA, gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_GQA, sdpa_mask)


@contextmanager
def grouped_attention(model):
    """Run attention with :func:`gqa_attention` (same math as SDPA/eager, no copies of the grouped K/V heads: on an
    H200, ``repeat_kv`` copies were a fifth of the decode step at batch 512), and restore the model's own on exit."""
    cfg = model.config
    old = cfg._attn_implementation
    if old in ("sdpa", "eager"):
        _register_gqa()
        cfg._attn_implementation = _GQA
    try:
        yield
    finally:
        cfg._attn_implementation = old


@contextmanager
def _eager_speedups(model):
    with grouped_attention(model), fused_norms(model):
        yield


class _StaticDecoder:
    """Greedy decoding with a static KV cache and fixed shapes, so one compiled (CUDA-graphed) step serves every
    token. Stops early only when every row has ended, checking once every ``check_every`` steps (a check is a
    device-to-host sync)."""

    def __init__(self, model, compile: bool, check_every: int = 16, round_to: int = 128,
                 mode: str = "reduce-overhead"):
        self.model = model
        self.check_every = check_every
        self.round_to = round_to  # cache lengths are rounded up so that few shapes (and compilations) occur
        self.caches: dict = {}
        self.cache_kw = cache_kwarg(model)  # looked up here, not in the compiled step
        self.step = torch.compile(self._step, mode=mode, fullgraph=False) if compile else self._step

    def _cache(self, b: int, total: int):
        from transformers import StaticCache

        cache = self.caches.get((b, total))
        if cache is None:
            cache = self.caches[(b, total)] = StaticCache(config=self.model.config, max_cache_len=total)
        else:
            cache.reset()
        return cache

    def _step(self, ids, position_ids, cache_position, mask, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache_position=cache_position,
                         **{self.cache_kw: cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, max_new_tokens: int, eos_ids: torch.Tensor, pad_id: int):
        # torch.compile does not by default notice hooks added after it compiled (an intervention entered between
        # calls): have it guard on them, so a changed intervention recompiles instead of being ignored
        with grouped_attention(self.model), torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return self._decode(input_ids, attention_mask, max_new_tokens, eos_ids, pad_id)

    def _decode(self, input_ids, attention_mask, max_new_tokens: int, eos_ids: torch.Tensor, pad_id: int):
        b, t = input_ids.shape
        dev = input_ids.device
        total = -(-(t + max_new_tokens) // self.round_to) * self.round_to
        cache = self._cache(b, total)
        mask = torch.zeros(b, total, dtype=attention_mask.dtype, device=dev)
        mask[:, :t] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        cache_positions = torch.arange(total, device=dev)
        first = self._step(input_ids, positions, cache_positions[:t], mask, cache)  # prefill, eager
        set_phase("generated")
        pos = positions[:, -1:] + 1
        nxt = first.argmax(-1)
        tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        for i in range(max_new_tokens):
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens[:, i] = nxt
            done |= torch.isin(nxt, eos_ids)
            if i == max_new_tokens - 1 or (i % self.check_every == self.check_every - 1 and bool(done.all())):
                break
            mask[:, t + i] = 1
            logits = self.step(nxt[:, None], pos + i, cache_positions[t + i:t + i + 1], mask, cache)
            nxt = logits.argmax(-1)
        return tokens, first


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 32,
    static_cache: bool = False, refusal_ids: Sequence[int] | None = None, description: str = "Generating",
    plan: Plan | None = None, rows: Sequence[int] | None = None,
    on_batch: Callable[[list[int], list[str], list[float | None]], None] | None = None, split_prefill: bool = True,
) -> list[str] | tuple[list[str], torch.Tensor]:
    """Greedy completions of already-templated prompts.

    ``plan`` (a per-row :class:`~refusal.interventions.Plan` over ``prompts``) gives each prompt its own
    interventions, so prompts of many conditions decode together in the same batches; token-scoped interventions
    see the prompt phase during prefill and the generated phase after it. ``rows`` generates only those prompts (the
    result then follows ``rows``' order), and ``on_batch(rows, texts, scores)`` is called after every batch (to save
    work as it finishes).

    ``static_cache=True`` decodes with refusal's own loop over a static KV cache (compiled with CUDA graphs on a
    GPU); otherwise ``model.generate`` with its default cache. Both decode greedily and give the same tokens (up to
    bf16 rounding on near-ties); rows stop at the model's end-of-turn tokens.

    ``split_prefill`` (eager decoding): the prompts' prefill runs as :func:`~refusal.generation.prefill.prefill`
    splits it — the template opening they share once per group of rows with the same interventions, the rest in
    length buckets without the batch's padding — and decoding starts from the joined cache (same tokens).

    With ``refusal_ids``, also returns each prompt's refusal score at the first generated position, read from the
    same forward pass that generates the first token.
    """
    if plan is not None and plan.n_rows is not None and plan.n_rows != len(prompts):
        raise ValueError(f"the plan has {plan.n_rows} rows for {len(prompts)} prompts")
    dev = model_device(model)
    wanted = list(range(len(prompts))) if rows is None else list(rows)
    token_ids = dict(zip(wanted, tokenizer([prompts[i] for i in wanted], add_special_tokens=False)["input_ids"]))
    length = {i: len(x) for i, x in token_ids.items()}
    decoder = _StaticDecoder(model, compile=dev.type == "cuda") if static_cache else None
    order = sorted(wanted, key=lambda i: length[i])
    out: dict[int, str] = {}
    first: dict[int, float | None] = {}
    gen_cfg = greedy_config(model, tokenizer, max_new_tokens)
    rids = None if refusal_ids is None else torch.tensor(list(refusal_ids), device=dev)

    eos = gen_cfg.eos_token_id
    eos_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=dev)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def run(chunk):
        sub = plan.take(list(chunk)) if plan is not None else None
        # eager decoding: fused norms and grouped attention; the compiled static decoder sets its own attention and
        # leaves the norms to the compiler, as when it was measured (7.04 ms/step on an H200)
        eager = nullcontext() if decoder is not None else _eager_speedups(model)
        with eager:
            split = prefill(model, [token_ids[i] for i in chunk], sub, pad, dev) if split_prefill and not decoder \
                else None
            b, cache = split if split is not None else (tokenize(tokenizer, [prompts[i] for i in chunk], dev), None)
            hooks = apply(model, sub) if sub is not None else nullcontext()
            with hooks, phase("prompt"):
                if decoder is not None:
                    new_tokens, first_logits = decoder(b.input_ids, b.attention_mask, max_new_tokens, eos_ids, pad)
                else:
                    keep = _FirstLogits()
                    extra = {} if cache is None else {cache_kwarg(model): cache}
                    seq = model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, **extra,
                                         generation_config=gen_cfg, logits_processor=LogitsProcessorList([keep]))
                    new_tokens, first_logits = seq[:, b.input_ids.shape[1]:], keep.first
        texts = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        scores = refusal_score(first_logits, rids).tolist() if rids is not None else [None] * len(chunk)
        for i, t, s in zip(chunk, texts, scores):
            out[i] = t
            first[i] = s
        if on_batch is not None:
            on_batch(list(chunk), texts, scores)

    in_batches(run, order, batch_size, description)
    texts = [out[i] for i in wanted]
    if refusal_ids is None:
        return texts
    return texts, torch.tensor([first[i] for i in wanted])
