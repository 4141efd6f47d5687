"""Greedy decoding from a static KV cache with fixed shapes, so that one compiled step serves every token.

On a GPU the step is compiled with ``torch.compile`` (or left eager, ``compile=False``) and captured into a CUDA
graph of our own: the whole step — the forward, the argmax, masking rows that have ended, writing the token,
advancing the positions and the attention mask — lives on the device, so replays run with no host work between
them, and the host checks for end of sequence every ``check_every`` steps. (Variants that capture several steps per
graph or read only the written part of the cache are benchmarks: ``benchmarks/speed/decoder_variants.py``.)

A captured graph holds the addresses of the weights, the hooks' tensors and the decoder's buffers: graphs are
kept (for later calls of the same shape) only while the model's parameters and hooks are the same objects, and
are captured anew otherwise; dynamo's guards, which a replay skips, still see every change at the next capture.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import TYPE_CHECKING

import torch

from ..errors import RefusalError
from ..interventions.hooks import token_phase
from ..models.fused import fused_projections
from ..models.head import keep_last
from ..models.norms import fused_norms
from ..models.parts import cache_kwarg, find_parts, model_device
from .attention import grouped_attention
from .attention_kernel import KERNEL, why_not
from .mlp_kernel import MAX_ROWS, gated_mlp_kernel

if TYPE_CHECKING:
    from torch.cuda.graphs import _POOL_HANDLE  # what torch.cuda.graph_pool_handle returns


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def _signature(model) -> tuple:
    """What a captured graph depends on besides the decoder's own buffers: where every parameter lives and which
    hooks are installed (an intervention entered or left changes them)."""
    params = tuple(p.data_ptr() for p in model.parameters())
    hooks = tuple((id(m), tuple(map(id, m._forward_pre_hooks.values())), tuple(map(id, m._forward_hooks.values())))
                  for m in model.modules() if m._forward_pre_hooks or m._forward_hooks)
    return params, hooks


def unsupported_attention(model, length: int) -> str | None:
    """Why one static cache with one full causal mask would not decode ``length`` positions as the model does (None
    when it would): a sliding window shorter than that, or layer kinds it does not know (chunked attention, ...)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kinds = set(getattr(cfg, "layer_types", None) or [])
    other = kinds - {"full_attention", "sliding_attention"}
    if other:
        return f"its {', '.join(sorted(other))} layers"
    window = getattr(cfg, "sliding_window", None)
    if window and (not kinds or "sliding_attention" in kinds) and window < length:
        return f"its sliding-window attention over {window} positions, fewer than the {length} of prompt + new tokens"
    return None


def _choose(asked: bool | None, auto: bool, why_not_here, what: str, hint: str) -> bool:
    """Whether to use an optional kernel: ``asked`` False never; None where ``auto`` and it can run; True required,
    with a clear error where it cannot (``why_not_here()`` says why, or None)."""
    if asked is False or (asked is None and not auto):
        return False
    why = why_not_here()
    if why is not None and asked:
        raise RefusalError(f"The {what} cannot run here: {why}.", hint)
    return why is None


def one_device(model) -> bool:
    """Whether every parameter and buffer of ``model`` sits on one CUDA device, with no accelerate hooks."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    return len(devices) == 1 and next(iter(devices)).type == "cuda" and not any(
        hasattr(m, "_hf_hook") for m in model.modules())


class _Buffers:
    """The decoding state of one batch shape, updated in place by every step (so a captured graph can replay)."""

    def __init__(self, model, b: int, total: int, width: int, dev, mask_dtype):
        from transformers import StaticCache

        self.cache = StaticCache(config=model.config, max_cache_len=total)
        self.mask = torch.zeros(b, total, dtype=mask_dtype, device=dev)
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=dev)  # the token fed to the next step
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=dev)  # its position id (left padding excluded)
        self.cpos = torch.zeros(1, dtype=torch.long, device=dev)  # its cache position
        self.idx = torch.zeros(1, dtype=torch.long, device=dev)  # the column of tokens the next step writes
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)
        self.tokens = torch.zeros(b, width, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None  # one decode step, captured
        self.pool: _POOL_HANDLE | None = None
        self.signature: tuple | None = None
        self.eos_ids: torch.Tensor | None = None
        self.pad: torch.Tensor | None = None

    def drop_graphs(self) -> None:
        """Forget the captured graphs (and their memory pool): they read weights, hooks or stop tokens that changed."""
        self.graph, self.pool = None, None


class StaticDecoder:
    """Greedy decoding with a static KV cache (see the module's docstring). Stops early only when every row has
    ended, checking once per graph replay (or every ``check_every`` steps without graphs): a check is a
    device-to-host sync.

    ``compile`` compiles the step (``torch.compile``; ``backend``: another than inductor, for checks; with inductor
    on a GPU, its combo kernels fuse independent kernels horizontally); ``graphs`` captures it, compiled or not, into
    a CUDA graph (a model on one CUDA device only; by default with ``compile``); ``fuse`` runs the q/k/v and gate/up
    projections as one GEMM each during the call (:func:`~refusal.models.fused.fused_projections`; by default with
    ``compile``); ``attention_kernel`` runs each
    decode step's attention as one Triton kernel per layer (:mod:`~refusal.generation.attention_kernel`; None: on a
    CUDA device when triton is there, True: required, an error where it cannot run; False: never); ``mlp_kernel``
    runs each gated MLP's gate/up projections and activation (SiLU or tanh-GELU) in decode steps as one Triton kernel
    (:mod:`~refusal.generation.mlp_kernel`; None, True, False as ``attention_kernel``). Buffers and graphs of the
    last batch shape are kept for the next call; within a ``with decoder:`` block the model stays set up for decoding
    between calls, so they are also replayed (outside one, each call sets it up and the fused weights may land
    elsewhere, which captures anew).
    """

    def __init__(self, model, compile: bool, *, graphs: bool | None = None, fuse: bool | None = None,
                 check_every: int = 16, round_to: int = 128, backend: str = "inductor",
                 attention_kernel: bool | None = None, mlp_kernel: bool | None = None):
        self.model = model
        self.check_every = check_every
        self.round_to = round_to  # cache lengths are rounded up so that few shapes (and compilations) occur
        # a captured graph records one device's stream: a model split over GPUs or offloaded by accelerate (whose
        # hooks move weights during the forward) runs the compiled step without graphs
        self.graphs = (compile and one_device(model)) if graphs is None else graphs
        self.fuse = compile if fuse is None else fuse
        self.buffers: tuple[tuple, _Buffers] | None = None
        self.cache_kw = cache_kwarg(model)  # looked up here, not in the compiled step
        self.compiled = compile  # (a bound method is a new object at each access: compare this, not self.step)
        # inductor's horizontal fusion on a GPU: a layer's q and k rotations and its two cache writes in one launch
        # instead of three (torch.compile takes either a mode or options: the options here, the default mode elsewhere)
        self.combo_kernels = compile and backend == "inductor" and model_device(model).type == "cuda"
        inductor = {"options": {"combo_kernels": True}} if self.combo_kernels else {"mode": "default"}
        self.step = torch.compile(self._step, **(inductor if backend == "inductor" else {}), backend=backend,
                                  fullgraph=False) if compile else self._step
        self._depth, self._grouped = 0, False
        self._stack: ExitStack | None = None
        self.graphs_given_up: str | None = None  # why capturing failed, if it did (graphs are then off)
        self.attention_kernel = attention_kernel
        self.kernel = False  # whether the steps of the last call ran the Triton attention kernel
        self.mlp_kernel = mlp_kernel
        self.mlp_kernels = 0  # MLPs that ran the Triton gate/up + activation kernel at the last set-up

    def describe(self) -> str:
        """What decodes, for a run's record: e.g. ``static cache, compiled step, CUDA graphs, fused projections``."""
        parts = ["static cache", "compiled step" + (" (combo kernels)" if self.combo_kernels else "") if self.compiled
                 else "eager step"]
        if self.graphs:
            parts.append("CUDA graphs")
        elif self.graphs_given_up:
            parts.append(f"no CUDA graphs ({self.graphs_given_up})")
        if self.fuse:
            parts.append("fused projections")
        if self.kernel:
            parts.append("Triton decoding attention")
        if self.mlp_kernels:
            parts.append(f"Triton gate/up + activation kernel in {self.mlp_kernels} MLPs (steps of up to {MAX_ROWS} "
                         "rows)")
        return ", ".join(parts)

    def _forward(self, ids, position_ids, cache_position, mask, cache, kernel=False, **extra):
        """The model's last-position logits; ``extra`` keyword arguments go to its forward."""
        if kernel:
            extra[KERNEL] = True
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache_position=cache_position,
                         **{self.cache_kw: cache}, use_cache=True, logits_to_keep=keep_last(ids.shape[1], ids.device),
                         **extra)
        return out.logits[:, -1, :]

    def _step(self, s: _Buffers, eos_ids, pad, **extra):
        """One decode step on the buffers: feed ``s.ids``, write the next token, advance. Under grouped attention the
        mask goes in as 4-D, which transformers passes through as it is: building it from the 2-D mask checks it on
        the host (a sync, which a CUDA graph of the eager step could not capture). ``extra`` keyword arguments go to
        the model's forward."""
        mask = s.mask[:, None, None, :].bool() if self._grouped else s.mask
        logits = self._forward(s.ids, s.pos, s.cpos, mask, s.cache, self.kernel, **extra)
        nxt = torch.where(s.done, pad, logits.argmax(-1))
        s.tokens.index_copy_(1, s.idx, nxt[:, None])
        s.done |= torch.isin(nxt, eos_ids)
        s.ids.copy_(nxt[:, None])
        s.pos += 1
        s.cpos += 1
        s.idx += 1
        s.mask.index_fill_(1, s.cpos, 1)

    def _buffers(self, b: int, total: int, width: int, dev, mask_dtype) -> _Buffers:
        key = (b, total, width, dev, mask_dtype)
        if self.buffers is None or self.buffers[0] != key:
            self.buffers = None  # the previous shape's cache and graphs go before the new ones are allocated
            self.buffers = (key, _Buffers(self.model, b, total, width, dev, mask_dtype))
        s = self.buffers[1]
        s.cache.reset()
        return s

    def __enter__(self) -> StaticDecoder:
        """Set the model up for decoding (grouped attention, fused projections) until the block ends, instead of for
        each call: the fused weights then stay where they are, so graphs captured by one call serve the next."""
        if self._depth == 0:
            stack = ExitStack()
            try:
                self._grouped = stack.enter_context(grouped_attention(self.model))
                if self.fuse:
                    stack.enter_context(fused_projections(self.model))
                if self._use_mlp_kernel():
                    self.mlp_kernels = stack.enter_context(gated_mlp_kernel(find_parts(self.model).mlp))
                if not self.compiled:  # eager: each RMS norm as one kernel (a compiled step fuses its own)
                    stack.enter_context(fused_norms(self.model))
            except BaseException:
                stack.close()
                raise
            self._stack = stack
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            stack, self._stack = self._stack, None
            assert stack is not None  # made by the outermost __enter__
            stack.close()

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, max_new_tokens: int, eos_ids: torch.Tensor, pad_id: int):
        """Greedy tokens ``(batch, max_new_tokens)`` (``pad_id`` after a row's end) and the first position's logits."""
        # torch.compile does not by default notice hooks added after it compiled (an intervention entered between
        # calls): have it guard on them, so a changed intervention recompiles instead of being ignored
        guards = torch._dynamo.config.patch(skip_nnmodule_hook_guards=False) if self.compiled \
            else nullcontext()
        with self, guards:
            return self._decode(input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, self._grouped)

    def _decode(self, input_ids, attention_mask, max_new_tokens: int, eos_ids, pad_id: int, grouped: bool):
        b, t = input_ids.shape
        dev = input_ids.device
        why = unsupported_attention(self.model, t + max_new_tokens)
        if why is not None:
            raise RefusalError(f"Static-cache decoding cannot follow this model: {why}.",
                               "Decode with model.generate (generate.static_cache: false).")
        self.kernel = self._use_kernel(dev, grouped)
        n_steps = max_new_tokens - 1  # forwards after the prefill
        total = _round_up(t + max_new_tokens + 1, self.round_to)
        s = self._buffers(b, total, max_new_tokens, dev, attention_mask.dtype)
        s.mask.zero_()
        s.mask[:, :t] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        first = self._forward(input_ids, positions, torch.arange(t, device=dev), s.mask, s.cache)  # prefill, eager
        token_phase(self.model).set("generated")  # the steps after the prefill generate
        eos_ids = eos_ids.to(dev)
        pad = torch.tensor(pad_id, device=dev)
        nxt = first.argmax(-1)
        s.tokens.fill_(pad_id)
        s.tokens[:, 0] = nxt
        s.done.copy_(torch.isin(nxt, eos_ids))
        s.ids.copy_(nxt[:, None])
        s.pos.copy_(positions[:, -1:] + 1)
        s.cpos.fill_(t)
        s.idx.fill_(1)
        s.mask[:, t] = 1
        sig = (_signature(self.model), tuple(eos_ids.tolist()), pad_id) if self.graphs else None
        if sig is None or sig != s.signature:  # other weights, hooks or stop tokens: graphs captured before are stale
            s.drop_graphs()
            s.signature = sig
            s.eos_ids, s.pad = eos_ids, pad  # what the steps (and graphs captured from now on) read
        self._loop(s, n_steps)
        return s.tokens[:, :max_new_tokens].clone(), first

    def _loop(self, s: _Buffers, n_steps: int) -> None:
        """The ``n_steps`` decode steps after the prefill, on the buffers. The first step of a call runs uncaptured,
        compiling the step before a graph is captured; with graphs, the next is captured once and every later step
        replays it."""
        warm = False  # whether this call has run the step (so that it is compiled) before capturing
        steps = 0
        while steps < n_steps:
            if steps and steps % self.check_every == 0 and bool(s.done.all()):
                break
            if self.graphs and (warm or s.graph is not None):
                if s.graph is None:
                    s.graph = self._capture_or_give_up(s)
                if s.graph is not None:
                    s.graph.replay()
                    steps += 1
            else:  # one step: without graphs, or to compile the step before capturing it
                self.step(s, s.eos_ids, s.pad)
                warm = True
                steps += 1

    def _use_kernel(self, dev: torch.device, grouped: bool) -> bool:
        return _choose(self.attention_kernel, dev.type == "cuda",  # (unasked: never in the interpreter on a CPU)
                       lambda: why_not(dev) or (None if grouped else
                                                "the model's attention is not SDPA or eager, which it replaces"),
                       "Triton decoding attention", "Leave attention_kernel unset (or False) to decode with torch's "
                       "attention.")

    def _use_mlp_kernel(self) -> bool:
        dev = model_device(self.model)
        return _choose(self.mlp_kernel, dev.type == "cuda" and one_device(self.model),  # (unasked: nor over devices)
                       lambda: why_not(dev), "Triton MLP kernel",
                       "Leave mlp_kernel unset (or False) to decode with the model's own MLP.")

    def _capture_or_give_up(self, s: _Buffers, *args) -> torch.cuda.CUDAGraph | None:
        """Capture a graph (``args`` go to :meth:`_capture`); if this model's step cannot be captured (a forward that
        waits on the host, e.g. a data-dependent branch), say so, stop using graphs in this decoder and return None:
        the steps then run one by one, giving the same tokens. Running out of memory is raised (the caller halves the
        batch)."""
        try:
            return self._capture(s, *args)
        except Exception as exc:  # noqa: BLE001 -- reported; the uncaptured step is the same computation
            from ..batching import console, is_oom

            if is_oom(exc):
                raise
            console.print(f"[yellow]This model's decode step cannot be captured into a CUDA graph "
                          f"({type(exc).__name__}: {str(exc)[:200]}); decoding without graphs (same tokens, slower)."
                          "[/]")
            self.graphs = False
            self.graphs_given_up = f"{type(exc).__name__}: {str(exc)[:200]}"
            s.drop_graphs()
            return None

    def _capture(self, s: _Buffers) -> torch.cuda.CUDAGraph:
        """One decode step captured into a CUDA graph (in the buffers' memory pool)."""
        g = torch.cuda.CUDAGraph()
        if s.pool is None:
            s.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g, pool=s.pool):
            self.step(s, s.eos_ids, s.pad)
        return g
