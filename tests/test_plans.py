"""The general scorer: any interventions, many per forward, equal to scoring each alone (and to selection's
specialised path for the paper's candidates)."""

from __future__ import annotations

import torch

from refusal import extract, find_parts, format_prompts, post_instruction_ids
from refusal.data import builtin
from refusal.interventions import ablation, addition, apply, reflection
from refusal.scoring.engine import kl_div, last_logits, score_candidates
from refusal.scoring.plans import score_interventions, spearman
from refusal.scoring.refusal import refusal_score, refusal_token_ids
from refusal.templates import tokenize

HARMFUL = [r["instruction"] for r in builtin("harmful")[:5]]
HARMLESS = [r["instruction"] for r in builtin("harmless")[:4]]


def test_score_interventions_equals_each_alone(model, tokenizer):
    parts = find_parts(model)
    torch.manual_seed(3)
    d, sub = torch.randn(parts.hidden_size), torch.randn(2, parts.hidden_size)
    prompts = format_prompts(tokenizer, HARMFUL[:3] + HARMLESS[:2], system="Be brief.")
    rids = refusal_token_ids(tokenizer)
    cands = [[], [ablation(d)], [ablation(sub, layers=[1])], [addition(d, 2.0, layers=[2])],
             [reflection(d, 1.0, layers=[1, 2]), addition(d, -1.0, layers=[0])]]
    got = score_interventions(model, tokenizer, prompts, cands, rids, batch_size=7, min_prefix=1)
    b = tokenize(tokenizer, prompts, "cpu")
    base = last_logits(model, b.input_ids, b.attention_mask)
    for i, c in enumerate(cands):
        with apply(model, c):
            logits = last_logits(model, b.input_ids, b.attention_mask)
        torch.testing.assert_close(got.refusal[i], refusal_score(logits, torch.tensor(rids)), rtol=1e-3, atol=1e-3)
        want_kl = kl_div(torch.log_softmax(base.float(), -1), torch.log_softmax(logits.float(), -1))
        torch.testing.assert_close(got.kl[i], want_kl, rtol=1e-3, atol=1e-4)
    assert got.kl[0].abs().max() < 1e-4 and got.kl[1].mean() > 1e-3  # no intervention: no change; ablation: some


def test_score_interventions_matches_selection_scores(model, tokenizer):
    n_pos = len(post_instruction_ids(tokenizer))
    cands = extract(model, tokenizer, format_prompts(tokenizer, HARMFUL), format_prompts(tokenizer, HARMLESS), n_pos)
    hv, bv = format_prompts(tokenizer, HARMFUL[:3]), format_prompts(tokenizer, HARMLESS[:2])
    rids = refusal_token_ids(tokenizer)
    scores = score_candidates(model, tokenizer, cands, hv, bv, rids)
    picks = [(cands.positions[p], layer) for p, layer in ((0, 1), (2, 2), (1, 3))]
    dirs = [cands.direction(p, layer) for p, layer in picks]
    abl = score_interventions(model, tokenizer, hv + bv, [[ablation(d)] for d in dirs], rids)
    ind = score_interventions(model, tokenizer, bv, [[addition(d, 1.0)] for d in dirs], rids)
    bypass, _ = abl.mean(slice(0, 3))
    _, kl = abl.mean(slice(3, 5))
    induce, _ = ind.mean()
    for i, (p, layer) in enumerate(picks):
        j = cands.positions.index(p)
        assert abs(float(bypass[i]) - float(scores.bypass[j, layer])) < 1e-3
        assert abs(float(kl[i]) - float(scores.kl[j, layer])) < 1e-3
        assert abs(float(induce[i]) - float(scores.induce[j, layer])) < 1e-3


def test_spearman():
    assert abs(spearman([1, 2, 3, 4], [10, 20, 30, 40]) - 1) < 1e-9
    assert abs(spearman([1, 2, 3, 4], [4, 3, 2, 1]) + 1) < 1e-9
    import scipy.stats

    a, b = [3.0, 1.0, 2.0, 2.0, 5.0], [1.0, 0.5, 0.7, 0.9, 2.0]
    assert abs(spearman(a, b) - scipy.stats.spearmanr(a, b).statistic) < 1e-9
