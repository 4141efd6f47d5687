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

from ..batching import Batching, console, in_batches, is_oom
from ..interventions.hooks import Plan, TokenPhase, apply, token_phase
from ..models.head import contiguous_head_input
from ..models.norms import fused_norms
from ..models.parts import cache_kwarg, model_device
from ..scoring.refusal import refusal_score
from ..templates import decode_keeping, tokenize
from .attention import grouped_attention, grouped_attention_misfit
from .prefill import prefill
from .static import StaticDecoder, one_device


class _FirstLogits(LogitsProcessor):
    """Keeps the logits of the first generated position (for the refusal score) without storing the rest."""

    def __init__(self, phase: TokenPhase):
        self.first: torch.Tensor | None = None
        self.phase = phase

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = scores.detach().clone()
            self.phase.set("generated")  # called after the prefill forward: the next forwards generate
        return scores


def greedy_config(model, tokenizer, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding: the model's stop tokens, none of its sampling or repetition-penalty defaults."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


@contextmanager
def _eager_speedups(model):
    with grouped_attention(model), fused_norms(model), contiguous_head_input(model):
        yield


def attention_path(model) -> str:
    """Which attention generation runs on ``model``, and why, for a run's record."""
    why = grouped_attention_misfit(model)
    return "grouped (same math as the model's SDPA/eager attention)" if why is None else f"the model's own ({why})"


STATIC_CACHE = (False, True, "graphs")


def static_decoder(model, kind: bool | str) -> StaticDecoder:
    """The decoder ``generate(static_cache=kind)`` uses: ``True`` compiles the step (and on a GPU captures it into
    CUDA graphs, fused projections); ``"graphs"`` captures the eager step into CUDA graphs with no compile (seconds
    to set up instead of a minute; on a CPU, plain static-cache decoding)."""
    if kind not in STATIC_CACHE[1:]:
        raise ValueError(f"static_cache must be one of {STATIC_CACHE}, not {kind!r}")
    cuda = model_device(model).type == "cuda"
    if kind == "graphs":
        return StaticDecoder(model, compile=False, graphs=cuda and one_device(model), fuse=cuda)
    return StaticDecoder(model, compile=cuda)


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 32,
    static_cache: bool | str = False, refusal_ids: Sequence[int] | None = None, description: str = "Generating",
    plan: Plan | None = None, rows: Sequence[int] | None = None,
    on_batch: Callable[[list[int], list[str], list[float | None]], None] | None = None, split_prefill: bool = True,
    decoder: StaticDecoder | None = None, fallback: bool = False, report: dict | None = None,
    keep_special: Sequence[int] = (), batching: Batching | None = None,
) -> list[str] | tuple[list[str], torch.Tensor]:
    """Greedy completions of already-templated prompts.

    ``plan`` (a per-row :class:`~refusal.interventions.Plan` over ``prompts``) gives each prompt its own
    interventions, so prompts of many conditions decode together in the same batches; token-scoped interventions
    see the prompt phase during prefill and the generated phase after it. ``rows`` generates only those prompts (the
    result then follows ``rows``' order), and ``on_batch(rows, texts, scores)`` is called after every batch (to save
    work as it finishes).

    ``static_cache=True`` decodes with a :class:`~refusal.generation.static.StaticDecoder` (compiled and captured
    into CUDA graphs on a GPU; pass ``decoder`` to keep its buffers and graphs from one call to the next);
    otherwise ``model.generate`` with its default cache. Both decode greedily and give the same tokens (up to bf16
    rounding on near-ties); rows stop at the model's end-of-turn tokens.

    ``fallback``: if the static decoder fails on this model (an error other than out-of-memory, e.g. an
    architecture whose forward cannot run on a static cache), say so and decode the rest with ``model.generate``
    instead of raising (a run's stages do; the default raises, so that a broken decoder cannot hide).

    ``report``: a dict to fill with what decoded (``decoder``), which attention ran and why (``attention``: the
    grouped fast path runs only where a probe shows it computes what the model's own attention does) and, after a
    fallback, why (``fallback``), for a run's record.

    ``split_prefill`` (eager decoding): the prompts' prefill runs as :func:`~refusal.generation.prefill.prefill`
    splits it — the template opening they share once per group of rows with the same interventions, the rest in
    length buckets without the batch's padding — and decoding starts from the joined cache (same tokens).

    ``keep_special``: special token ids to keep in the decoded text (a reasoning model's markers, such as harmony's
    ``<|channel|>``; see :mod:`refusal.evaluation.reasoning`); every other special token is dropped, as before.

    ``batching``: the caller's :class:`~refusal.batching.Batching` (the batch size remembered after out-of-memory
    from one call to the next, quietness); none: a fresh one.

    With ``refusal_ids``, also returns each prompt's refusal score at the first generated position, read from the
    same forward pass that generates the first token.
    """
    if plan is not None and plan.n_rows is not None and plan.n_rows != len(prompts):
        raise ValueError(f"the plan has {plan.n_rows} rows for {len(prompts)} prompts")
    dev = model_device(model)
    wanted = list(range(len(prompts))) if rows is None else list(rows)
    token_ids = dict(zip(wanted, tokenizer([prompts[i] for i in wanted], add_special_tokens=False)["input_ids"]))
    length = {i: len(x) for i, x in token_ids.items()}
    if decoder is None and static_cache:
        decoder = static_decoder(model, static_cache)
    order = sorted(wanted, key=lambda i: length[i])
    out: dict[int, str] = {}
    first: dict[int, float | None] = {}
    gen_cfg = greedy_config(model, tokenizer, max_new_tokens)
    rids = None if refusal_ids is None else torch.tensor(list(refusal_ids), device=dev)

    eos = gen_cfg.eos_token_id
    eos_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=dev)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    active = [decoder]  # the static decoder, until it fails with fallback on
    clock = token_phase(model)  # the phase every hook on the model reads, the caller's around this call included

    def run(chunk):
        decoder = active[0]
        sub = plan.take(list(chunk)) if plan is not None else None
        # eager decoding: fused norms and grouped attention; the static decoder sets its own attention (and, compiled,
        # leaves the norms to the compiler, which fuses them itself)
        eager = nullcontext() if decoder is not None else _eager_speedups(model)
        with eager:
            split = prefill(model, [token_ids[i] for i in chunk], sub, pad, dev) if split_prefill and not decoder \
                else None
            b, cache = split if split is not None else (tokenize(tokenizer, [prompts[i] for i in chunk], dev), None)
            hooks = apply(model, sub) if sub is not None else nullcontext()
            with hooks, clock.during("prompt"):
                if decoder is not None:
                    try:
                        new_tokens, first_logits = decoder(b.input_ids, b.attention_mask, max_new_tokens, eos_ids,
                                                           pad)
                    except Exception as exc:  # noqa: BLE001 -- reported, and the batch is decoded again below
                        if not fallback or is_oom(exc):
                            raise
                        console.print(f"[yellow]Static-cache decoding failed on this model ({type(exc).__name__}: "
                                      f"{str(exc)[:200]}); decoding with model.generate instead (same tokens, "
                                      "slower). Set generate.static_cache: false to skip the attempt.[/]")
                        active[0] = None
                        new_tokens = None
                        if report is not None:
                            report["fallback"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                else:
                    keep = _FirstLogits(clock)
                    extra = {} if cache is None else {cache_kwarg(model): cache}
                    seq = model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, **extra,
                                         generation_config=gen_cfg, logits_processor=LogitsProcessorList([keep]))
                    new_tokens, first_logits = seq[:, b.input_ids.shape[1]:], keep.first
        if new_tokens is None:  # the static decoder failed (fallback): again, with model.generate, hooks left first
            return run(chunk)
        texts = [t.strip() for t in decode_keeping(tokenizer, new_tokens, keep_special)]
        scores = refusal_score(first_logits, rids).tolist() if rids is not None else [None] * len(chunk)
        for i, t, s in zip(chunk, texts, scores):
            out[i] = t
            first[i] = s
        if on_batch is not None:
            on_batch(list(chunk), texts, scores)

    with decoder if decoder is not None else nullcontext():  # set up once for every batch
        in_batches(run, order, batch_size, description, batching=batching)
    if report is not None:
        report["decoder"] = active[0].describe() if active[0] is not None else "model.generate"
        report["attention"] = attention_path(model)
    texts = [out[i] for i in wanted]
    if refusal_ids is None:
        return texts
    return texts, torch.tensor([first[i] for i in wanted])
