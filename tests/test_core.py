"""Numerical checks of directions, interventions and scoring on tiny random models (Llama, Qwen2, Gemma)."""

from __future__ import annotations

import pytest
import torch

from refusal import ablate, add, extract, find_parts, format_prompts, orthogonalized, post_instruction_ids
from refusal.data import builtin
from refusal.directions.diff_means import Candidates, Direction
from refusal.layout import layout
from refusal.models.norms import fused_norms
from refusal.scoring.engine import last_logits, layout_logits, refusal_scores, score_candidates
from refusal.scoring.refusal import refusal_score, refusal_token_ids
from refusal.scoring.selection import Scores, choose
from refusal.templates import tokenize

HARMFUL = [r["instruction"] for r in builtin("harmful")[:6]]
HARMLESS = [r["instruction"] for r in builtin("harmless")[:5]]


def hidden_inputs(model, tok, prompts):
    """Residual stream at the input of every layer, plus the last layer's output: list of (B, T, d)."""
    b = tokenize(tok, prompts, "cpu")
    caught = {}
    last = find_parts(model).layers[-1]
    h = last.register_forward_hook(lambda m, a, o: caught.setdefault("out", o[0] if isinstance(o, tuple) else o))
    try:
        pos = (b.attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                    output_hidden_states=True)
    finally:
        h.remove()
    n = find_parts(model).n_layers
    return list(out.hidden_states[:n]) + [caught["out"]], b


def test_post_instruction_positions_from_template(tokenizer):
    ids = post_instruction_ids(tokenizer)
    assert tokenizer.decode(ids) == "<|im_end|>\n<|im_start|>assistant\n"
    prompt = format_prompts(tokenizer, ["hello there"])[0]
    full = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert full[-len(ids):] == ids


def test_refusal_tokens_and_score(tokenizer):
    ids = refusal_token_ids(tokenizer, ["I'm sorry", "Sorry, no", "As an AI"])
    assert tokenizer.decode(ids[0]) == "I" and len(ids) == 3
    logits = torch.randn(4, len(tokenizer))
    p = torch.softmax(logits, -1)[:, ids].sum(-1)
    expected = torch.log(p) - torch.log1p(-p)
    torch.testing.assert_close(refusal_score(logits, torch.tensor(ids)), expected, rtol=1e-4, atol=1e-4)


def test_directions_equal_hand_computed_means(model, tokenizer):
    n_pos = len(post_instruction_ids(tokenizer))
    hp, bp = format_prompts(tokenizer, HARMFUL), format_prompts(tokenizer, HARMLESS)
    cands = extract(model, tokenizer, hp, bp, n_pos, batch_size=4)  # batches of 4: means over uneven batches
    hs_h, _ = hidden_inputs(model, tokenizer, hp)
    hs_b, _ = hidden_inputs(model, tokenizer, bp)
    n = find_parts(model).n_layers
    want_h = torch.stack([hs_h[i][:, -n_pos:].mean(0) for i in range(n)], 1)
    want_b = torch.stack([hs_b[i][:, -n_pos:].mean(0) for i in range(n)], 1)
    torch.testing.assert_close(cands.harmful_mean, want_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cands.diffs, want_h - want_b, rtol=1e-4, atol=1e-5)
    assert cands.positions == list(range(-n_pos, 0))


def test_ablation_leaves_no_component_at_any_layer(model, tokenizer):
    d = torch.randn(find_parts(model).hidden_size)
    prompts = format_prompts(tokenizer, HARMFUL[:3])
    before, _ = hidden_inputs(model, tokenizer, prompts)
    u = d / d.norm()
    assert max(float((h @ u).abs().max()) for h in before) > 1e-2  # the test can fail
    with ablate(model, d):
        hs, b = hidden_inputs(model, tokenizer, prompts)
    for h in hs:
        assert float((h @ u).abs().max()) < 1e-4
    assert not find_parts(model).layers[0]._forward_pre_hooks  # removed on exit


def test_subspace_ablation(model, tokenizer):
    d = torch.randn(2, find_parts(model).hidden_size)
    with ablate(model, d):
        hs, _ = hidden_inputs(model, tokenizer, format_prompts(tokenizer, HARMFUL[:2]))
    q, _ = torch.linalg.qr(d.T)
    for h in hs:
        assert float((h @ q).abs().max()) < 1e-4


def test_hooks_removed_on_error(model, tokenizer):
    parts = find_parts(model)
    with pytest.raises(RuntimeError), ablate(model, torch.randn(parts.hidden_size)):
        raise RuntimeError("boom")
    assert not parts.attn[0]._forward_hooks and not parts.layers[1]._forward_pre_hooks


def test_addition_only_at_source_layer(model, tokenizer):
    parts = find_parts(model)
    v = torch.randn(parts.hidden_size)
    prompts = format_prompts(tokenizer, HARMLESS[:3])
    base, _ = hidden_inputs(model, tokenizer, prompts)
    layer = 2
    with add(model, v, layer, coeff=-1.5):
        got, b = hidden_inputs(model, tokenizer, prompts)
    for i in range(layer):
        torch.testing.assert_close(got[i], base[i])
    # HF records the layer input before the pre-hook adds to it; the sum shows up in what the layer computes
    caught = {}

    def grab(m, a, k):
        caught.setdefault("x", (a[0] if a else k["hidden_states"]).clone())

    with add(model, v, layer, coeff=-1.5):  # pre-hooks run in order: this one sees the sum
        h = parts.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                  position_ids=(b.attention_mask.cumsum(-1) - 1).clamp_min(0))
        finally:
            h.remove()
    torch.testing.assert_close(caught["x"], base[layer] - 1.5 * v)
    assert not torch.allclose(got[layer + 1], base[layer + 1])


def test_per_row_ablation_equals_single(model, tokenizer):
    d1, d2 = torch.randn(2, find_parts(model).hidden_size)
    b = tokenize(tokenizer, format_prompts(tokenizer, HARMFUL[:2]), "cpu")
    ids, mask = b.input_ids.repeat(2, 1), b.attention_mask.repeat(2, 1)
    with ablate(model, torch.stack([d1, d1, d2, d2]), per_row=True):
        both = last_logits(model, ids, mask)
    for i, d in enumerate((d1, d2)):
        with ablate(model, d):
            one = last_logits(model, b.input_ids, b.attention_mask)
        torch.testing.assert_close(both[2 * i:2 * i + 2], one, rtol=1e-4, atol=1e-4)


def test_orthogonalized_weights_equal_hook_ablation(model, tokenizer):
    d = torch.randn(find_parts(model).hidden_size)
    b = tokenize(tokenizer, format_prompts(tokenizer, HARMFUL[:3]), "cpu")
    base = last_logits(model, b.input_ids, b.attention_mask)
    with ablate(model, d):
        hooked = last_logits(model, b.input_ids, b.attention_mask)
    with orthogonalized(model, d):
        ortho = last_logits(model, b.input_ids, b.attention_mask)
    torch.testing.assert_close(ortho, hooked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hooked, base, atol=1e-3)
    torch.testing.assert_close(last_logits(model, b.input_ids, b.attention_mask), base)  # restored
    out_emb = model.get_output_embeddings()
    if model.config.tie_word_embeddings:
        assert out_emb.weight is find_parts(model).embed.weight


def _tiny_candidates(model, tokenizer):
    n_pos = len(post_instruction_ids(tokenizer))
    return extract(model, tokenizer, format_prompts(tokenizer, HARMFUL), format_prompts(tokenizer, HARMLESS), n_pos)


def test_batched_scoring_equals_one_at_a_time(model, tokenizer):
    cands = _tiny_candidates(model, tokenizer)
    hv, bv = format_prompts(tokenizer, HARMFUL[:3]), format_prompts(tokenizer, HARMLESS[:2])
    rids = refusal_token_ids(tokenizer)
    many = score_candidates(model, tokenizer, cands, hv, bv, rids, batch_size=1000)
    one = score_candidates(model, tokenizer, cands, hv, bv, rids, batch_size=1)
    for key in ("bypass", "induce", "kl"):
        torch.testing.assert_close(getattr(many, key), getattr(one, key), rtol=1e-3, atol=1e-4, equal_nan=True)
    # layer 0 sees the same post-instruction tokens in every prompt: no difference, no candidate
    assert many.bypass[:, 0].isnan().all() and not many.bypass[:, 1:].isnan().any()
    # spot-check one candidate against a direct computation
    p, layer = 1, 2
    d = cands.direction(cands.positions[p], layer)
    b = tokenize(tokenizer, hv, "cpu")
    with d.ablate(model):
        direct = refusal_score(last_logits(model, b.input_ids, b.attention_mask), torch.tensor(rids)).mean()
    assert abs(float(direct) - float(many.bypass[p, layer])) < 1e-3
    bb = tokenize(tokenizer, bv, "cpu")
    with d.add(model):
        direct = refusal_score(last_logits(model, bb.input_ids, bb.attention_mask), torch.tensor(rids)).mean()
    assert abs(float(direct) - float(many.induce[p, layer])) < 1e-3


def test_layout_splits_off_the_shared_prefix_and_buckets_by_length(tokenizer):
    prompts = format_prompts(tokenizer, HARMFUL + HARMLESS, system="Be brief.")
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    lay = layout(tokenizer, prompts, "cpu", min_prefix=1, max_buckets=3, slack=0.0)
    assert tokenizer.decode(lay.prefix.tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert 1 <= len(lay.buckets) <= 3 and lay.n == len(prompts)
    assert lay.real_tokens == sum(len(x) for x in ids)
    seen = []
    for b in lay.buckets:
        for row, last, i in zip(b.input_ids.tolist(), b.last.tolist(), b.rows.tolist()):
            assert lay.prefix.tolist() + row[:last + 1] == ids[i]  # prefix + unpadded bucket row is the prompt
            assert all(t == tokenizer.pad_token_id for t in row[last + 1:])
            seen.append(i)
    assert sorted(seen) == list(range(len(prompts)))
    padded = sum(b.input_ids.numel() for b in lay.buckets)
    one = layout(tokenizer, prompts, "cpu", share_prefix=False, max_buckets=1)
    assert one.prefix is None and len(one.buckets) == 1
    assert padded < one.buckets[0].input_ids.numel()
    assert layout(tokenizer, prompts, "cpu", min_prefix=lay.prefix_len + 1).prefix is None  # too short to split


def test_layout_logits_equal_one_padded_batch(model, tokenizer):
    prompts = format_prompts(tokenizer, HARMFUL + HARMLESS, system="Be brief.")
    b = tokenize(tokenizer, prompts, "cpu")
    plain = last_logits(model, b.input_ids, b.attention_mask)
    got = layout_logits(model, layout(tokenizer, prompts, "cpu", min_prefix=1))
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
    rids = refusal_token_ids(tokenizer)
    scores = refusal_scores(model, tokenizer, prompts, rids, batch_size=4)  # uneven chunks, each in buckets
    torch.testing.assert_close(scores, refusal_score(plain, torch.tensor(rids)), rtol=1e-3, atol=1e-4)


def _scoring_inputs(model, tokenizer):
    """Candidates, harmful and harmless prompts with a system prompt (a shared prefix), refusal token ids."""
    system = "Be brief."
    return (_tiny_candidates(model, tokenizer), format_prompts(tokenizer, HARMFUL, system=system),
            format_prompts(tokenizer, HARMLESS, system=system), refusal_token_ids(tokenizer))


def _assert_same_scores(a, b):
    for key in ("bypass", "induce", "kl"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-3, atol=1e-4, equal_nan=True)


def test_shared_prefix_and_buckets_give_the_same_scores(model, tokenizer):
    cands, hv, bv, rids = _scoring_inputs(model, tokenizer)
    fast = score_candidates(model, tokenizer, cands, hv, bv, rids, batch_size=16, min_prefix=1)
    plain = score_candidates(model, tokenizer, cands, hv, bv, rids, batch_size=16, share_prefix=False,
                             max_buckets=1)
    assert not fast.induce[:, 1:].isnan().any()
    _assert_same_scores(fast, plain)


def test_scoring_survives_out_of_memory_without_counting_twice(model, tokenizer):
    cands, hv, bv, rids = _scoring_inputs(model, tokenizer)
    want = score_candidates(model, tokenizer, cands, hv, bv, rids, batch_size=64, min_prefix=1)
    seen = {"big": 0, "raised": False}

    def fail_once(_m, args, kwargs):  # the third wide forward (a later bucket of a chunk) runs out of memory, once
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[0] > 16:
            seen["big"] += 1
            if seen["big"] == 3:
                seen["raised"] = True
                raise RuntimeError("CUDA out of memory (simulated)")

    h = find_parts(model).layers[0].register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        got = score_candidates(model, tokenizer, cands, hv, bv, rids, batch_size=64, min_prefix=1)
    finally:
        h.remove()
    assert seen["raised"]
    _assert_same_scores(got, want)


def test_pruned_scoring_keeps_the_same_choice(tokenizer):
    model = __import__("conftest").build_model("llama", len(tokenizer))
    cands = _tiny_candidates(model, tokenizer)
    hv, bv = format_prompts(tokenizer, HARMFUL[:3]), format_prompts(tokenizer, HARMLESS[:2])
    rids = refusal_token_ids(tokenizer)
    full = score_candidates(model, tokenizer, cands, hv, bv, rids)
    thr = float(full.induce.nanmedian())
    pruned = score_candidates(model, tokenizer, cands, hv, bv, rids, prune_induce_below=thr)
    assert pruned.bypass.isnan().any()
    kw = dict(n_layers=cands.n_layers, kl_threshold=1e9, induce_threshold=thr, max_layer_fraction=1.0)
    assert choose(full, **kw) == choose(pruned, **kw)


def test_choose_applies_filters():
    nan = float("nan")
    s = Scores([-2, -1], bypass=torch.tensor([[-5.0, -9.0, -8.0, nan], [-1.0, -7.0, -6.0, -20.0]]),
               induce=torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]),
               kl=torch.tensor([[0.01, 0.01, 0.5, 0.01], [0.01, 0.05, 0.01, 0.01]]), baseline_harmful=1.0,
               baseline_harmless=-3.0)
    sel = choose(s, n_layers=4)
    # (-2,1) fails induce, (-2,2) fails KL, layer 3 is in the last 20 %: best remaining is (-1, 1)
    assert (sel.pos, sel.layer) == (-1, 1)
    assert Scores.from_json(s.to_json()).bypass[1, 3] == -20.0


def test_direction_and_candidates_roundtrip(tmp_path):
    c = Candidates(torch.randn(3, 4, 8), torch.randn(3, 4, 8), [-3, -2, -1], "m", 5, 6)
    c.save(tmp_path / "c.safetensors")
    c2 = Candidates.load(tmp_path / "c.safetensors")
    torch.testing.assert_close(c2.diffs, c.diffs)
    d = c.direction(-2, 3)
    d.scores = {"bypass": -1.0}
    d.save(tmp_path / "d.safetensors")
    d2 = Direction.load(tmp_path / "d.safetensors")
    assert (d2.pos, d2.layer, d2.scores) == (-2, 3, {"bypass": -1.0})
    torch.testing.assert_close(d2.vector, c.diffs[1, 3])


def test_static_decoder_gives_the_same_tokens_as_generate(model, tokenizer):
    from refusal.generation.batched import generate

    prompts = format_prompts(tokenizer, HARMFUL[:3] + HARMLESS[:2])
    rids = refusal_token_ids(tokenizer)
    hf_texts, hf_scores = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3, refusal_ids=rids)
    texts, scores = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3, refusal_ids=rids,
                             static_cache=True)
    assert texts == hf_texts and any(hf_texts)
    torch.testing.assert_close(scores, hf_scores, rtol=1e-4, atol=1e-4)
    d = torch.randn(find_parts(model).hidden_size)
    with orthogonalized(model, d):
        assert generate(model, tokenizer, prompts, max_new_tokens=8, static_cache=True) == generate(
            model, tokenizer, prompts, max_new_tokens=8)


def test_compiled_static_decoder_sees_interventions_entered_after_compiling(tokenizer):
    from refusal.generation.static import StaticDecoder

    model = __import__("conftest").build_model("llama", len(tokenizer))
    b = tokenize(tokenizer, format_prompts(tokenizer, HARMFUL[:2]), "cpu")
    eos, pad = torch.tensor([tokenizer.eos_token_id]), tokenizer.pad_token_id
    vec = 8 * torch.randn(find_parts(model).hidden_size)

    def tokens(dec):
        return dec(b.input_ids, b.attention_mask, 6, eos, pad)[0]

    eager = StaticDecoder(model, compile=False)
    with add(model, vec, layer=1):
        want = tokens(eager)
    assert not torch.equal(want, tokens(eager))  # the intervention changes the tokens
    torch._dynamo.reset()
    compiled = StaticDecoder(model, compile=True, backend="eager")  # dynamo's guards without inductor's compile
    tokens(compiled)  # compiled with no hooks
    with add(model, vec, layer=1):
        assert torch.equal(tokens(compiled), want)


def test_gqa_attention_equals_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from refusal.generation.attention import gqa_attention

    class Attn:
        is_causal, training, num_key_value_groups = True, False, 3

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.ones(2, 1, 5, 9, dtype=torch.bool).tril(4)
    mask[0, ..., :2] = False  # left padding of the first row
    a = Attn()
    torch.testing.assert_close(gqa_attention(a, q, k, v, mask)[0], sdpa_attention_forward(a, q, k, v, mask)[0])
    q = torch.randn(2, 6, 9, 16)  # no mask: causal, queries from position 0
    torch.testing.assert_close(gqa_attention(a, q, k, v, None)[0], sdpa_attention_forward(a, q, k, v, None)[0])


def test_fused_norms_replace_only_plain_rms_norms(model, tokenizer, arch):
    b = tokenize(tokenizer, format_prompts(tokenizer, HARMFUL), "cpu")
    want = last_logits(model, b.input_ids, b.attention_mask)
    n_layers = find_parts(model).n_layers
    with fused_norms(model) as n:
        got = last_logits(model, b.input_ids, b.attention_mask)
        # Gemma scales by (1 + weight): the check must leave its norms alone
        assert n == (0 if arch == "gemma" else 2 * n_layers + 1)
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_norms_reject_lookalikes():
    lookalike = torch.nn.LayerNorm(16, bias=False)  # 1-D weight, no bias, an eps: but it centres
    with torch.no_grad():
        lookalike.weight.uniform_(0.5, 1.5)
    with fused_norms(torch.nn.Sequential(lookalike)) as n:
        assert n == 0
    rms = torch.nn.Sequential(torch.nn.RMSNorm(16, eps=1e-6))
    with fused_norms(rms) as n:
        assert n == 1


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_shared_prefix_with_sliding_window_attention(tokenizer, family):
    """A window shorter than the shared prefix: the read-only prefix cache must give what one padded batch gives."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=6,
                  pad_token_id=tokenizer.pad_token_id)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, attn_implementation="eager"))
    model.eval()
    prompts = format_prompts(tokenizer, HARMFUL + HARMLESS, system="Be brief, and answer in plain words.")
    lay = layout(tokenizer, prompts, "cpu", min_prefix=1)
    assert lay.prefix_len > 6  # longer than the window
    b = tokenize(tokenizer, prompts, "cpu")
    torch.testing.assert_close(layout_logits(model, lay), last_logits(model, b.input_ids, b.attention_mask),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mean_activations_share_the_prefix_and_equal_one_prompt_at_a_time(arch, tokenizer, monkeypatch):
    """Extraction runs the template's shared opening once (cached) and the rest in length buckets; the means equal
    a plain forward of each prompt alone, reading the inputs of every layer at the last positions."""
    from conftest import build_model

    import refusal.layout as lay_mod
    from refusal.directions.diff_means import mean_activations

    model = build_model(arch, len(tokenizer))
    prompts = format_prompts(tokenizer, [r["instruction"] for r in builtin("harmful")[:7]],
                             system="You are a careful assistant.")
    n_pos = len(post_instruction_ids(tokenizer))
    calls = []
    real = lay_mod.prefix_cache
    monkeypatch.setattr(lay_mod, "prefix_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = mean_activations(model, tokenizer, prompts, n_pos, batch_size=4)
    assert len(calls) == 2  # one shared prefix per chunk of 4 prompts
    parts = find_parts(model)
    want = torch.zeros_like(got)
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        seen: list[torch.Tensor] = []

        def grab(_m, a, k, seen=seen):
            seen.append((a[0] if a else k["hidden_states"])[0])

        hs = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in parts.layers]
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for h in hs:
                h.remove()
        want += torch.stack([x[-n_pos:] for x in seen], 1)
    torch.testing.assert_close(got, want / len(prompts), rtol=1e-4, atol=1e-5)


def test_static_decoder_graph_path_gives_the_same_tokens(model, tokenizer, monkeypatch):
    """The graph path's bookkeeping (a warm-up step, then one captured step replayed, early stop), with a replay that
    runs the captured step eagerly: a CPU has no CUDA graphs. The graph is kept while weights and hooks stay, and
    captured anew when an intervention enters. (Graphs of several steps and reads of the written part of the cache
    only: benchmarks/speed/decoder_variants.py, tests/test_decoder_variants.py.)"""
    from refusal.generation.batched import generate
    from refusal.generation.static import StaticDecoder

    captured = []
    replays = []

    def capture(self, s):
        captured.append(1)
        return type("Replay", (), {"replay": lambda _: replays.append(1) or self.step(s, s.eos_ids, s.pad)})()

    monkeypatch.setattr(StaticDecoder, "_capture", capture)
    prompts = format_prompts(tokenizer, HARMFUL[:3] + HARMLESS[:2])
    dec = StaticDecoder(model, compile=False, graphs=True)
    want = generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5)
    assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                    decoder=dec) == want
    assert len(captured) == 1 and len(replays) >= 1  # captured once, then replayed
    assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                    decoder=dec) == want
    assert len(captured) == 1  # same weights and hooks: the graph is replayed again
    d = torch.randn(find_parts(model).hidden_size)
    with ablate(model, d):
        want = generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5)
        assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                        decoder=dec) == want
    assert len(captured) == 2  # the ablation's hooks: captured anew
    fused = StaticDecoder(model, compile=False, graphs=True, fuse=True)
    assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                    decoder=fused) == generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5)
    with add(model, 4 * d, layer=1):  # an intervention's hooks on fused projections' blocks
        assert generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5, static_cache=True,
                        decoder=fused) == generate(model, tokenizer, prompts, max_new_tokens=19, batch_size=5)


def test_static_decoder_sets_up_by_kind_and_says_what_decodes(model, tokenizer, arch):
    """The eager step runs each RMS norm as one kernel while the decoder is set up (a compiled step fuses its own);
    ``report`` says which decoder produced the tokens. (The kind was once told apart by comparing bound methods with
    ``is``, which is never true, so the eager step never got its fused norms.)"""
    from refusal.generation.batched import generate
    from refusal.generation.static import StaticDecoder
    from refusal.models.norms import fused_norms

    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    with fused_norms(model) as n:  # what it swaps by itself (not Gemma's (1 + weight) norms)
        pass
    assert n == (0 if arch == "gemma" else len(norms)) and norms
    with StaticDecoder(model, compile=False) as dec:
        assert sum("forward" in vars(m) for m in norms) == n and dec.describe() == "static cache, eager step"
    assert not any("forward" in vars(m) for m in norms)  # restored
    compiled = StaticDecoder(model, compile=True, backend="eager")
    with compiled:
        assert not any("forward" in vars(m) for m in norms)
    assert compiled.describe().startswith("static cache, compiled step")
    torch._dynamo.reset()
    prompts = format_prompts(tokenizer, HARMFUL[:2])
    report: dict = {}
    generate(model, tokenizer, prompts, max_new_tokens=3, static_cache="graphs", report=report)
    grouped = "grouped (same math as the model's SDPA/eager attention)"
    assert report == {"decoder": "static cache, eager step", "attention": grouped}  # CPU: no graphs, no fusing
    generate(model, tokenizer, prompts, max_new_tokens=3, report=report)
    assert report == {"decoder": "model.generate", "attention": grouped}


def test_static_decoding_falls_back_loudly_when_a_model_cannot_use_it(model, tokenizer, monkeypatch, capsys):
    """A step that cannot be captured (a forward that waits on the host) decodes uncaptured; a decoder that fails
    outright hands the batch to model.generate when the caller allows it (a run's stages), and raises otherwise or
    when it ran out of memory (the batch is halved instead). Every fallback is printed, and the tokens are the same."""
    from refusal.generation.batched import generate
    from refusal.generation.static import StaticDecoder

    def cannot_capture(self, s, *args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticDecoder, "_capture", cannot_capture)
    prompts = format_prompts(tokenizer, HARMFUL[:3] + HARMLESS[:2])
    want = generate(model, tokenizer, prompts, max_new_tokens=9, batch_size=5)
    dec = StaticDecoder(model, compile=False, graphs=True)
    assert generate(model, tokenizer, prompts, max_new_tokens=9, batch_size=5, decoder=dec) == want
    def printed() -> str:  # the console writes to stderr, wrapped to its width
        return " ".join(capsys.readouterr().err.split())

    assert not dec.graphs and "cannot be captured into a CUDA graph" in printed()

    def broken(self, *a, **k):
        raise TypeError("this architecture's forward takes no static cache")

    monkeypatch.setattr(StaticDecoder, "__call__", broken)
    with pytest.raises(TypeError, match="no static cache"):
        generate(model, tokenizer, prompts, max_new_tokens=9, batch_size=5, static_cache="graphs")
    report: dict = {}
    assert generate(model, tokenizer, prompts, max_new_tokens=9, batch_size=5, static_cache="graphs",
                    fallback=True, report=report) == want
    assert "decoding with model.generate instead" in printed()
    assert report["decoder"] == "model.generate" and "no static cache" in report["fallback"]

    calls = []

    def oom(self, input_ids, *a, **k):
        calls.append(len(input_ids))
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StaticDecoder, "__call__", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(model, tokenizer, prompts, max_new_tokens=9, batch_size=4, static_cache="graphs", fallback=True)
    assert calls == [4, 2, 1]  # halved down to one row, never handed to model.generate


def _sliding_window_model(kind: str, vocab: int, window: int):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0, pad_token_id=3, bos_token_id=1,
                  sliding_window=window)
    if kind == "mistral":
        m, std = MistralForCausalLM(MistralConfig(**common)), 0.2
    elif kind == "gemma2":  # every other layer slides
        m, std = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16)), 0.05
    else:  # five of six layers slide
        m, std = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16)), 0.05
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, std)  # larger weights make Gemma repeat one token
    return m.eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3"])
def test_static_decoding_refuses_a_sliding_window_it_would_overrun(kind, tokenizer):
    """One static cache under one full causal mask is what a sliding-window model computes only while the window
    holds the whole sequence: shorter windows are refused (and a run falls back to model.generate, whose tokens match
    plain HF generation one prompt at a time); longer ones decode statically, with the same tokens."""
    from refusal.errors import RefusalError
    from refusal.generation.batched import generate, greedy_config
    from refusal.generation.static import unsupported_attention

    prompts = format_prompts(tokenizer, ["Tell me a story about a dog", "hi"])
    short = _sliding_window_model(kind, len(tokenizer), window=8)
    want = generate(short, tokenizer, prompts, max_new_tokens=16, batch_size=2)
    ref = []
    for p in prompts:
        b = tokenize(tokenizer, [p], "cpu")
        seq = short.generate(input_ids=b.input_ids, attention_mask=b.attention_mask,
                             generation_config=greedy_config(short, tokenizer, 16))
        ref.append(tokenizer.decode(seq[0, b.input_ids.shape[1]:], skip_special_tokens=True).strip())
    assert want == ref and all(want)
    with pytest.raises(RefusalError, match="sliding-window attention over 8 positions"):
        generate(short, tokenizer, prompts, max_new_tokens=16, batch_size=2, static_cache="graphs")
    assert generate(short, tokenizer, prompts, max_new_tokens=16, batch_size=2, static_cache="graphs",
                    fallback=True) == want
    wide = _sliding_window_model(kind, len(tokenizer), window=200)
    assert unsupported_attention(wide, 60) is None
    assert generate(wide, tokenizer, prompts, max_new_tokens=16, batch_size=2, static_cache="graphs") == generate(
        wide, tokenizer, prompts, max_new_tokens=16, batch_size=2)


@pytest.mark.parametrize("family", ["Qwen3", "Phi3", "Mixtral", "Olmo2", "Cohere2", "Granite"])
def test_static_decoding_gives_model_generate_tokens_across_families(family, tokenizer):
    """The paper preset's decoder on more model families than the fixtures' three (a mixture of experts, QK norms,
    partial rotary, sliding layers, scaled residuals): the same tokens as the eager path."""
    import transformers

    from refusal.generation.batched import generate

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0, pad_token_id=3, bos_token_id=1)
    cfg.head_dim = 16
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    prompts = format_prompts(tokenizer, HARMFUL[:2] + HARMLESS[:1])
    want = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    assert all(want) and generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3,
                                  static_cache="graphs") == want


def test_static_decoding_refuses_layer_kinds_it_does_not_know():
    from types import SimpleNamespace

    from refusal.generation.static import unsupported_attention

    chunked = SimpleNamespace(config=SimpleNamespace(layer_types=["chunked_attention", "full_attention"]))
    assert "chunked_attention" in unsupported_attention(chunked, 10)
    plain = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention"], sliding_window=4))
    assert unsupported_attention(plain, 10) is None  # a window no layer uses (Qwen2 with use_sliding_window off)


def test_fused_projections_same_logits_and_weights_restored(model, tokenizer):
    from refusal.models.fused import fused_projections

    prompts = format_prompts(tokenizer, HARMFUL[:2])
    b = tokenize(tokenizer, prompts, "cpu")

    def logits():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits

    want = logits()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with fused_projections(model) as n:
        assert n == 2 * find_parts(model).n_layers  # q/k/v and gate/up of every layer
        attn = find_parts(model).attn[0]
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
        torch.testing.assert_close(logits(), want, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(logits, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(), want, rtol=1e-5, atol=1e-5)  # traceable in one graph
    torch._dynamo.reset()
    for name, p in model.named_parameters():
        assert p.data._base is None and torch.equal(p, before[name]), name  # its own tensor again, same values
    assert "forward" not in vars(find_parts(model).attn[0].q_proj)


def test_static_decoder_captures_graphs_only_for_a_model_on_one_cuda_device(model):
    from refusal.generation.static import StaticDecoder, one_device

    assert not one_device(model)  # a CPU model
    assert not StaticDecoder(model, compile=False).graphs
    assert StaticDecoder(model, compile=False, graphs=True).graphs  # asked for explicitly


def test_static_cache_graphs_decodes_the_eager_step_and_bad_values_are_refused(model, tokenizer):
    from refusal.config import resolve
    from refusal.errors import RefusalError
    from refusal.generation.batched import generate

    prompts = format_prompts(tokenizer, HARMFUL[:3] + HARMLESS[:2])
    want = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=5)
    assert generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=5, static_cache="graphs") == want
    with pytest.raises(ValueError, match="static_cache must be one of"):
        generate(model, tokenizer, prompts, max_new_tokens=2, static_cache="fast")
    with pytest.raises(RefusalError, match="generate.static_cache must be false, true or graphs"):
        resolve(overrides={"generate": {"static_cache": "fast"}})
