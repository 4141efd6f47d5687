"""The static decoder's benchmark-only variants (benchmarks/speed/decoder_variants.py: graphs of several steps, reads
of the written part of the cache only, inductor's options), and the package decoder's compile arguments."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from refusal import ablate, add, find_parts, format_prompts
from refusal.data import builtin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.*

from benchmarks.speed.decoder_variants import VISIBLE, LabDecoder  # noqa: E402

HARMFUL = [r["instruction"] for r in builtin("harmful")[:3]]
HARMLESS = [r["instruction"] for r in builtin("harmless")[:2]]


def test_graph_chunks_and_cache_buckets_give_the_same_tokens(model, tokenizer, monkeypatch):
    """The lab decoder's graph bookkeeping (chunks of steps, warm-up step per cache bucket, tail steps, early stop,
    reads of the written part of the cache only), with a replay that runs the captured steps eagerly: a CPU has no
    CUDA graphs. Graphs are kept while weights and hooks stay, and captured anew when an intervention enters."""
    from refusal.generation.batched import generate

    captured = []

    def capture(self, s, visible=None, k=1):
        captured.append(visible.shape[0])
        extra = {VISIBLE: visible}
        return type("Replay", (), {"replay": lambda _: [self.step(s, s.eos_ids, s.pad, **extra) for _ in range(k)]})()

    monkeypatch.setattr(LabDecoder, "_capture", capture)
    prompts = format_prompts(tokenizer, HARMFUL + HARMLESS)
    dec = LabDecoder(model, compile=False, graphs=True, steps_per_graph=4, kv_bucket=8)
    want = generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5)
    assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                    decoder=dec) == want
    n = len(captured)
    assert n >= 2 and len(set(captured)) == n  # several buckets, each captured once
    assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                    decoder=dec) == want
    assert len(captured) == n  # same weights and hooks: the graphs are replayed again
    d = torch.randn(find_parts(model).hidden_size)
    with ablate(model, d):
        want = generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5)
        assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                        decoder=dec) == want
    assert len(captured) == 2 * n  # the ablation's hooks: captured anew
    fused = LabDecoder(model, compile=False, graphs=True, steps_per_graph=3, kv_bucket=8, fuse=True)
    assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                    decoder=fused) == generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5)
    with add(model, 4 * d, layer=1):  # an intervention's hooks on fused projections' blocks
        assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                        decoder=fused) == generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5)


def test_the_visible_span_attention_is_restored(model, tokenizer):
    """Within the lab decoder's block (kv_bucket set) the grouped attention reads only the visible span; after it, the
    package's grouped attention is registered again."""
    from transformers import AttentionInterface

    from refusal.generation.attention import GQA, gqa_attention

    dec = LabDecoder(model, compile=False, kv_bucket=8)
    with dec:
        inside = AttentionInterface._global_mapping.get(GQA)
    if dec._grouped:  # (a model whose attention the grouped one cannot compute keeps its own)
        assert inside is not gqa_attention
        assert AttentionInterface._global_mapping.get(GQA) is gqa_attention


def _compile_calls(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    return calls


@pytest.mark.parametrize("cuda", [False, True])
def test_default_decoder_compiles_as_before_and_lab_defaults_match(model, monkeypatch, cuda):
    """``StaticDecoder(model, compile=True)`` asks torch.compile for inductor's combo kernels on a GPU and its default
    mode elsewhere; the lab decoder without knobs asks the same, and its knobs change only what they name."""
    import refusal.generation.static as static

    if cuda:  # the device is only read, never used, by the constructor
        monkeypatch.setattr(static, "model_device", lambda m: torch.device("cuda"))
    calls = _compile_calls(monkeypatch)
    want = {"options": {"combo_kernels": True}} if cuda else {"mode": "default"}
    want = {**want, "backend": "inductor", "fullgraph": False}
    dec = static.StaticDecoder(model, compile=True)
    assert calls == [want] and dec.combo_kernels == cuda
    lab = LabDecoder(model, compile=True)
    assert calls == [want, want] and lab.describe() == dec.describe()
    calls.clear()
    LabDecoder(model, compile=True, combo_kernels=False)
    assert calls[-1] == {"mode": "default", "backend": "inductor", "fullgraph": False}
    LabDecoder(model, compile=True, mode="max-autotune-no-cudagraphs")
    assert calls[-1] == {"mode": "max-autotune-no-cudagraphs", "backend": "inductor", "fullgraph": False}
    assert LabDecoder(model, compile=True, backend="eager", combo_kernels=False).compiled
    assert calls[-1] == {"backend": "eager", "fullgraph": False}
    with pytest.raises(ValueError, match="default mode"):
        LabDecoder(model, compile=True, combo_kernels=True, mode="max-autotune-no-cudagraphs")
