"""Operators x scopes on tiny random models: each operator's math, per-row plans equal one intervention at a time,
token scopes, and generation under a per-row plan equals model.generate under the same hooks."""

from __future__ import annotations

import pytest
import torch

from refusal import find_parts, format_prompts
from refusal.data import builtin
from refusal.directions.base import Direction, DirectionSet, orthonormalize, parse_ranks
from refusal.errors import RefusalError
from refusal.generation.batched import generate, greedy_config
from refusal.interventions import (
    Add,
    Compose,
    Intervention,
    Plan,
    ProjectOut,
    Reflect,
    Scope,
    ablation,
    addition,
    apply,
    reflection,
)
from refusal.interventions.weights import orthogonalized
from refusal.scoring.engine import last_logits
from refusal.templates import tokenize

PROMPTS = [r["instruction"] for r in builtin("harmful")[:3]] + [r["instruction"] for r in builtin("harmless")[:2]]


def _logits(model, tok, prompts):
    b = tokenize(tok, prompts, "cpu")
    return last_logits(model, b.input_ids, b.attention_mask)


def test_operator_math():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    u = torch.randn(8)
    n = u / u.norm()
    (e,) = ProjectOut(u).edits()
    from refusal.interventions.operators import apply_edit

    proj = (x @ n)[..., None] * n
    torch.testing.assert_close(apply_edit(x, *[e.basis, e.coeffs, e.shift]), x - proj)
    (e,) = Reflect(u, alpha=1.0).edits()
    y = apply_edit(x, e.basis, e.coeffs, e.shift)
    torch.testing.assert_close(y @ n, -(x @ n))  # mirrored across the hyperplane
    torch.testing.assert_close(y - (y @ n)[..., None] * n, x - proj)  # the rest unchanged
    (e,) = Add(u, coeff=-2.0).edits()
    torch.testing.assert_close(apply_edit(x, e.basis, e.coeffs, e.shift), x - 2 * u)
    steps = Compose((ProjectOut(u), Add(u, 3.0))).edits()
    assert len(steps) == 1  # projection then addition: one step
    z = apply_edit(x, steps[0].basis, steps[0].coeffs, steps[0].shift)
    torch.testing.assert_close(z, x - proj + 3 * u)
    assert len((Add(u) >> ProjectOut(u)).edits()) == 2  # addition then projection: the order is kept


def test_subspace_basis_and_direction_values(tmp_path):
    torch.manual_seed(0)
    v = torch.randn(3, 16)
    v[2] = v[0] + v[1]  # dependent: the basis has two rows
    q = orthonormalize(v)
    assert q.shape == (2, 16)
    torch.testing.assert_close(q @ q.T, torch.eye(2), atol=1e-5, rtol=0)
    d = Direction(torch.randn(16), layer=2, pos=-1, model="sha256:x", scores={"bypass": -1.0}, data_digest="abc")
    e = Direction(torch.randn(2, 16), method="inlp")
    s = d.stack(e)
    assert s.k == 3 and s.extra["parts"][1]["method"] == "inlp"
    assert d.cosine(e).shape == (1, 2) and abs(float(d.cosine(d)) - 1) < 1e-6
    d.save(tmp_path / "d.safetensors")
    back = Direction.load(tmp_path / "d.safetensors")
    torch.testing.assert_close(back.vector, d.vector)
    assert (back.layer, back.pos, back.model, back.scores, back.data_digest) == (2, -1, "sha256:x", {"bypass": -1.0},
                                                                                  "abc")
    ds = DirectionSet([("selected", d), ("inlp", e), ("same", d)])  # one tensor under two names
    assert "inlp" in ds and "nope" not in ds
    ds.save(tmp_path / "set.safetensors")
    back = DirectionSet.load(tmp_path / "set.safetensors")
    assert list(back) == ["selected", "inlp", "same"] and back["inlp"].k == 2
    with pytest.raises(RefusalError, match="No direction named"):
        back["nope"]
    with pytest.raises(RefusalError, match="hidden size"):
        d.check_model(32, 4)
    assert parse_ranks("0-2", 5) == [0, 1, 2] and parse_ranks("0,3", 5) == [0, 3]
    with pytest.raises(RefusalError, match="out of range"):
        parse_ranks("0-7", 5)


def test_layer_scopes():
    s = Scope(layers={"top": 0.5})
    assert s.resolve_layers(8, ranking=[5, 1, 7, 0, 2, 3, 4, 6]) == [0, 1, 5, 7]
    assert Scope("source").resolve_layers(8, source=3) == [3]
    assert Scope([1, 2]).resolve_layers(8) == [1, 2]
    with pytest.raises(RefusalError, match="outside"):
        Scope([9]).resolve_layers(8)
    with pytest.raises(RefusalError, match="ranking"):
        s.resolve_layers(8)


def test_per_row_plan_equals_each_intervention_alone(model, tokenizer):
    """Rows with different operators and scopes in one forward give what each gives on its own."""
    parts = find_parts(model)
    torch.manual_seed(1)
    d1, d2 = torch.randn(parts.hidden_size), torch.randn(2, parts.hidden_size)
    prompts = format_prompts(tokenizer, PROMPTS[:2])
    variants = [[], [ablation(d1)], [addition(d1, -1.5, layers=[1])], [ablation(d2, layers=[0, 2])],
                [reflection(d1, alpha=1.0, layers="all")],
                [Intervention(ProjectOut(d1), Scope([1], ("attn", "mlp"))), addition(d1, 0.5, layers=[2])]]
    rows = [v for v in variants for _ in prompts]
    with apply(model, Plan.rows(model, rows)):
        together = _logits(model, tokenizer, prompts * 0 + [p for _ in variants for p in prompts])
    for i, v in enumerate(variants):
        with apply(model, v):
            alone = _logits(model, tokenizer, prompts)
        torch.testing.assert_close(together[2 * i:2 * i + 2], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(together[0:2], together[2:4], atol=1e-3)  # the interventions do something
    assert not parts.layers[0]._forward_pre_hooks and not parts.attn[1]._forward_hooks  # removed on exit


def test_plan_rows_take_subset(model, tokenizer):
    d = torch.randn(find_parts(model).hidden_size)
    prompts = format_prompts(tokenizer, PROMPTS[:3])
    plan = Plan.rows(model, [[ablation(d)], [], [addition(d, 2.0, layers=[1])]])
    with apply(model, plan):
        full = _logits(model, tokenizer, prompts)
    with apply(model, plan.take([2, 0])):
        sub = _logits(model, tokenizer, [prompts[2], prompts[0]])
    torch.testing.assert_close(sub, full[[2, 0]], rtol=1e-4, atol=1e-4)


def test_weights_equal_hooks_for_ablation_intervention(model, tokenizer):
    d = torch.randn(find_parts(model).hidden_size)
    prompts = format_prompts(tokenizer, PROMPTS[:3])
    with apply(model, [ablation(d)]):
        hooked = _logits(model, tokenizer, prompts)
    with orthogonalized(model, d):
        baked = _logits(model, tokenizer, prompts)
    torch.testing.assert_close(baked, hooked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", ["all", "prompt", "generated"])
def test_generate_with_plan_equals_model_generate_under_same_hooks(model, tokenizer, tokens):
    """Rows of several conditions decoded together give the tokens model.generate gives under each condition's
    hooks alone; token scopes act on the prompt or the generated positions only."""
    parts = find_parts(model)
    torch.manual_seed(2)
    d = torch.randn(parts.hidden_size) * 3
    prompts = format_prompts(tokenizer, PROMPTS[:3])
    conds = [[], [ablation(d, tokens=tokens)], [addition(d, 4.0, layers=[1], tokens=tokens)]]
    rows = [c for c in conds for _ in prompts]
    texts = generate(model, tokenizer, prompts * len(conds), max_new_tokens=6, batch_size=4,
                     plan=Plan.rows(model, rows))
    cfg = greedy_config(model, tokenizer, 6)
    for ci, c in enumerate(conds):
        want = []
        for p in prompts:
            b = tokenize(tokenizer, [p], "cpu")

            def run(b=b):
                return model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, generation_config=cfg)
            if tokens == "generated" and c:
                # prefill without the intervention, every later step with it: the reference hooks by sequence length
                seq = _generate_split(model, tokenizer, b, c, 6, cfg)
            elif tokens == "prompt" and c:
                seq = _generate_split(model, tokenizer, b, c, 6, cfg, prompt_only=True)
            else:
                with apply(model, c):
                    seq = run()
            want.append(tokenizer.decode(seq[0, b.input_ids.shape[1]:], skip_special_tokens=True).strip())
        assert texts[ci * 3:(ci + 1) * 3] == want, (ci, tokens)
    assert texts[:3] != texts[6:9]  # the addition changes what is generated


def _generate_split(model, tokenizer, b, ivs, n, cfg, prompt_only=False):
    """Reference: greedy decoding by hand, the intervention on prompt positions only or generated ones only."""
    from transformers import DynamicCache

    from refusal.interventions.scopes import Scope as S

    plain = [Intervention(iv.operator, S(iv.scope.layers, iv.scope.sites, "all"), iv.source) for iv in ivs]
    cache = DynamicCache()
    ids, mask = b.input_ids, b.attention_mask
    out = []
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with apply(model, plain if prompt_only else []):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]
    eos = cfg.eos_token_id
    for _ in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        if int(nxt) == eos:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        with apply(model, [] if prompt_only else plain):
            logits = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1]
    return torch.cat([ids] + out, 1)


def test_static_decoder_with_plan_equals_model_generate_path(model, tokenizer):
    """refusal's own static-cache loop gives the same tokens as model.generate under a per-row plan."""
    d = torch.randn(find_parts(model).hidden_size) * 3
    prompts = format_prompts(tokenizer, PROMPTS[:3])
    rows = [[], [ablation(d)], [addition(d, 4.0, layers=[1])]]
    plan = Plan.rows(model, [r for r in rows for _ in prompts])
    kwargs = dict(max_new_tokens=5, batch_size=16, plan=plan)
    eager = generate(model, tokenizer, prompts * 3, **kwargs)
    static = generate(model, tokenizer, prompts * 3, static_cache=True, **kwargs)
    assert static == eager


def test_row_groups_join_rows_with_the_same_prompt_phase_edits(model):
    d = torch.randn(find_parts(model).hidden_size)
    ab, ad = ablation(d), addition(d, 2.0, layers=[1])
    groups, reps = Plan.rows(model, [[], [ab], [ab], [], [ad]]).row_groups("prompt")
    g = groups.tolist()
    assert g[0] == g[3] and g[1] == g[2] and len({g[0], g[1], g[4]}) == 3 and len(reps) == 3
    assert [g[r] for r in reps] == list(range(3))  # one representative row per group, in group order
    later = ablation(d, tokens="generated")  # edits only generated positions: the prompt sees no difference
    groups, reps = Plan.rows(model, [[], [later], [later]]).row_groups("prompt")
    assert groups.tolist() == [0, 0, 0] and reps == [0]
    with pytest.raises(ValueError):
        Plan.shared(model, [ab]).row_groups()


@pytest.mark.parametrize("tokens", ["all", "prompt", "generated"])
def test_split_prefill_gives_the_same_tokens(model, tokenizer, tokens, monkeypatch):
    """The template opening that every prompt shares runs once per group of rows with the same interventions (here 3
    groups for 9 rows, 1 when the interventions only touch generated tokens) and the rest in length buckets; tokens
    and first-token scores are those of running every padded row whole."""
    import refusal.generation.prefill as gp
    from refusal.layout import common_prefix

    torch.manual_seed(3)
    d = torch.randn(find_parts(model).hidden_size) * 3
    prompts = format_prompts(tokenizer, PROMPTS[:3], "You are a careful assistant. Answer briefly and plainly.")
    assert common_prefix(tokenizer(prompts, add_special_tokens=False)["input_ids"]) >= 8
    conds = [[], [ablation(d, tokens=tokens)], [addition(d, 4.0, layers=[1], tokens=tokens)]]
    plan = Plan.rows(model, [c for c in conds for _ in prompts])
    prefix_rows: list[int] = []
    real = gp.Plan.row_groups

    def spy(self, phase="prompt"):
        out = real(self, phase)
        prefix_rows.append(len(out[1]))
        return out

    monkeypatch.setattr(gp.Plan, "row_groups", spy)
    buckets: list[int] = []
    real_partition = gp.partition
    monkeypatch.setattr(gp, "partition", lambda *a: buckets.append(len(real_partition(*a))) or real_partition(*a))
    kw = dict(max_new_tokens=6, batch_size=16, plan=plan, refusal_ids=[5, 9])
    shared, s_scores = generate(model, tokenizer, prompts * 3, split_prefill=True, **kw)
    whole, w_scores = generate(model, tokenizer, prompts * 3, split_prefill=False, **kw)
    assert prefix_rows == [1 if tokens == "generated" else 3] and buckets[0] >= 2  # several length buckets
    assert shared == whole
    torch.testing.assert_close(s_scores, w_scores, rtol=1e-4, atol=1e-4)
    assert shared[:3] != shared[6:9]  # the interventions act


def test_hooks_around_generate_follow_its_token_phase(model, tokenizer):
    """No module state: hooks a caller installs around generate read the model's TokenPhase, which generate sets
    (the prompt during the prefill, generated after it), so they act as generate's own plan does; hooks given a
    TokenPhase of their own follow only it."""
    from refusal.interventions import TokenPhase, token_phase

    torch.manual_seed(4)
    d = torch.randn(find_parts(model).hidden_size) * 3
    prompts = format_prompts(tokenizer, PROMPTS[:2])
    iv = [addition(d, 4.0, layers=[1], tokens="generated")]
    kw = dict(max_new_tokens=5, batch_size=2)
    plain = generate(model, tokenizer, prompts, **kw)
    want = generate(model, tokenizer, prompts, plan=Plan.rows(model, [iv, iv]), **kw)
    assert want != plain  # the generated-token addition changes the text
    with apply(model, iv):
        assert generate(model, tokenizer, prompts, **kw) == want
    assert token_phase(model).name == "prompt"  # generate leaves the phase as it found it
    own = TokenPhase()  # nobody sets it to "generated": the generated-token edit never acts
    with apply(model, iv, phase=own):
        assert generate(model, tokenizer, prompts, **kw) == plain
    with pytest.raises(ValueError, match="token phase"):
        own.set("decode")
