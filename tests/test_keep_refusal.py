"""Refusal kept where wanted: per-category directions, the keep-refusal direction, and the run with categories."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import build_model
from typer.testing import CliRunner

from refusal import io
from refusal.cli import app
from refusal.config import resolve
from refusal.data import builtin
from refusal.directions.base import Direction, DirectionSet
from refusal.directions.categories import (
    category_directions,
    check_categories,
    keep_refusal_direction,
    parse_categories,
    records_by_category,
)
from refusal.errors import RefusalError
from refusal.evaluation.stats import Rate
from refusal.evaluation.summary import by_category, summarize
from refusal.templates import format_prompts

runner = CliRunner()
CATS = ("Violence", "Hate, harassment and discrimination", "Sexual content")


def _hand_mean(model, tok, prompts, pos, layer):
    """Mean residual-stream input of ``layer`` at ``pos``, one unpadded prompt at a time."""
    rows = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
            rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, pos].float())
    return torch.stack(rows).mean(0)


def _hand_prompt_mean(model, tok, prompt, layer, skip):
    """Residual-stream input of ``layer`` averaged over the prompt's tokens after the first ``skip``, unpadded."""
    with torch.no_grad():
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, skip:].float().mean(0)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_category_directions_equal_hand_computed_diff_in_means(arch, tokenizer):
    model = build_model(arch, len(tokenizer), n_layers=3)
    harmful = [r["instruction"] for r in builtin("harmful")[:7]]
    by_cat = {"a": format_prompts(tokenizer, harmful[:3]), "b": format_prompts(tokenizer, harmful[3:7])}
    harmless = format_prompts(tokenizer, [r["instruction"] for r in builtin("harmless")[:5]])
    pos, layer = -2, 1
    dirs = category_directions(model, tokenizer, by_cat, harmless, pos, layer, batch_size=2, model_name="m")
    base = _hand_mean(model, tokenizer, harmless, pos, layer)
    assert list(dirs) == ["a", "b"]
    for c, prompts in by_cat.items():
        want = _hand_mean(model, tokenizer, prompts, pos, layer) - base
        d = dirs[c]
        torch.testing.assert_close(d.vector, want, rtol=1e-4, atol=1e-4)
        assert (d.layer, d.pos, d.model, d.method) == (layer, pos, "m", "diff_means")
        assert d.extra == {"category": c, "n_harmful": len(prompts), "n_harmless": len(harmless)}
    assert not torch.allclose(dirs["a"].vector, dirs["b"].vector)  # the categories really differ
    # the harmless mean given as a tensor (what a run passes from candidates.safetensors): the same directions
    again = category_directions(model, tokenizer, by_cat, base, pos, layer)
    for c in by_cat:
        torch.testing.assert_close(again[c].vector, dirs[c].vector, rtol=1e-4, atol=1e-4)
    with pytest.raises(RefusalError, match="negative offset"):
        category_directions(model, tokenizer, by_cat, harmless, 1, layer)


def _random_dirs(n: dict[str, int], d: int = 64, seed: int = 0) -> DirectionSet:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(d, generator=g) * 3  # a common refusal component, as real categories share
    return DirectionSet((c, Direction(shared + torch.randn(d, generator=g), 5, -1, "m",
                                      extra={"category": c, "n_harmful": k})) for c, k in n.items())


def test_keep_direction_is_orthogonal_to_the_kept_directions_and_keeps_their_component():
    n = {"A": 10, "B": 30, "C": 20, "D": 5}
    dirs = _random_dirs(n)
    kept, released = ["A", "D"], ["B", "C"]
    v = keep_refusal_direction(dirs, released, kept)
    assert v.method == "keep_refusal" and (v.layer, v.pos, v.model) == (5, -1, "m")
    assert v.extra["kept"] == kept and v.extra["released"] == released
    for c in kept:
        assert abs(float(v.unit @ dirs[c].unit)) < 1e-5
    # by hand: count-weighted mean of the released, minus its projection on a Gram-Schmidt basis of the kept
    m = (10 * 0 + 30 * dirs["B"].vector + 20 * dirs["C"].vector) / 50
    e1 = dirs["A"].unit
    e2 = dirs["D"].vector - (dirs["D"].vector @ e1) * e1
    e2 = e2 / e2.norm()
    want = m - (m @ e1) * e1 - (m @ e2) * e2
    torch.testing.assert_close(v.vector, want, rtol=1e-4, atol=1e-4)
    assert v.extra["norm_fraction"] == pytest.approx(float(want.norm() / m.norm()), rel=1e-4)
    # ...which is the global difference in means (all categories, by count) with the kept span removed, rescaled
    glob = sum(n[c] * dirs[c].vector for c in n) / sum(n.values())
    g_rest = glob - (glob @ e1) * e1 - (glob @ e2) * e2
    torch.testing.assert_close(g_rest, want * 50 / 65, rtol=1e-4, atol=1e-4)
    # ablating it leaves every activation's component along each kept direction as it was, and removes the released
    # categories' direction's component along v
    x = torch.randn(8, 64)
    u = v.unit
    ablated = x - (x @ u)[:, None] * u
    for c in kept:
        torch.testing.assert_close(ablated @ dirs[c].vector, x @ dirs[c].vector, rtol=1e-4, atol=1e-3)
    assert float((ablated @ u).abs().max()) < 1e-4
    # explicit weights: equal weights give the plain mean
    eq = keep_refusal_direction(dirs, released, kept, weights={"B": 1, "C": 1})
    m_eq = (dirs["B"].vector + dirs["C"].vector) / 2
    torch.testing.assert_close(eq.vector, m_eq - (m_eq @ e1) * e1 - (m_eq @ e2) * e2, rtol=1e-4, atol=1e-4)


def test_keep_direction_errors():
    dirs = _random_dirs({"A": 1, "B": 1, "C": 1})
    with pytest.raises(RefusalError, match="both released and kept"):
        keep_refusal_direction(dirs, ["A"], ["A", "B"])
    with pytest.raises(RefusalError, match="No direction for the categories"):
        keep_refusal_direction(dirs, ["A"], ["Z"])
    with pytest.raises(RefusalError, match="No category to release"):
        keep_refusal_direction(dirs, [], ["A"])
    # a released direction inside the span of the kept ones leaves nothing to ablate
    inside = DirectionSet(dirs)
    inside["C"] = Direction(dirs["A"].vector + 2 * dirs["B"].vector, 5, -1, "m")
    with pytest.raises(RefusalError, match="lies in the span"):
        keep_refusal_direction(inside, ["C"], ["A", "B"])


def test_parse_and_check_categories():
    assert parse_categories("Sexual content,Violence") == ["Sexual content", "Violence"]
    assert parse_categories(" Hate, harassment and discrimination ; Violence;") == [
        "Hate, harassment and discrimination", "Violence"]
    assert parse_categories(["a", "a", "b"]) == ["a", "b"] and parse_categories("") == []
    recs = [{"instruction": "x", "category": c} for c in ("A", "B", "A", None)]
    assert {c: len(v) for c, v in records_by_category(recs).items()} == {"A": 2, "B": 1}
    check_categories(["A"], recs)
    with pytest.raises(RefusalError, match=r"Unknown category 'Z'.*'A' \(2\); 'B' \(1\)"):
        check_categories(["Z"], recs)
    with pytest.raises(RefusalError, match="no category left to release"):
        check_categories(["A", "B"], recs)
    with pytest.raises(RefusalError, match="no record of the harmful train split has a category"):
        check_categories(["A"], [{"instruction": "x", "category": None}])


def test_summary_has_per_category_rates_with_wilson_intervals():
    recs = [{"refused": r, "category": c, "refusal_score": 0.0} for r, c in
            [(True, "A"), (False, "A"), (True, "A"), (True, "B"), (False, None)]]
    s = summarize({"harmful": {"baseline": recs}})
    cats = s["results"]["harmful"]["baseline"]["by_category"]
    assert list(cats) == ["A", "B", "(none)"]
    assert cats["A"]["refusal"] == Rate.of(2, 3).to_json() and cats["A"]["non_refusal"] == Rate.of(1, 3).to_json()
    assert cats["B"]["refusal"] == Rate.of(1, 1).to_json() and cats["(none)"]["refusal"]["n"] == 1
    # no categories at all: no by_category
    plain = [{**r, "category": None} for r in recs]
    assert "by_category" not in summarize({"harmful": {"baseline": plain}})["results"]["harmful"]["baseline"]
    assert by_category(plain) == {}


def test_config_adds_and_drops_the_keep_refusal_condition(tmp_path):
    def conds(c):
        return [(c.name, c.prompts, [(iv.op, iv.direction) for iv in c.interventions]) for c in c.generate.conditions]

    cfg = resolve(None, {"select": {"keep_refusal": ["Violence"]}}, has_gpu=False)
    assert cfg.select.keep_refusal_method == "conditional"  # the default: the selected direction's ablation, gated
    assert conds(cfg)[-1] == ("keep_refusal", "harmful", [("ablate", "selected")])
    # the orthogonal method ablates `kept`; changing the method on a saved config swaps the condition, never doubles it
    orth = resolve(None, {**cfg.to_dict(), "preset": "cpu",
                          "select": {**cfg.to_dict()["select"], "keep_refusal_method": "orthogonal"}}, has_gpu=False)
    assert [c for c in conds(orth) if c[0] == "keep_refusal"] == [("keep_refusal", "harmful", [("ablate", "kept")])]
    back = resolve(None, {**orth.to_dict(), "preset": "cpu",
                          "select": {**orth.to_dict()["select"], "keep_refusal_method": "conditional"}}, has_gpu=False)
    assert [c for c in conds(back) if c[0] == "keep_refusal"] == [("keep_refusal", "harmful", [("ablate", "selected")])]
    with pytest.raises(RefusalError, match="keep_refusal_method must be"):
        resolve(None, {"select": {"keep_refusal": ["Violence"], "keep_refusal_method": "cast"}}, has_gpu=False)
    # without keep_refusal the method is in no digest (run folders made before the setting keep theirs)
    from refusal.config import digest

    plain = resolve(None, {}, has_gpu=False)
    other = resolve(None, {"select": {"keep_refusal_method": "orthogonal"}}, has_gpu=False)
    assert digest(plain.stage_config("select")) == digest(other.stage_config("select"))
    assert digest(cfg.stage_config("select")) != digest(orth.stage_config("select"))
    # resolving the saved config again adds nothing; turning the option off drops it
    again = resolve(None, {**cfg.to_dict(), "preset": "cpu"}, has_gpu=False)
    assert [c.name for c in again.generate.conditions].count("keep_refusal") == 1
    off = resolve(None, {**cfg.to_dict(), "select": {**cfg.to_dict()["select"], "keep_refusal": []}}, has_gpu=False)
    assert "keep_refusal" not in [c.name for c in off.generate.conditions]
    assert "keep_refusal" not in [c.name for c in resolve(None, {}, has_gpu=False).generate.conditions]
    p = tmp_path / "c.yaml"
    p.write_text("select:\n  keep_refusal: Violence\n")
    with pytest.raises(RefusalError, match="keep_refusal must be a list"):
        resolve(p, has_gpu=False)


# ---- a whole run with categories -------------------------------------------------------------------------------


@pytest.fixture
def categorised(tmp_path):
    """A paper-style folder whose harmful records carry categories (the last one's name holds a comma)."""
    d = tmp_path / "data"
    (d / "splits").mkdir(parents=True)
    harmful = builtin("harmful")
    harmless = builtin("harmless")
    for split, (lo, hi) in {"train": (0, 9), "val": (9, 12), "test": (12, 18)}.items():
        rows = [{"instruction": r["instruction"], "category": CATS[i % 3]} for i, r in enumerate(harmful[lo:hi])]
        (d / "splits" / f"harmful_{split}.json").write_text(json.dumps(rows))
        (d / "splits" / f"harmless_{split}.json").write_text(json.dumps([r["instruction"] for r in harmless[lo:hi]]))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"n_train": 9, "n_val": 3, "n_test": 6, "filter": False},
                                   "select": {"kl_threshold": 1e9, "induce_threshold": -1e9},
                                   "generate": {"max_new_tokens": 3}, "evaluate": {"cross_entropy": []},
                                   "device": "cpu", "preset": "paper"}))
    return d, cfg


def _args(model_dir, data, cfg, out, *extra):
    return ["--model", str(model_dir), "--harmful", str(data), "--harmless", str(data), "--config", str(cfg),
            "--output", str(out), *extra]


def test_run_with_keep_refusal_end_to_end(model_dir, categorised, tmp_path):
    from refusal.report import write_report

    data, cfg = categorised
    out = tmp_path / "runs"
    keep = "Hate, harassment and discrimination;Sexual content"
    r = runner.invoke(app, ["run", *_args(model_dir, data, cfg, out, "--keep-refusal", keep)])
    assert r.exit_code == 0, r.output
    run_dir = out / "tiny-qwen2"
    s = io.read_json(run_dir / "summary.json")
    assert s["keep_refusal"]["kept"] == list(CATS[1:]) and s["keep_refusal"]["released"] == ["Violence"]
    assert s["keep_refusal"]["n_train"] == {c: 3 for c in CATS}
    harmful = s["results"]["harmful"]
    assert set(harmful) == {"baseline", "ablation", "actadd", "keep_refusal"}
    for cond, m in harmful.items():  # every condition: a rate per test category, with its interval
        assert set(m["by_category"]) == set(CATS), cond
        for v in m["by_category"].values():
            rate = v["refusal"]
            assert rate["n"] == 2 and 0 <= rate["low"] <= rate["rate"] <= rate["high"] <= 1
        assert sum(v["refusal"]["count"] for v in m["by_category"].values()) == m["refusal"]["count"]
    assert harmful["keep_refusal"]["kl_harmless"] is not None  # the KL of the keep-refusal condition
    assert "by_category" not in s["results"]["harmless"]["baseline"]  # harmless records carry no category
    # the direction: in the run's set as `kept`, orthogonal to the kept categories' directions
    from refusal.runs.folder import RunFolder

    dirs = RunFolder(run_dir).directions()  # "selected" read from direction.safetensors, the ranked set beside it
    cats = DirectionSet.load(run_dir / "categories.safetensors")
    kept = dirs["kept"]
    assert kept.method == "keep_refusal" and kept.extra["kept"] == list(CATS[1:])
    assert (kept.layer, kept.pos) == (dirs["selected"].layer, dirs["selected"].pos)
    for c in CATS[1:]:
        assert abs(float(kept.unit @ cats[c].unit)) < 1e-5
    # the per-category directions average (by count) to the selected direction: same harmless mean, same prompts
    glob = sum(cats[c].vector for c in CATS) / 3
    torch.testing.assert_close(glob, dirs["selected"].vector, rtol=1e-3, atol=1e-3)
    info = io.read_json(run_dir / "categories.json")
    assert info["released"] == ["Violence"] and set(info["cosine_with_selected"]) == set(CATS)
    assert "refusal rate per category" in r.output
    html, md = write_report(run_dir)
    for text in (html.read_text(), md.read_text()):
        assert "Refusal per category" in text and "Hate, harassment and discrimination" in text
    assert "released" in md.read_text() and "keep_refusal" in md.read_text()
    assert 'alt="refusal rate per category (harmful prompts)"' in html.read_text()  # the figure, one panel each


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr("refusal.runs.pipeline.load_model", boom)


def test_unknown_category_is_refused_before_the_model_loads(no_model_load, model_dir, categorised, tmp_path):
    data, cfg = categorised
    r = runner.invoke(app, ["run", *_args(model_dir, data, cfg, tmp_path / "runs", "--keep-refusal",
                                          "Sexual content,Nope")])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "Unknown category 'Nope'" in text and "'Violence' (3)" in text and "'Sexual content' (3)" in text
    assert "separate them with ';'" in text  # a name there holds a comma
    assert not (tmp_path / "runs").exists()
    # from Python too: Run() checks the inputs before anything loads
    from refusal.runs.pipeline import Run

    c = resolve(cfg, {"model": str(model_dir), "data": {"harmful": str(data), "harmless": str(data)},
                      "select": {"keep_refusal": ["Violence", "Sexual content", CATS[1]]}})
    with pytest.raises(RefusalError, match="no category left to release"):
        Run(c)


def test_gpu_demo_script_runs_on_a_tiny_model(tmp_path, monkeypatch):
    """benchmarks/keep_refusal.py's plumbing (what the lead runs on the GPU), on a tiny random model and the built-in
    categorised sets: the JSON has every condition's per-category rates with intervals, the KL, and the plot."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    sys.modules.pop("benchmarks.keep_refusal", None)
    from benchmarks.keep_refusal import main

    out = tmp_path / "kr" / "tiny.json"
    res = main(["--tiny", "--data", str(tmp_path / "no-such-folder"), "--out", str(out), "--n-train", "16",
                "--n-val", "3", "--n-test", "12", "--method", "both"])
    saved = json.loads(out.read_text())
    assert saved["kept"] == ["violence_weapons"] and saved["tiny_random_model"] is True
    assert set(saved["rates"]) == {"baseline", "ablation", "conditional", "orthogonal"}
    assert set(saved["kl_harmless"]) == {"baseline", "ablation", "conditional", "orthogonal"}
    for cond in saved["rates"].values():
        assert sum(v["refusal"]["n"] for v in cond["by_category"].values()) == cond["overall"]["n"] == 12
    gate = saved["methods"]["conditional"]
    assert gate["condition"]["layer"] is not None and gate["condition"]["per_layer"]
    assert sum(v["n"] for v in gate["routing"].values()) == 12 == gate["routing_overall"]["n"]
    assert saved["methods"]["orthogonal"]["norm_fraction"] is not None
    row = saved["table"][0]
    assert {"category", "role", "n", "baseline", "ablation", "conditional", "orthogonal", "routed_to_release",
            "conditional_in_baseline_ci", "orthogonal_minus_baseline"} <= set(row)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    md = out.with_suffix(".md").read_text()
    assert "| category |" in md and "gate: routed to release" in md and "orthogonal − baseline" in md
    assert saved["command"].startswith("python -m benchmarks.keep_refusal --tiny") and res["date"] == saved["date"]


def test_keep_refusal_turned_on_and_off_on_a_finished_run(model_dir, categorised, tmp_path):
    """Given on a finished run, the option redoes select onwards (not extract); given empty, it drops the condition."""
    data, cfg = categorised
    out = tmp_path / "runs"
    assert runner.invoke(app, ["run", *_args(model_dir, data, cfg, out)]).exit_code == 0
    run_dir = out / "tiny-qwen2"
    extracted = (run_dir / "extract.done.json").read_text()
    r = runner.invoke(app, ["run", str(run_dir), "--keep-refusal", "Violence"])
    assert r.exit_code == 0, r.output
    assert (run_dir / "extract.done.json").read_text() == extracted  # the candidates are reused
    s = io.read_json(run_dir / "summary.json")
    assert "keep_refusal" in s["results"]["harmful"] and s["keep_refusal"]["kept"] == ["Violence"]
    assert "kept" in DirectionSet.load(run_dir / "directions.safetensors")
    r = runner.invoke(app, ["run", str(run_dir), "--keep-refusal", ""])
    assert r.exit_code == 0, r.output
    s = io.read_json(run_dir / "summary.json")
    assert "keep_refusal" not in s["results"]["harmful"] and "keep_refusal" not in s
    assert "kept" not in DirectionSet.load(run_dir / "directions.safetensors")


# ---- the conditional method (CAST): the condition, the routing, its fidelity -------------------------------------


def _synthetic(n: int, seed: int, shift: float):
    """(3 layers, n, 16) activations of prompts in categories A, B (released) and K (kept): layer 0 carries nothing,
    layers 1 and 2 the same separation along dimension 0; dimension 1 has a large spread that tells nothing."""
    g = torch.Generator().manual_seed(seed)
    cats = [("A", "B", "K")[i % 3] for i in range(n)]
    x = torch.randn(3, n, 16, generator=g)
    x[:, :, 1] *= 50
    kept = torch.tensor([c == "K" for c in cats])
    x[1:, :, 0] += torch.where(kept, -shift, shift)
    x[2] = x[1]  # the same at layers 1 and 2: a tie
    return x, cats


def test_condition_is_cross_validated_ridge_with_a_kept_release_threshold(tmp_path):
    from refusal.directions.condition import KeepCondition, fit_keep_condition

    x, cats = _synthetic(60, 0, 1.5)
    cond = fit_keep_condition(x, cats, [4, 6, 8], kept=["K"], released=["A", "B"], max_kept_release=0.1)
    per = {r["layer"]: r["auc"] for r in cond.info["per_layer"]}
    assert set(per) == {4, 6, 8} and all(set(a) == {str(p) for p in cond.info["penalties"]} for a in per.values())
    assert max(per[4].values()) < 0.8 < min(per[6].values())  # layer 0 carries nothing
    assert cond.layer == 6  # the best out-of-fold AUC; the tie with layer 8 goes to the earlier layer
    assert per[6] == per[8]
    assert cond.info["n"] == {"released": 40, "kept": 20} and cond.info["folds"] == 5
    oof = cond.info["out_of_fold"]
    assert oof["kept_released"] <= 0.1 and oof["released_recall"] > 0.5  # the threshold holds out of fold
    assert cond.info["out_of_fold_released_by_category"]["K"]["n"] == 20
    # the spread of dimension 1 is scaled away: the rule leans on dimension 0
    assert abs(float(cond.weight[0])) > 10 * abs(float(cond.weight[1]))
    # a stricter threshold releases fewer kept prompts and fewer released ones
    strict = fit_keep_condition(x, cats, [4, 6, 8], kept=["K"], released=["A", "B"], max_kept_release=0.0)
    assert strict.info["out_of_fold"]["kept_released"] == 0.0
    assert strict.info["out_of_fold"]["released_recall"] <= oof["released_recall"]
    # saved and read back: the same rule, the record
    cond.save(tmp_path / "c.safetensors")
    back = KeepCondition.load(tmp_path / "c.safetensors")
    assert back.layer == 6 and back.pool == "mean" and back.info == cond.info
    assert back.release(x[1]) == cond.release(x[1])
    with pytest.raises(RefusalError, match="released and of kept"):
        fit_keep_condition(x, ["A"] * 60, [4, 6, 8], kept=["K"], released=["A"])


def test_ridge_in_the_dual_equals_the_primal_solution():
    from refusal.directions.condition import fit_ridge, standardise

    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 2.0, 1.0])
    y = torch.tensor([True] * 7 + [False] * 5)
    w, b, mean, scale = fit_ridge(x, y, 3.0)
    m, sd = standardise(x)
    z = (x - m) / sd
    t = y.double() * 2 - 1
    primal = torch.linalg.solve(z.T @ z + 3.0 * torch.eye(5, dtype=torch.float64), z.T @ (t - t.mean()))
    torch.testing.assert_close((x @ w.double() + b.double()), z @ primal, atol=1e-5, rtol=1e-5)
    # stacked problems (layers, folds) are independent
    w2, b2, _, _ = fit_ridge(torch.stack([x, 2 * x]), y.expand(2, -1), 3.0)
    torch.testing.assert_close(w2[0], w)
    torch.testing.assert_close(b2[0], b)


def test_auc_folds_and_threshold():
    from refusal.directions.condition import auc, stratified_folds, threshold_for

    assert auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([True, True, False, False])) == 1.0
    assert auc(torch.tensor([0.5, 0.1, 0.5]), torch.tensor([True, True, False])) == 0.25
    y = torch.tensor([True] * 13 + [False] * 7)
    fold = stratified_folds(y, 5, seed=1)
    for f in range(5):
        assert int((y & (fold == f)).sum()) in (2, 3) and int((~y & (fold == f)).sum()) in (1, 2)
    assert torch.equal(fold, stratified_folds(y, 5, seed=1)) and not torch.equal(fold, stratified_folds(y, 5, 2))
    kept = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.4, 0.6, 0.8, 0.0])
    for r, allowed in ((0.0, 0), (0.1, 1), (0.25, 2), (0.5, 5)):
        assert int((kept > threshold_for(kept, r)).sum()) == allowed


def test_instruction_mean_skips_the_template_and_the_padding(tokenizer):
    from refusal.directions.condition import prompt_activations
    from refusal.templates import pre_instruction_length

    model = build_model("qwen2", len(tokenizer), n_layers=3)
    prompts = format_prompts(tokenizer, [r["instruction"] for r in builtin("harmful")[:4]])
    skip = pre_instruction_length(tokenizer)
    ids0 = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    ids1 = tokenizer(prompts[1], add_special_tokens=False)["input_ids"]
    assert ids0[:skip] == ids1[:skip] and ids0[skip] != ids1[skip]  # the shared template prefix, no more
    got = prompt_activations(model, tokenizer, prompts, [1, 2], pool="mean", skip=skip, batch_size=3)
    last = prompt_activations(model, tokenizer, prompts, [1, 2], pool="last", batch_size=3)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            for j, la in enumerate([1, 2]):
                torch.testing.assert_close(got[j, i], hs[la][0, skip:].float().mean(0), atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(last[j, i], hs[la][0, -1].float(), atol=1e-4, rtol=1e-4)


def test_gated_kl_takes_the_no_intervention_row_where_routed_to_keep():
    from refusal.runs.keep_refusal import Gates, gated_kl

    kl = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 6.0, 7.0], [0.1, 0.2, 0.3]])  # 3 conditions + none
    gate = Gates(layer=1, rows={2: [True, False, True, True]}, harmless=[True, False, False])
    out = gated_kl(kl, gate)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 0.2, 0.3]]))
    assert gated_kl(kl[:3], None) is not None and gated_kl(kl[:3], None).shape == (3, 3)
    assert gate.interventions(2, 1, ["iv"]) == [] and gate.interventions(2, 0, ["iv"]) == ["iv"]
    assert gate.interventions(0, 1, ["iv"]) == ["iv"] and gate.label(2, 1) == "keep" and gate.label(0, 0) is None


def _with(cfg, tmp_path, **select):
    """The fixture's config with more select settings (and more tokens, so that ablation changes completions)."""
    c = yaml.safe_load(cfg.read_text())
    c["select"].update(select)
    c["generate"]["max_new_tokens"] = 8
    p = tmp_path / f"cfg-{'-'.join(map(str, select.values()))}.yaml"
    p.write_text(yaml.safe_dump(c))
    return p


def _check_routing_fidelity(run_dir):
    """Every keep_refusal row is routed once, in the original order, and gets exactly the tokens of the plain
    ablation (routed to release) or of the baseline (routed to keep) for the same prompt. Returns the routing."""
    comps = io.read_json(run_dir / "completions.json")["harmful"]
    base, abl, keep = comps["baseline"], comps["ablation"], comps["keep_refusal"]
    assert [r["instruction"] for r in keep] == [r["instruction"] for r in base] == [r["instruction"] for r in abl]
    assert all(r["gate"] in ("release", "keep") for r in keep)
    assert not any("gate" in r for r in base + abl)
    for k, b, a in zip(keep, base, abl):
        want = a if k["gate"] == "release" else b
        assert k["completion"] == want["completion"], (k["gate"], k["instruction"])
    return [r["gate"] == "release" for r in keep]


def test_conditional_run_routes_each_prompt_and_matches_ablation_or_baseline(model_dir, categorised, tmp_path,
                                                                             monkeypatch):
    data, cfg = categorised
    out = tmp_path / "runs"
    r = runner.invoke(app, ["run", *_args(model_dir, data, _with(cfg, tmp_path), out, "--keep-refusal", "Violence")])
    assert r.exit_code == 0, r.output
    run_dir = out / "tiny-qwen2"
    # the condition: saved with every candidate layer's out-of-fold AUC, its layer the best one (ties: the earlier)
    from refusal.directions.condition import KeepCondition

    cond = KeepCondition.load(run_dir / "keep_condition.safetensors")
    info = io.read_json(run_dir / "categories.json")
    assert info["method"] == "conditional" and info["condition"]["layer"] == cond.layer
    per_layer = info["condition"]["per_layer"]
    assert [p["layer"] for p in per_layer] == [0, 1]  # the tiny model's candidate layers (3 x 0.8)
    best = max(max(p["auc"].values()) for p in per_layer)
    assert cond.layer == next(p["layer"] for p in per_layer if max(p["auc"].values()) == best)
    assert cond.pool == "mean" and info["condition"]["n"] == {"released": 8, "kept": 4}  # train and val prompts
    assert cond.kept == ["Violence"] and cond.released == list(CATS[1:])
    assert "kept" in DirectionSet.load(run_dir / "directions.safetensors")  # the orthogonal one, as a diagnostic
    # the routing: one batched forward, no intervention, the same decisions as the condition on hand-read activations
    routed = _check_routing_fidelity(run_dir)
    splits = io.read_json(run_dir / "splits.json")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refusal.templates import format_prompts

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = format_prompts(tok, [x["instruction"] for x in splits["harmful"]["test"]])
    hand = torch.stack([_hand_prompt_mean(model, tok, p, cond.layer, cond.skip) for p in prompts])
    assert routed == cond.release(hand)
    # the summary: the gate's routing rate per test category with its interval, the condition's accuracy
    s = io.read_json(run_dir / "summary.json")
    kr = s["keep_refusal"]
    assert kr["method"] == "conditional" and kr["condition"]["layer"] == cond.layer
    assert set(kr["routing"]) == set(CATS) and sum(v["n"] for v in kr["routing"].values()) == 6
    assert sum(v["count"] for v in kr["routing"].values()) == sum(routed) == kr["routing_overall"]["count"]
    for v in kr["routing"].values():
        assert 0 <= v["low"] <= v["rate"] <= v["high"] <= 1
    h = kr["routing_harmless"]  # the harmless prompts routed by the same condition, for the KL
    assert h["n"] == 6 and s["results"]["harmful"]["keep_refusal"]["kl_harmless"] is not None
    from refusal.report import write_report

    html, md = write_report(run_dir)
    for text in (html.read_text(), md.read_text()):
        assert "routed to release" in text and "conditional" in text
    # the fidelity proof with both groups surely present: routing forced to alternate, generate redone
    comps = io.read_json(run_dir / "completions.json")["harmful"]
    differ = [i for i, (b, a) in enumerate(zip(comps["baseline"], comps["ablation"])) if b["completion"] !=
              a["completion"]]
    assert len(differ) >= 2, "the ablation must change some completions for this test to mean anything"
    pattern = [i % 2 == 0 for i in range(6)]
    pattern[differ[0]], pattern[differ[1]] = True, False
    import refusal.directions.condition as condition

    monkeypatch.setattr(condition, "route", lambda m, t, c, ps, **k: pattern[:len(ps)])
    r = runner.invoke(app, ["run", "--resume", str(run_dir), "--from-stage", "generate"])
    assert r.exit_code == 0, r.output
    assert _check_routing_fidelity(run_dir) == pattern
    # the harmless KL under the same routing: between no intervention (all kept) and the ablation's (all released)
    kl = io.read_json(run_dir / "kl.json")["harmful"]
    assert kl["keep_refusal"]["harmless_routed_release"]["count"] == 3
    assert min(kl["baseline"]["kl_harmless"], kl["ablation"]["kl_harmless"]) - 1e-6 <= \
        kl["keep_refusal"]["kl_harmless"] <= kl["ablation"]["kl_harmless"] + 1e-6
    # exports refuse it: a conditional edit is not a weight edit
    r = runner.invoke(app, ["abliterate", str(run_dir), "--out", str(tmp_path / "export")])
    assert r.exit_code != 0 and "conditional" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "export").exists()


def test_orthogonal_method_still_works(model_dir, categorised, tmp_path):
    data, cfg = categorised
    out = tmp_path / "runs"
    r = runner.invoke(app, ["run", *_args(model_dir, data, _with(cfg, tmp_path, keep_refusal_method="orthogonal"),
                                          out, "--keep-refusal", "Violence")])
    assert r.exit_code == 0, r.output
    run_dir = out / "tiny-qwen2"
    assert not (run_dir / "keep_condition.safetensors").exists()
    s = io.read_json(run_dir / "summary.json")
    assert s["keep_refusal"]["method"] == "orthogonal" and "routing" not in s["keep_refusal"]
    keep = io.read_json(run_dir / "completions.json")["harmful"]["keep_refusal"]
    assert not any("gate" in r for r in keep)
    dirs = DirectionSet.load(run_dir / "directions.safetensors")
    cats = DirectionSet.load(run_dir / "categories.safetensors")
    for c in CATS[:1]:
        assert abs(float(dirs["kept"].unit @ cats[c].unit)) < 1e-5
    kr = s["results"]["harmful"]["keep_refusal"]
    assert set(kr["by_category"]) == set(CATS) and kr["kl_harmless"] is not None
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["select"]["keep_refusal_method"] == "orthogonal"
    assert [[(iv["op"], iv["direction"]) for iv in c["interventions"]] for c in saved["generate"]["conditions"]
            if c["name"] == "keep_refusal"] == [[("ablate", "kept")]]


def test_unknown_method_is_refused_before_the_model_loads(no_model_load, model_dir, categorised, tmp_path):
    data, cfg = categorised
    r = runner.invoke(app, ["run", *_args(model_dir, data, _with(cfg, tmp_path, keep_refusal_method="cast"),
                                          tmp_path / "runs", "--keep-refusal", "Violence")])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "keep_refusal_method must be" in text and "conditional" in text and "orthogonal" in text
    assert not (tmp_path / "runs").exists()
