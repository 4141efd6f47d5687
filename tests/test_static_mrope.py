"""The static decoder on Qwen2.5-VL's multimodal RoPE (three rotary sections), and the greedy check that judges
static paths (``benchmarks/speed/profile_generate.py::greedy_deficit``), on the tiny Qwen2.5-VL of ``tests/archs.py``
on the CPU.

The H100 matrix of 2026-12-06 showed whole-logit deficits for this model's bf16 static path. On the CPU the static
decoder computes exactly what the model does in float32 (same positions in all three sections, the same cos/sin bit
for bit, the same head outputs at every step) and to bf16 rounding in bf16; the whole logits came from the check
counting the padding a row writes after its stop token. These tests keep both facts.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from refusal import format_prompts
from refusal.data import builtin
from refusal.generation.batched import greedy_config
from refusal.generation.static import StaticDecoder
from refusal.templates import tokenize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.*

import archs  # noqa: E402

from benchmarks.speed.profile_generate import greedy_deficit, live_tokens  # noqa: E402

N = 8
FAMILY = "qwen2_5_vl"
pytestmark = pytest.mark.skipif(FAMILY not in archs.FAMILIES, reason="this transformers has no Qwen2.5-VL")


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rows = builtin("harmful")[:2] + builtin("harmless")[:2]
    return format_prompts(tokenizer, [r["instruction"] for r in rows])


def _eos(model, tok) -> torch.Tensor:
    eos = greedy_config(model, tok, N).eos_token_id
    return torch.tensor([eos] if isinstance(eos, int) else list(eos))


def _generate(model, tok, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """model.generate's greedy tokens for one unpadded prompt, padded to N after its stop token, and the prompt ids."""
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=greedy_config(model, tok, N))
    new = seq[:, ids.shape[1]:]
    return torch.cat([new, new.new_full((1, N - new.shape[1]), tok.pad_token_id)], 1), ids


def _static(model, tok, ids, mask, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The static decoder's tokens (eager step, as static_cache="graphs" runs on a CPU) and its head output at every
    forward ``(batch, N, vocab)``."""
    seen: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out[:, -1].float()))
    try:
        with torch.no_grad():
            tokens, _ = StaticDecoder(model, compile=False, graphs=False, **kw)(ids, mask, N, _eos(model, tok),
                                                                                 tok.pad_token_id)
    finally:
        handle.remove()
    return tokens, torch.stack(seen, 1)


def _plain_heads(model, ids, mask, tokens) -> torch.Tensor:
    """The head outputs of one teacher-forced plain forward over prompt + tokens, at the positions that chose them."""
    full = torch.cat([ids, tokens[:, :-1]], 1)
    m = torch.cat([mask, mask.new_ones(ids.shape[0], N - 1)], 1)
    seen: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, a, out: seen.append(out.float()))
    try:
        with torch.no_grad():
            model(input_ids=full, attention_mask=m, position_ids=(m.long().cumsum(-1) - 1).clamp_min(0),
                  logits_to_keep=N)
    finally:
        handle.remove()
    return seen[0][:, -N:]


def test_greedy_check_gives_the_models_own_tokens_no_deficit(tokenizer, prompts):
    """model.generate's own greedy tokens are greedy under the check's plain forward (a valid reference), also for a
    row that stops early: the padding after its stop token is no greedy choice and is not counted. Before, it was,
    and the model's own tokens got deficits of ~7.6 logits in float32."""
    model = archs.build(FAMILY, len(tokenizer))
    eos = _eos(model, tokenizer)
    ended_early = 0
    for p in prompts:
        tokens, ids = _generate(model, tokenizer, p)
        ended_early += int((~live_tokens(tokens, eos)).any())
        with torch.no_grad():
            check = greedy_deficit(model, ids, torch.ones_like(ids), tokens, eos)
        assert check["deficit_max"] == 0.0, (p, tokens.tolist(), check)
        assert check["tokens_checked"] == int(live_tokens(tokens, eos).sum())
    assert ended_early, "no row stopped early: this test no longer shows the padding case"


def test_live_tokens():
    t = torch.tensor([[5, 2, 3, 3], [5, 6, 7, 8], [2, 3, 3, 3]])
    assert live_tokens(t, torch.tensor([2])).tolist() == [[True, True, False, False], [True] * 4,
                                                          [True, False, False, False]]
    assert live_tokens(t).all() and live_tokens(t, torch.tensor([], dtype=torch.long)).all()


def test_static_decoder_runs_the_models_own_mrope(tokenizer, prompts):
    """The static decoder feeds Qwen2.5-VL's rotary module what model.generate does: the same position in all three
    multimodal sections, and the module returns the same cos/sin (computed in float32, cast to bf16) bit for bit."""
    model = archs.build(FAMILY, len(tokenizer)).to(torch.bfloat16)
    rot: Any = model.model.language_model.rotary_emb  # type: ignore[union-attr]
    assert list(getattr(rot, "mrope_section", [])) == [2, 3, 3]  # (what makes this model the case)

    def record(into):
        return rot.register_forward_hook(lambda m, args, out: into.append((args[1].clone(), out[0], out[1])))

    gen: list[tuple[torch.Tensor, ...]] = []
    static: list[tuple[torch.Tensor, ...]] = []
    handle = record(gen)
    try:
        tokens, ids = _generate(model, tokenizer, prompts[0])
    finally:
        handle.remove()
    n_gen = int(live_tokens(tokens, _eos(model, tokenizer)).sum())
    handle = record(static)
    try:
        got, _ = _static(model, tokenizer, ids, torch.ones_like(ids), fuse=True)
    finally:
        handle.remove()
    assert torch.equal(got[:, :n_gen], tokens[:, :n_gen])
    assert len(gen) == n_gen
    for (gp, gc, gs), (sp, sc, ss) in zip(gen, static[:n_gen]):
        assert sp.shape == gp.shape and sp.shape[0] == 3, (sp.shape, gp.shape)  # 3 sections, (3, batch, q)
        assert torch.equal(sp, gp)
        assert sc.dtype == gc.dtype == torch.bfloat16
        assert torch.equal(sc, gc) and torch.equal(ss, gs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decoder_equals_the_models_forward_at_every_step(tokenizer, prompts, dtype):
    """On the left-padded batch as the matrix decodes it, with fused projections: the static decoder's head output at
    every step equals one plain forward of the model over prompt + its tokens (float32: exactly; bf16: within
    rounding, a few tenths of a logit at most against a spread of ~5, where a wrong rotation or a lost cache write
    gives whole logits), and its tokens are greedy under that forward to bf16 rounding."""
    model = archs.build(FAMILY, len(tokenizer)).to(dtype)
    b = tokenize(tokenizer, prompts, model.device)
    eos = _eos(model, tokenizer)
    tokens, heads = _static(model, tokenizer, b.input_ids, b.attention_mask, fuse=True)
    ref = _plain_heads(model, b.input_ids, b.attention_mask, tokens)
    live = live_tokens(tokens, eos)
    diff = (heads - ref).abs().amax(-1)[live]
    with torch.no_grad():
        check = greedy_deficit(model, b.input_ids, b.attention_mask, tokens, eos)
    if dtype == torch.float32:
        assert diff.max().item() < 1e-4, diff
        assert check["deficit_max"] == 0.0, check
        for i, p in enumerate(prompts):  # and model.generate's tokens, one unpadded prompt at a time
            want, _ = _generate(model, tokenizer, p)
            assert torch.equal(tokens[i][live[i]], want[0][live[i]]), (i, tokens[i].tolist(), want.tolist())
    else:
        assert diff.max().item() < 0.5, diff
        assert check["deficit_max"] < 0.25, check
