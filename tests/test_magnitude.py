"""Magnitude: projections onto the refusal direction, their correlation with the refusal score, ROC-AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_model

from refusal.data import builtin
from refusal.directions.base import Direction
from refusal.errors import RefusalError
from refusal.evaluation.judges import Judgement
from refusal.evaluation.magnitude import magnitude, pearson, plot_magnitude, rankdata, roc_auc, spearman
from refusal.templates import format_prompts


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = build_model("llama", len(tokenizer), n_layers=3)
    ins = [r["instruction"] for r in builtin("harmful")[:5]] + [r["instruction"] for r in builtin("harmless")[:5]]
    return model, format_prompts(tokenizer, ins)


def test_statistics_match_scipy_and_sklearn():
    stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n in (2, 7, 50):
        x = rng.integers(0, 6, n).astype(float)  # many ties
        y = x * 0.5 + rng.normal(size=n)
        lab = rng.random(n) < 0.5
        lab[0], lab[-1] = True, False
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert roc_auc(x, lab) == pytest.approx(metrics.roc_auc_score(lab, x), abs=1e-12)
        assert roc_auc(y, lab) == pytest.approx(metrics.roc_auc_score(lab, y), abs=1e-12)
        assert np.allclose(rankdata(x), stats.rankdata(x))
    assert roc_auc([1, 2, 3], [True, True, False]) == 0.0
    assert roc_auc([1, 2, 3], [False, True, True]) == 1.0
    assert np.isnan(roc_auc([1, 2], [True, True]))
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert np.isnan(spearman([1.0], [2.0]))


def test_projection_is_the_layer_input_onto_the_unit_direction(setup, tokenizer, tmp_path):
    model, prompts = setup
    torch.manual_seed(0)
    vec = torch.randn(64) * 3
    labels = [True] * 5 + [False] * 5
    kinds = ["harmful"] * 5 + ["harmless"] * 5
    for pos in (-1, -2):
        d = Direction(vec, layer=1, pos=pos)
        res = magnitude(model, tokenizer, prompts, d, labels=labels, kinds=kinds, batch_size=3)
        assert res["n"] == 10 and res["layer"] == 1 and res["pos"] == pos
        for i in (0, 7):  # one prompt at a time, no padding: hidden_states[1] is the input of layer 1
            ids = tokenizer(prompts[i], return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                h = model(ids, output_hidden_states=True).hidden_states[1][0, pos]
            assert res["projection"][i] == pytest.approx(float(h @ (vec / vec.norm())), abs=1e-4)
    # the refusal score computed here is the scoring engine's; the statistics are those of the lists returned
    from refusal.scoring.engine import refusal_scores
    from refusal.scoring.refusal import refusal_token_ids

    want = refusal_scores(model, tokenizer, prompts, refusal_token_ids(tokenizer))
    assert res["refusal_score"] == pytest.approx(want.tolist(), abs=1e-4)
    assert res["pearson"] == pytest.approx(pearson(res["projection"], res["refusal_score"]))
    assert res["spearman"] == pytest.approx(spearman(res["projection"], res["refusal_score"]))
    assert res["roc_auc"] == pytest.approx(roc_auc(res["projection"], labels))
    p = np.array(res["projection"])
    assert res["mean_projection"]["refused"] == pytest.approx(p[:5].mean())
    assert res["mean_projection"]["kind:harmless"] == pytest.approx(p[5:].mean())
    # flipping the direction flips the ranking
    flipped = magnitude(model, tokenizer, prompts, Direction(-vec, 1, -2), labels=labels)
    assert flipped["roc_auc"] == pytest.approx(1 - res["roc_auc"])

    out = tmp_path / "plots" / "magnitude.png"
    plot_magnitude(res, out, title="tiny llama")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_magnitude(magnitude(model, tokenizer, prompts, Direction(vec, 1, -1), refusal_scores=torch.zeros(10)),
                   tmp_path / "no_labels.png")  # no labels, constant scores: still a plot, undefined statistics
    assert (tmp_path / "no_labels.png").stat().st_size > 0


def test_given_scores_and_judgements(setup, tokenizer):
    model, prompts = setup
    d = Direction(torch.randn(64), layer=0, pos=-1)
    scores = torch.linspace(-2, 2, 10)
    judged = [Judgement("refusal")] * 4 + [Judgement("compliance")] * 6
    res = magnitude(model, tokenizer, prompts, d, labels=judged, refusal_scores=scores)
    assert res["labels"] == [True] * 4 + [False] * 6
    assert res["refusal_score"] == pytest.approx(scores.tolist())
    const = magnitude(model, tokenizer, prompts, d, refusal_scores=[1.0] * 10, labels=[True] * 10)
    assert const["pearson"] is None and const["spearman"] is None and const["roc_auc"] is None


@pytest.mark.parametrize("change, match", [
    (dict(direction=Direction(torch.randn(2, 64), layer=1, pos=-1)), "one direction"),
    (dict(direction=Direction(torch.randn(64))), "which layer"),
    (dict(direction=Direction(torch.randn(32), layer=1, pos=-1)), "32 dimensions"),
    (dict(direction=Direction(torch.randn(64), layer=9, pos=-1)), "not one of the model's 3 layers"),
    (dict(pos=0), "negative offset"),
    (dict(labels=[True] * 3), "3 labels for 10 prompts"),
    (dict(labels=["maybe"] * 10), "neither refused nor not"),
    (dict(labels=[Judgement.failure("timeout")] * 10), "neither refused nor not"),
    (dict(refusal_scores=[0.0] * 9), "9 refusal scores"),
    (dict(prompts=["no template here"]), "post-instruction tokens"),
    (dict(prompts=[]), "non-empty list"),
])
def test_user_errors(setup, tokenizer, change, match):
    model, prompts = setup
    args = dict(prompts=prompts, direction=Direction(torch.randn(64), layer=1, pos=-1))
    args.update(change)
    with pytest.raises(RefusalError, match=match):
        magnitude(model, tokenizer, args.pop("prompts"), args.pop("direction"), **args)
