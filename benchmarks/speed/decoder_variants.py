"""Variants of the static decoder that only benchmarks use (:mod:`benchmarks.speed.profile_generate`'s ``VARIANTS``).

:class:`LabDecoder` is :class:`refusal.generation.static.StaticDecoder` with the knobs the package's default path
never turns, kept here with the measurements that retired them (``docs/changelog.md``):

* ``steps_per_graph``: capture that many decode steps into one CUDA graph instead of one (the host checks for the end
  of every row once per replay);
* ``kv_bucket``: the attention reads only the part of the cache written so far, rounded up to a multiple of
  ``kv_bucket`` positions, with one graph per bucket. The visible length travels as the size of a 1-D tensor marked
  dynamic, so one compiled step serves every bucket; the grouped attention is wrapped to slice the keys and values;
* ``combo_kernels``: inductor's horizontal fusion on or off (the package turns it on with inductor on a GPU);
* ``mode``: another ``torch.compile`` mode (``max-autotune-no-cudagraphs``, ...; not with combo kernels).

With none of them set it constructs and decodes exactly as :class:`StaticDecoder` does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from refusal.generation.static import StaticDecoder

VISIBLE = "refusal_visible"  # keyword argument of the forward: how many leading cache positions the attention reads


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


@contextmanager
def visible_span_attention():
    """Register, in place of the grouped attention, a wrapper that reads only the first ``L`` cache positions when the
    forward passes ``refusal_visible`` (an int or a 1-D tensor of that length), and restore the grouped attention on
    exit. The caller vouches that the positions left out are masked for every query."""
    from transformers import AttentionInterface

    from refusal.generation.attention import GQA, gqa_attention

    def sliced(module, query, key, value, attention_mask, **kwargs):
        visible = kwargs.pop(VISIBLE, None)
        if visible is not None:
            n = visible if isinstance(visible, int) else visible.shape[0]
            key, value = key[:, :, :n], value[:, :, :n]
        return gqa_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(GQA, sliced)
    try:
        yield
    finally:
        AttentionInterface.register(GQA, gqa_attention)


class LabDecoder(StaticDecoder):
    """:class:`StaticDecoder` with the benchmark-only knobs of the module's docstring."""

    def __init__(self, model, compile: bool, *, steps_per_graph: int = 1, kv_bucket: int = 0,
                 combo_kernels: bool | None = None, mode: str = "default", backend: str = "inductor", **kwargs):
        super().__init__(model, compile, backend=backend, **kwargs)
        self.steps_per_graph = steps_per_graph
        self.kv_bucket = kv_bucket
        self._width = 0  # the prompt width of the call in progress
        if combo_kernels is not None or mode not in (None, "default"):
            combo = self.combo_kernels and mode in (None, "default") if combo_kernels is None else combo_kernels
            if combo and mode not in (None, "default"):
                raise ValueError(f"combo_kernels go with torch.compile's default mode, not {mode!r}")
            self.combo_kernels = compile and combo
            inductor = {"options": {"combo_kernels": True}} if self.combo_kernels else {"mode": mode}
            if compile:
                self.step = torch.compile(self._step, **(inductor if backend == "inductor" else {}), backend=backend,
                                          fullgraph=False)

    def __enter__(self) -> LabDecoder:
        first = self._depth == 0
        super().__enter__()
        if first and self.kv_bucket and self._grouped:
            self._stack.enter_context(visible_span_attention())
        return self

    def _decode(self, input_ids, *args):
        self._width = input_ids.shape[1]
        return super()._decode(input_ids, *args)

    def _probe(self, s, visible: int | None) -> torch.Tensor | None:
        """The visible length as the size of a tensor, marked dynamic: compiled once for every length."""
        if visible is None:
            return None
        buf = getattr(s, "lab_probe", None)
        if buf is None or buf.shape[0] < visible:
            buf = s.lab_probe = torch.empty(s.mask.shape[1], dtype=torch.int8, device=s.mask.device)
        probe = buf[:visible]
        torch._dynamo.maybe_mark_dynamic(probe, 0)
        return probe

    def _loop(self, s, n_steps: int) -> None:
        """Steps in graphs of ``steps_per_graph`` steps, one graph per cache bucket (one bucket without ``kv_bucket``);
        each bucket is stepped once uncaptured (compiling it) before it is captured, and the tail of a call that is
        shorter than a graph runs uncaptured."""
        if getattr(s, "lab_signature", None) is not s.signature or s.signature is None:
            # other weights, hooks or stop tokens (the decoder replaced the signature): the graphs are stale
            s.lab_graphs, s.lab_signature = {}, s.signature
        graphs = s.lab_graphs
        k = self.steps_per_graph if self.graphs else 1
        t, total = self._width, s.mask.shape[1]
        warm: set = set()
        steps = 0
        while steps < n_steps:
            if steps and steps % self.check_every < k and bool(s.done.all()):
                break
            visible = min(total, _round_up(t + steps + k, self.kv_bucket)) if self._grouped and self.kv_bucket \
                else None
            if self.graphs and n_steps - steps >= k and (visible in warm or visible in graphs):
                g = graphs.get(visible)
                if g is None:
                    g = self._capture_or_give_up(s, self._probe(s, visible), k)
                    if g is not None:
                        graphs[visible] = g
                if g is not None:
                    g.replay()
                    steps += k
            else:
                self.step(s, s.eos_ids, s.pad, **self._extra(s, visible))
                warm.add(visible)
                steps += 1

    def _extra(self, s, visible: int | None) -> dict:
        probe = self._probe(s, visible)
        return {} if probe is None else {VISIBLE: probe}

    def _capture(self, s, visible=None, k: int = 1) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        if s.pool is None:
            s.pool = torch.cuda.graph_pool_handle()
        extra = {} if visible is None else {VISIBLE: visible}
        with torch.cuda.graph(g, pool=s.pool):
            for _ in range(k):
                self.step(s, s.eos_ids, s.pad, **extra)
        return g
