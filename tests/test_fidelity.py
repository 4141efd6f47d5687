"""The fidelity rule of generation's fast paths: the grouped attention runs only where it computes what the model's
own attention computes (gpt-oss's sinks, Gemma-2's logit softcapping and anything unknown keep the model's own code),
and the run's record says which path ran and why."""

from __future__ import annotations

import pytest
import torch

from refusal import format_prompts, generate
from refusal.generation.attention import grouped_attention, grouped_attention_misfit
from refusal.generation.batched import greedy_config

PROMPTS = ["Write a poem about the sea", "How do I bake bread at home quickly and well?", "Name three colours"]


def _tiny(cls_name: str, vocab: int, **extra):
    import transformers

    torch.manual_seed(0)
    cfg_cls = getattr(transformers, cls_name + "Config")
    model_cls = getattr(transformers, cls_name + "ForCausalLM")
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_id=2, pad_token_id=3,
                  bos_token_id=1)
    model = model_cls(cfg_cls(**{**common, **extra}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
            elif "sinks" in name:  # large sinks, so that dropping them changes the tokens
                p.normal_(0, 3.0)
    return model.eval().requires_grad_(False)


def gpt_oss(vocab: int):
    # 4 layers alternating sliding (window 8, shorter than the prompts) and full attention, sinks, 4 experts
    return _tiny("GptOss", vocab, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention"] * 2)


def gemma2(vocab: int):
    # logit softcapping low enough to bite on random weights, window shorter than the prompts
    return _tiny("Gemma2", vocab, attn_logit_softcapping=2.0, final_logit_softcapping=5.0, sliding_window=8,
                 query_pre_attn_scalar=16)


def _reference(model, tokenizer, prompts, n):
    """One prompt at a time, unpadded, through model.generate with the model's own attention."""
    cfg = greedy_config(model, tokenizer, n)
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)
        seq = model.generate(**ids, generation_config=cfg)
        out.append(tokenizer.decode(seq[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("build, why", [(gpt_oss, "s_aux"), (gemma2, "softcap")])
@pytest.mark.parametrize("split", [True, False])
def test_generation_gives_the_models_own_tokens(tokenizer, build, why, split):
    """Fails where the grouped attention drops what the model's attention passes (sinks, softcapping)."""
    model = build(len(tokenizer))
    prompts = format_prompts(tokenizer, PROMPTS)
    report: dict = {}
    got = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, split_prefill=split, report=report)
    assert got == _reference(model, tokenizer, prompts, 6)
    assert "model's own" in report["attention"] and why in report["attention"]


@pytest.mark.parametrize("build, why", [(gpt_oss, "s_aux"), (gemma2, "softcap")])
def test_misfit_is_found_and_keeps_the_models_attention(tokenizer, build, why):
    model = build(len(tokenizer))
    assert why in grouped_attention_misfit(model)
    before = model.config._attn_implementation
    with grouped_attention(model) as active:
        assert not active and model.config._attn_implementation == before


def test_a_plain_model_takes_the_fast_path(tokenizer):
    from conftest import build_model

    model = build_model("llama", len(tokenizer))
    assert grouped_attention_misfit(model) is None
    report: dict = {}
    prompts = format_prompts(tokenizer, PROMPTS)
    got = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, report=report)
    assert report["attention"] == "grouped (same math as the model's SDPA/eager attention)"
    assert got == _reference(model, tokenizer, prompts, 5)


def test_probe_holds_the_models_hooks_off(tokenizer):
    """A per-row intervention's hook neither runs on the probe's one row nor sees it."""
    from conftest import build_model

    model = build_model("qwen2", len(tokenizer))
    seen = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        assert grouped_attention_misfit(model) is None
    finally:
        handle.remove()
    assert seen == [] and model.model.layers[0]._forward_pre_hooks == {}


def test_an_unknown_argument_at_run_time_is_an_error_not_an_approximation():
    from refusal.generation.attention import gqa_attention

    q = torch.randn(1, 4, 2, 8)
    kv = torch.randn(1, 2, 2, 8)
    with pytest.raises(RuntimeError, match="s_aux"):
        gqa_attention(None, q, kv, kv, None, s_aux=torch.zeros(4))


def test_narrower_values_than_keys():
    """MLA (DeepSeek-V3) attends with 192-wide queries/keys and 128-wide values: the output takes the values' width."""
    from refusal.generation.attention import gqa_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 12), torch.randn(2, 2, 3, 12), torch.randn(2, 2, 3, 8)
    out, _ = gqa_attention(None, q, k, v, None, scaling=0.3)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=0.3).transpose(1, 2)
    assert out.shape == (2, 3, 4, 8)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
