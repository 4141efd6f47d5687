"""Batched greedy generation.

Prompts are sorted by length so each batch carries little padding, generated in batches (halving the batch on
out-of-memory), and returned in the caller's order. Interventions apply by wrapping the call in their context
manager.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, overload

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..batching import Batching, console, in_batches, is_oom
from ..interventions.hooks import Plan, TokenPhase, apply, token_phase
from ..models.head import contiguous_head_input
from ..models.norms import fused_norms
from ..models.parts import cache_kwarg, model_device
from ..scoring.refusal import refusal_score
from ..templates import Batch, decode_keeping, tokenize
from .attention import grouped_attention, grouped_attention_misfit
from .prefill import prefill
from .static import StaticDecoder, one_device


class _FirstLogits(LogitsProcessor):
    """Keeps the logits of the first generated position (for the refusal score) without storing the rest."""

    def __init__(self, phase: TokenPhase):
        self.first: torch.Tensor | None = None
        self.phase = phase

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first is None:
            self.first = scores.detach().clone()
            self.phase.set("generated")  # called after the prefill forward: the next forwards generate
        return scores


def greedy_config(model: Any, tokenizer: Any, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding: the model's stop tokens, none of its sampling or repetition-penalty defaults."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


@contextmanager
def _eager_speedups(model: Any) -> Iterator[None]:
    with grouped_attention(model), fused_norms(model), contiguous_head_input(model):
        yield


def attention_path(model: Any) -> str:
    """Which attention generation runs on ``model``, and why, for a run's record."""
    why = grouped_attention_misfit(model)
    return "grouped (same math as the model's SDPA/eager attention)" if why is None else f"the model's own ({why})"


STATIC_CACHE = (False, True, "graphs")


def static_decoder(model: Any, kind: bool | str) -> StaticDecoder:
    """The decoder ``generate(static_cache=kind)`` uses: ``True`` compiles the step (and on a GPU captures it into
    CUDA graphs, fused projections); ``"graphs"`` captures the eager step into CUDA graphs with no compile (seconds
    to set up instead of a minute; on a CPU, plain static-cache decoding)."""
    if kind not in STATIC_CACHE[1:]:
        raise ValueError(f"static_cache must be one of {STATIC_CACHE}, not {kind!r}")
    cuda = model_device(model).type == "cuda"
    if kind == "graphs":
        return StaticDecoder(model, compile=False, graphs=cuda and one_device(model), fuse=cuda)
    return StaticDecoder(model, compile=cuda)


# The result's type follows ``refusal_ids``: the texts alone without them, the texts and the scores with them.
@overload
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 32,
    static_cache: bool | str = False, refusal_ids: None = None, description: str = "Generating",
    plan: Plan | None = None, rows: Sequence[int] | None = None,
    on_batch: Callable[[list[int], list[str], list[float | None]], None] | None = None, split_prefill: bool = True,
    decoder: StaticDecoder | None = None, fallback: bool = False, report: dict | None = None,
    keep_special: Sequence[int] = (), batching: Batching | None = None,
) -> list[str]: ...


@overload
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 32,
    static_cache: bool | str = False, refusal_ids: Sequence[int], description: str = "Generating",
    plan: Plan | None = None, rows: Sequence[int] | None = None,
    on_batch: Callable[[list[int], list[str], list[float | None]], None] | None = None, split_prefill: bool = True,
    decoder: StaticDecoder | None = None, fallback: bool = False, report: dict | None = None,
    keep_special: Sequence[int] = (), batching: Batching | None = None,
) -> tuple[list[str], torch.Tensor]: ...


@overload
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 32,
    static_cache: bool | str = False, refusal_ids: Sequence[int] | None = None, description: str = "Generating",
    plan: Plan | None = None, rows: Sequence[int] | None = None,
    on_batch: Callable[[list[int], list[str], list[float | None]], None] | None = None, split_prefill: bool = True,
    decoder: StaticDecoder | None = None, fallback: bool = False, report: dict | None = None,
    keep_special: Sequence[int] = (), batching: Batching | None = None,
) -> list[str] | tuple[list[str], torch.Tensor]: ...


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 32,
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
    wanted, token_ids, order = _by_length(tokenizer, prompts, rows)
    if decoder is None and static_cache:
        decoder = static_decoder(model, static_cache)
    job = _Batches(model, tokenizer, prompts, token_ids, plan=plan, decoder=decoder, max_new_tokens=max_new_tokens,
                   refusal_ids=refusal_ids, split_prefill=split_prefill, fallback=fallback, report=report,
                   keep_special=keep_special, on_batch=on_batch)
    with decoder if decoder is not None else nullcontext():  # set up once for every batch
        in_batches(job.run, order, batch_size, description, batching=batching)
    if report is not None:
        report["decoder"] = job.decoder.describe() if job.decoder is not None else "model.generate"
        report["attention"] = attention_path(model)
    texts = [job.out[i] for i in wanted]
    if refusal_ids is None:
        return texts
    return texts, torch.tensor([job.first[i] for i in wanted])


def _by_length(tokenizer: Any, prompts: Sequence[str], rows: Sequence[int] | None
               ) -> tuple[list[int], dict[int, list[int]], list[int]]:
    """The prompt indices wanted (``rows``, default all), their token ids, and the indices shortest first."""
    wanted = list(range(len(prompts))) if rows is None else list(rows)
    token_ids = dict(zip(wanted, tokenizer([prompts[i] for i in wanted], add_special_tokens=False)["input_ids"]))
    length = {i: len(x) for i, x in token_ids.items()}
    return wanted, token_ids, sorted(wanted, key=lambda i: length[i])


class _Batches:
    """The batches of one :func:`generate` call: :meth:`run` decodes a chunk of prompt indices (with the static
    decoder, or ``model.generate``) and records each prompt's text and first-position refusal score."""

    def __init__(self, model: Any, tokenizer: Any, prompts: Sequence[str], token_ids: dict[int, list[int]], *,
                 plan: Plan | None, decoder: StaticDecoder | None, max_new_tokens: int,
                 refusal_ids: Sequence[int] | None, split_prefill: bool, fallback: bool, report: dict | None,
                 keep_special: Sequence[int],
                 on_batch: Callable[[list[int], list[str], list[float | None]], None] | None) -> None:
        self.model, self.tokenizer, self.prompts, self.token_ids, self.plan = model, tokenizer, prompts, token_ids, plan
        self.decoder = decoder  # the static decoder, until it fails with fallback on
        self.max_new_tokens, self.split_prefill, self.fallback, self.report = (max_new_tokens, split_prefill,
                                                                               fallback, report)
        self.keep_special, self.on_batch = keep_special, on_batch
        self.dev = dev = model_device(model)
        self.gen_cfg = greedy_config(model, tokenizer, max_new_tokens)
        self.rids = None if refusal_ids is None else torch.tensor(list(refusal_ids), device=dev)
        eos = self.gen_cfg.eos_token_id
        self.eos_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=dev)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.clock = token_phase(model)  # the phase every hook on the model reads, the caller's around this call too
        self.out: dict[int, str] = {}
        self.first: dict[int, float | None] = {}

    def run(self, chunk: Sequence[int]) -> None:
        decoded = self._decode(chunk)
        if decoded is None:  # the static decoder failed (fallback): again, with model.generate, hooks left first
            return self.run(chunk)
        new_tokens, first_logits = decoded
        texts = [t.strip() for t in decode_keeping(self.tokenizer, new_tokens, self.keep_special)]
        scores: list[float | None] = [None] * len(chunk)
        if self.rids is not None:  # first_logits is None only if model.generate made no token (then this fails)
            scores = refusal_score(first_logits, self.rids).tolist()  # type: ignore[arg-type]
        for i, t, s in zip(chunk, texts, scores):
            self.out[i] = t
            self.first[i] = s
        if self.on_batch is not None:
            self.on_batch(list(chunk), texts, scores)
        return None

    def _decode(self, chunk: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The new tokens and first-position logits of ``chunk`` under its interventions; None when the static
        decoder failed and was dropped (fallback)."""
        model, decoder, sub = self.model, self.decoder, self.plan.take(list(chunk)) if self.plan is not None else None
        # eager decoding: fused norms and grouped attention; the static decoder sets its own attention (and, compiled,
        # leaves the norms to the compiler, which fuses them itself)
        eager = nullcontext() if decoder is not None else _eager_speedups(model)
        with eager:
            split = prefill(model, [self.token_ids[i] for i in chunk], sub, self.pad, self.dev) \
                if self.split_prefill and not decoder else None
            b, cache = split if split is not None else (tokenize(self.tokenizer, [self.prompts[i] for i in chunk],
                                                                 self.dev), None)
            hooks = apply(model, sub) if sub is not None else nullcontext()
            with hooks, self.clock.during("prompt"):
                if decoder is not None:
                    return self._static(decoder, b)
                keep = _FirstLogits(self.clock)
                extra = {} if cache is None else {cache_kwarg(model): cache}
                seq = model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, **extra,
                                     generation_config=self.gen_cfg, logits_processor=LogitsProcessorList([keep]))
                return seq[:, b.input_ids.shape[1]:], keep.first

    def _static(self, decoder: StaticDecoder, b: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decode with the static decoder; with ``fallback``, a failure other than out-of-memory is said, recorded
        and answered with None (the decoder is dropped for the rest of the call)."""
        try:
            return decoder(b.input_ids, b.attention_mask, self.max_new_tokens, self.eos_ids, self.pad)
        except Exception as exc:  # noqa: BLE001 -- reported, and the batch is decoded again by the caller
            if not self.fallback or is_oom(exc):
                raise
            console.print(f"[yellow]Static-cache decoding failed on this model ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); decoding with model.generate instead (same tokens, "
                          "slower). Set generate.static_cache: false to skip the attempt.[/]")
            self.decoder = None
            if self.report is not None:
                self.report["fallback"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            return None
