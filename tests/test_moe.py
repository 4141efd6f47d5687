"""Weight orthogonalization of mixture-of-experts models: every expert (fused 3-D weights as in transformers 5, or a
ModuleList of expert MLPs as in transformers 4 / remote code) and every shared expert is edited."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refusal.errors import RefusalError
from refusal.interventions.hooks import ablate
from refusal.interventions.weights import orthogonalize_, orthogonalized
from refusal.models.writers import _fused_axis, residual_writers

VOCAB, HIDDEN, N_LAYERS, N_EXPERTS = 96, 64, 2, 4


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.2)
    model.eval()
    model.requires_grad_(False)
    return model


def _mixtral(top_k: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=N_LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=N_EXPERTS,
                        num_experts_per_tok=top_k, max_position_embeddings=128, tie_word_embeddings=False)
    return _randomize(MixtralForCausalLM(cfg))


def _qwen2_moe(top_k: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=48,
                         shared_expert_intermediate_size=80, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=N_EXPERTS, num_experts_per_tok=top_k,
                         decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=128,
                         tie_word_embeddings=True)
    return _randomize(Qwen2MoeForCausalLM(cfg))


class _ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=True)  # a bias too, so bias projection is covered

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class _ListMoE(nn.Module):
    """A transformers-4-style sparse MoE block: a router and a ModuleList of expert MLPs (Mixtral naming)."""

    def __init__(self, hidden: int, inter: int, n_experts: int, top_k: int):
        super().__init__()
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList([_ExpertMLP(hidden, inter) for _ in range(n_experts)])
        self.top_k = top_k

    def forward(self, x):
        probs = self.gate(x).softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = (idx == e)
            weight = (w * mask).sum(-1, keepdim=True)
            out = out + weight * expert(x)
        return out


def _list_moe(top_k: int):
    from conftest import build_model

    model = build_model("llama", VOCAB, n_layers=N_LAYERS)
    for layer in model.model.layers:
        layer.mlp = _ListMoE(HIDDEN, 48, N_EXPERTS, top_k)
    model.__dict__.pop("_refusal_parts", None)
    return _randomize(model)


BUILDERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "list_moe": _list_moe}


@pytest.fixture(params=sorted(BUILDERS))
def moe_kind(request):
    return request.param


def _expert_slices(model):
    """(name, (hidden, in) matrix) for every expert / shared expert of every layer."""
    out = []
    for w in residual_writers(model):
        if w.kind not in ("expert", "shared_expert"):
            continue
        weight = w.weight.detach()
        if w.fused:
            for e in range(weight.shape[0]):
                out.append((f"{w.name}[{e}]", weight[e].movedim(w.axis - 1, 0)))
        else:
            out.append((w.name, weight.movedim(w.axis, 0)))
    return out


def test_writers_cover_every_expert(moe_kind):
    model = BUILDERS[moe_kind](2)
    writers = residual_writers(model)
    kinds = [w.kind for w in writers]
    assert kinds[0] == "embedding" and kinds.count("attention") == N_LAYERS
    assert "mlp" not in kinds  # routers and gates are not writers
    expert_mats = sum(w.n_experts for w in writers if w.kind == "expert")
    assert expert_mats == N_LAYERS * N_EXPERTS
    assert kinds.count("shared_expert") == (N_LAYERS if moe_kind == "qwen2_moe" else 0)
    for w in writers:
        if w.fused:  # transformers 5: (n_experts, hidden, inter), residual axis 1
            assert w.weight.shape[w.axis] == HIDDEN and w.axis == 1
    if moe_kind == "list_moe":
        assert all(w.bias is not None for w in writers if w.kind == "expert")


@pytest.mark.parametrize("top_k", [2, N_EXPERTS])
def test_orthogonalized_moe_equals_hook_ablation(moe_kind, top_k):
    model = BUILDERS[moe_kind](top_k)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    d = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    base = model(ids).logits
    with ablate(model, d):
        want = model(ids).logits
    with orthogonalized(model, d):
        got = model(ids).logits
    assert (want - base).abs().max() > 1e-2  # the ablation does something
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(model(ids).logits, base)  # restored


def test_every_expert_is_orthogonal_to_the_direction(moe_kind):
    model = BUILDERS[moe_kind](2)
    d = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(2))
    u = d / d.norm()
    before = {n: (u @ m).abs().max().item() for n, m in _expert_slices(model)}
    assert min(before.values()) > 1e-2
    orthogonalize_(model, d)
    after = {n: (u @ m).abs().max().item() for n, m in _expert_slices(model)}
    assert len(after) == N_LAYERS * (N_EXPERTS + (moe_kind == "qwen2_moe"))
    assert max(after.values()) < 1e-5, after


def test_skipping_one_expert_changes_the_logits(moe_kind):
    """With every expert active, restoring a single expert's original weights breaks equality with hook ablation:
    the logits test above would catch an expert that the edit missed."""
    model = BUILDERS[moe_kind](N_EXPERTS)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    d = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    writers = [w for w in residual_writers(model) if w.kind == "expert" and w.layer == 1]
    w = writers[-1]
    original = w.weight.detach().clone()
    with ablate(model, d):
        want = model(ids).logits
    with orthogonalized(model, d):
        with torch.no_grad():
            if w.fused:
                w.weight.data[N_EXPERTS - 1] = original[N_EXPERTS - 1]  # "skip" the last expert
            else:
                w.weight.data.copy_(original)
        got = model(ids).logits
    assert (got - want).abs().max() > 1e-3


def test_norm_preserving_keeps_expert_row_norms():
    model = _qwen2_moe(2)
    d = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
    before = {n: m.norm(dim=1) for n, m in _expert_slices(model)}
    orthogonalize_(model, d, norm_preserving=True)
    for n, m in _expert_slices(model):
        torch.testing.assert_close(m.norm(dim=1), before[n], atol=1e-5, rtol=1e-5)


def test_fused_axis_detection():
    class Experts(nn.Module):
        def __init__(self, shape, transposed=None):
            super().__init__()
            self.down_proj = nn.Parameter(torch.zeros(shape))
            if transposed is not None:
                self.is_transposed = transposed

    assert _fused_axis(Experts((4, 64, 32)), Experts((4, 64, 32)).down_proj, 64, "x") == 1
    assert _fused_axis(Experts((4, 32, 64)), Experts((4, 32, 64)).down_proj, 64, "x") == 2  # gpt-oss / Llama 4
    m = Experts((4, 64, 64), transposed=True)
    assert _fused_axis(m, m.down_proj, 64, "x") == 2
    m = Experts((4, 64, 64))
    assert _fused_axis(m, m.down_proj, 64, "x") == 1
    with pytest.raises(RefusalError):
        m = Experts((4, 32, 48))
        _fused_axis(m, m.down_proj, 64, "x")
