"""Tiny random models of every decoder family the architecture matrix covers, built in memory from transformers'
own config classes with each family's distinctive features switched on.

``build(family, vocab)`` returns a float32 model in eval mode with frozen parameters; ``FAMILIES`` lists the
families the installed transformers has (a family whose config class is missing is left out, not faked). Windows
are shorter than the test prompts, so a sliding window really slides; softcaps are small enough to bite on random
weights; routed and shared experts, MLA, partial rotary, parallel blocks, post-norms and multipliers are on where
the family has them; heads are tied in some families and untied in others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

WINDOW = 6  # sliding windows: shorter than every test prompt (a ChatML prompt is > 10 tokens)
EOS, PAD, BOS = 2, 3, 1  # the ChatML test tokenizer: <|im_end|>, <|endoftext|>, <|im_start|>


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny model, and what it shows."""

    name: str
    config: str  # transformers config class
    model: str  # transformers model class
    features: str  # what is switched on, in words (for docs/models.md)
    kwargs: Callable[[int], dict]
    std: float = 0.2  # std of the random 2-D weights: larger ones make some families repeat one token
    qk_std: float | None = None  # std of the query and key projections (larger: attention logits a softcap bites)
    multimodal: bool = False


def _common(vocab: int, **extra) -> dict:
    out = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS, pad_token_id=PAD,
               bos_token_id=BOS)
    out.update(extra)
    return out


def _alternating(n: int, first: str = "sliding_attention") -> list[str]:
    other = "full_attention" if first == "sliding_attention" else "sliding_attention"
    return [first if i % 2 == 0 else other for i in range(n)]


def _gemma3_text(vocab: int, **extra) -> dict:
    return _common(vocab, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                   layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
                   final_logit_softcapping=5.0, **extra)


def _gemma3_vl(vocab: int) -> dict:
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    return dict(text_config=Gemma3TextConfig(**_gemma3_text(vocab)),
                vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14),
                mm_tokens_per_image=4, tie_word_embeddings=True)


def _mistral3(vocab: int) -> dict:
    from transformers import MistralConfig, PixtralVisionConfig

    return dict(text_config=MistralConfig(**_common(vocab, head_dim=16, sliding_window=WINDOW,
                                                    tie_word_embeddings=False)),
                vision_config=PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=28, patch_size=14, head_dim=16),
                spatial_merge_size=1, vision_feature_layer=-1)


def _qwen25_vl(vocab: int) -> dict:
    text = _common(vocab, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "mrope_section": [2, 3, 3]}, tie_word_embeddings=True)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    return dict(text_config=text, vision_config=vision)


_SPECS = [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", "untied head, grouped K/V heads",
           lambda v: _common(v, tie_word_embeddings=False)),
    Family("mistral", "MistralConfig", "MistralForCausalLM", f"sliding window {WINDOW} on every layer, untied head",
           lambda v: _common(v, head_dim=16, sliding_window=WINDOW, tie_word_embeddings=False)),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM", f"4 routed experts (top 2), sliding window {WINDOW}",
           lambda v: _common(v, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                             tie_word_embeddings=False)),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "Q/K/V biases, tied head",
           lambda v: _common(v, tie_word_embeddings=True)),
    Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
           "4 routed experts (top 2) + a gated shared expert, one dense layer, Q/K/V biases",
           lambda v: _common(v, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[1],
                             tie_word_embeddings=False)),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "Q/K norms, tied head",
           lambda v: _common(v, head_dim=16, tie_word_embeddings=True)),
    Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Q/K norms, 4 routed experts (top 2), one dense layer",
           lambda v: _common(v, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True,
                             tie_word_embeddings=False)),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", "(1 + w) RMS norms, scaled embedding, GeLU, tied head",
           lambda v: _common(v, head_dim=16), std=0.4),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
           f"attention-logit softcap 2, final softcap 5, sliding window {WINDOW} on every other layer, post-norms",
           lambda v: _common(v, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                             final_logit_softcapping=5.0, query_pre_attn_scalar=16,
                             layer_types=_alternating(4)), std=0.05, qk_std=0.4),
    Family("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM",
           f"sliding window {WINDOW} on 3 of 4 layers (local RoPE base), Q/K norms, post-norms, final softcap 5",
           _gemma3_text, std=0.02),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM",
           f"fused QKV and gate/up projections, partial rotary (1/2), sliding window {WINDOW}",
           lambda v: _common(v, sliding_window=WINDOW, partial_rotary_factor=0.5, tie_word_embeddings=False),
           std=0.4),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", "post-norms only (no pre-norms), Q/K norms over all heads",
           lambda v: _common(v, tie_word_embeddings=False)),
    Family("granite", "GraniteConfig", "GraniteForCausalLM",
           "embedding, residual, attention and logit multipliers, tied head",
           lambda v: _common(v, embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.1,
                             logits_scaling=2.0, tie_word_embeddings=True), std=0.4),
    Family("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM",
           "multipliers, 4 routed experts (top 2) as parallel-expert matrices",
           lambda v: _common(v, embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.1,
                             logits_scaling=2.0, num_local_experts=4, num_experts_per_tok=2,
                             tie_word_embeddings=False)),
    Family("cohere", "CohereConfig", "CohereForCausalLM",
           "parallel attention and MLP off one LayerNorm, Q/K norms, logit scale, tied head",
           lambda v: _common(v, use_qk_norm=True, logit_scale=0.5, tie_word_embeddings=True)),
    Family("glm4", "Glm4Config", "Glm4ForCausalLM",
           "partial rotary (interleaved), post-attention and post-MLP norms, fused gate/up, Q/K/V biases",
           lambda v: _common(v, head_dim=16, attention_bias=True, tie_word_embeddings=False)),
    Family("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", "no RoPE on every other layer (NoPE), tied head",
           lambda v: _common(v, no_rope_layer_interval=2, tie_word_embeddings=True)),
    Family("gpt_oss", "GptOssConfig", "GptOssForCausalLM",
           f"attention sinks, sliding window {WINDOW} on every other layer, 4 routed experts (top 2) with biases, "
           "clamped SwiGLU",
           lambda v: _common(v, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                             layer_types=_alternating(4), attention_bias=True, tie_word_embeddings=False,
                             max_position_embeddings=131072),
           std=0.1),
    Family("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
           "multi-head latent attention (Q and KV low rank, split RoPE/NoPE heads), 4 routed experts (top 2, grouped) "
           "+ 1 shared expert, first layer dense",
           lambda v: _common(v, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                             qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
                             num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=2,
                             topk_group=1, tie_word_embeddings=False), std=0.1),
    Family("falcon_h1", "FalconH1Config", "FalconH1ForCausalLM",
           "hybrid: a Mamba-2 mixer beside attention in every layer (torch path, no kernels), multipliers",
           lambda v: _common(v, num_hidden_layers=2, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                             mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16, tie_word_embeddings=False),
           std=0.1),
    Family("gemma3", "Gemma3Config", "Gemma3ForConditionalGeneration",
           "multimodal wrapper (SigLIP vision tower) around the gemma3_text model above, run text-only",
           _gemma3_vl, std=0.02, multimodal=True),
    Family("mistral3", "Mistral3Config", "Mistral3ForConditionalGeneration",
           "multimodal wrapper (Pixtral vision tower) around a mistral model with a sliding window, run text-only",
           _mistral3, multimodal=True),
    Family("qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
           "multimodal wrapper (windowed ViT) around a qwen2 model with multimodal RoPE, run text-only",
           _qwen25_vl, multimodal=True),
]

FAMILIES: dict[str, Family] = {f.name: f for f in _SPECS
                               if hasattr(transformers, f.config) and hasattr(transformers, f.model)}
MISSING = [f.name for f in _SPECS if f.name not in FAMILIES]


def build(name: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A tiny random float32 model of family ``name`` (eval mode, no gradients), seeded."""
    fam = FAMILIES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, fam.config)(**fam.kwargs(vocab))
    model = getattr(transformers, fam.model)(cfg).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:
                qk = fam.qk_std is not None and pname.rsplit(".", 2)[-2] in ("q_proj", "k_proj")
                p.copy_(torch.randn(p.shape, generator=g) * (fam.qk_std if qk else fam.std))
            elif pname.endswith("sinks"):  # attention sinks: large enough to take real probability mass
                p.copy_(torch.randn(p.shape, generator=g))
            elif pname.endswith("bias") and "dt_bias" not in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    model.requires_grad_(False)
    return model
