"""Direction sets: search_sets / score_sets against an independent hook-by-hook computation, the objective, the
Pareto front, the saved "set" direction, and ``refusal sets`` on a tiny run folder with its errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import build_model
from typer.testing import CliRunner

from refusal import extract, format_prompts, io, post_instruction_ids
from refusal.cli import app
from refusal.data import builtin
from refusal.directions.base import Direction, DirectionSet
from refusal.errors import RefusalError
from refusal.runs.folder import RunFolder
from refusal.scoring.engine import kl_div, last_logits
from refusal.scoring.refusal import refusal_score, refusal_token_ids
from refusal.scoring.sets import ScoredSet, SetSearch, add_to_directions, plot_pareto, score_sets, search_sets
from refusal.templates import tokenize

runner = CliRunner()
HARMFUL = [r["instruction"] for r in builtin("harmful")[:6]]
HARMLESS = [r["instruction"] for r in builtin("harmless")[:6]]


@pytest.fixture(scope="module")
def setup(tokenizer):
    """A tiny llama, four candidate directions read at layers 1-3, and validation prompts."""
    model = build_model("llama", len(tokenizer), n_layers=4)
    n_pos = len(post_instruction_ids(tokenizer))
    cands = extract(model, tokenizer, format_prompts(tokenizer, HARMFUL), format_prompts(tokenizer, HARMLESS), n_pos)
    picks = [(-1, 1), (-1, 2), (-2, 2), (-1, 3)]
    dirs = [cands.direction(p, layer) for p, layer in picks]
    hv, bv = format_prompts(tokenizer, HARMFUL[:3]), format_prompts(tokenizer, HARMLESS[:3])
    return model, dirs, hv, bv, refusal_token_ids(tokenizer)


def _direct(model, tokenizer, members, hv, bv, rids):
    """Bypass, induce and KL of a set through the plain hook shorthands, one forward per condition."""
    from contextlib import ExitStack

    rids = torch.tensor(rids)
    h, b = tokenize(tokenizer, hv, "cpu"), tokenize(tokenizer, bv, "cpu")
    base = last_logits(model, b.input_ids, b.attention_mask)
    basis = members[0].stack(*members[1:]) if len(members) > 1 else members[0]
    with basis.ablate(model):
        bypass = refusal_score(last_logits(model, h.input_ids, h.attention_mask), rids).mean()
        abl = last_logits(model, b.input_ids, b.attention_mask)
    kl = kl_div(torch.log_softmax(base.float(), -1), torch.log_softmax(abl.float(), -1)).mean()
    with ExitStack() as stack:
        for d in members:
            stack.enter_context(d.add(model))
        induce = refusal_score(last_logits(model, b.input_ids, b.attention_mask), rids).mean()
    return float(bypass), float(induce), float(kl)


def test_search_scores_equal_each_set_hook_by_hook(setup, tokenizer):
    model, dirs, hv, bv, rids = setup
    res = search_sets(model, tokenizer, dirs, hv, bv, rids, k_max=3, beam=2, kl_threshold=1e9,
                      induce_threshold=-1e9, batch_size=16)
    sizes = [s.size for s in res.sets]
    # 4 singletons; pairs extending the 2 kept singletons (deduplicated); triples extending the 2 kept pairs
    assert sizes.count(1) == 4 and 5 <= sizes.count(2) <= 6 and 1 <= sizes.count(3) <= 4
    assert len({s.members for s in res.sets}) == len(res.sets)  # no set scored twice
    for k in (1, 2, 3):  # one set of each size, checked against the plain hooks
        s = [x for x in res.sets if x.size == k][-1]
        want = _direct(model, tokenizer, [dirs[i] for i in s.members], hv, bv, rids)
        assert s.bypass == pytest.approx(want[0], abs=2e-3)
        assert s.induce == pytest.approx(want[1], abs=2e-3)
        assert s.kl == pytest.approx(want[2], abs=2e-4)
    # each kept beam is the best of its size; every larger set extends a kept smaller one
    for k, kept in res.kept.items():
        same = res.ordered([s for s in res.sets if s.size == k])
        assert kept == [s.members for s in same[:2]]
        if k > 1:
            assert all(any(set(p) < set(m) for p in res.kept[k - 1]) for m in [s.members for s in same])
    best = res.best
    assert best.bypass == min(s.bypass for s in res.sets)
    assert res.best_of_size(1).members in res.kept[1]
    assert not torch.isnan(torch.tensor(res.baseline_harmful))


def test_greedy_and_the_objective_filters(setup, tokenizer):
    model, dirs, hv, bv, rids = setup
    # a candidate parallel to candidate 0 adds nothing to its span: the pair {0, 1} ablates what {0} does
    par = Direction(2.5 * dirs[0].vector, dirs[0].layer, dirs[0].pos)
    cands = [dirs[0], par, dirs[2]]
    res = search_sets(model, tokenizer, cands, hv, bv, rids, k_max=2, beam=1, kl_threshold=1e9,
                      induce_threshold=-1e9, batch_size=64)
    assert [len(v) for v in res.kept.values()] == [1, 1]
    pairs = [s for s in res.sets if s.size == 2]
    assert len(pairs) == 2 and res.kept[2][0] == min(pairs, key=lambda s: s.bypass).members
    assert set(res.kept[1][0]) < set(res.kept[2][0])
    # with a KL threshold no set meets, nothing passes, and direction() says so
    strict = score_sets(model, tokenizer, dirs, [[0], [0, 1]], hv, bv, rids, kl_threshold=-1.0)
    assert strict.best is None and not any(s.passes for s in strict.sets)
    with pytest.raises(RefusalError, match="No direction set passed"):
        strict.direction()
    # the induce filter: only sets that induce more than the threshold pass, and the best is the lowest bypass
    thr = sorted(s.induce for s in res.sets)[len(res.sets) // 2]
    ok = [s for s in res.sets if s.induce > thr]
    res2 = SetSearch(res.candidates, [ScoredSet(s.members, s.bypass, s.induce, s.kl, s.induce > thr)
                                      for s in res.sets], {}, 0.0, 0.0, 1e9, thr)
    assert ok and res2.best.bypass == min(s.bypass for s in ok)


def test_parallel_pair_equals_single(setup, tokenizer):
    model, dirs, hv, bv, rids = setup
    par = Direction(-3.0 * dirs[1].vector, dirs[1].layer, dirs[1].pos)
    res = score_sets(model, tokenizer, [dirs[1], par], [[0], [0, 1]], hv, bv, rids, kl_threshold=1e9,
                     induce_threshold=1e9)
    assert not any(s.passes for s in res.sets)  # no set induces that much
    assert res.get([0, 1]).bypass == pytest.approx(res.get([0]).bypass, abs=1e-4)
    assert res.get([0, 1]).kl == pytest.approx(res.get([0]).kl, abs=1e-5)


def test_pareto_front_plot_and_json(tmp_path):
    d = [Direction(torch.randn(8), i, -1) for i in range(4)]
    sets = [ScoredSet((0,), 1.0, 0.5, 0.01, True), ScoredSet((1,), 0.5, 0.5, 0.05, True),
            ScoredSet((0, 1), 0.6, 0.5, 0.08, True), ScoredSet((2,), 2.0, 0.1, 0.001, True),
            ScoredSet((0, 2), -1.0, 0.2, 0.5, False), ScoredSet((3,), float("nan"), 0.0, 0.2, False)]
    res = SetSearch(d, sets, {1: [(1,)]}, 3.0, -2.0, kl_threshold=0.1)
    assert [s.members for s in res.pareto()] == [(2,), (0,), (1,), (0, 2)]  # (0, 1) is beaten by (1,)
    assert res.best.members == (1,)  # (0, 2) bypasses more but fails the KL filter
    assert res.ordered()[-1].members in {(0, 2), (3,)}
    plot_pareto(res, tmp_path / "p.png", ranks=[5, 6, 7, 8])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    j = json.loads(json.dumps(res.to_json(ranks=[5, 6, 7, 8])))
    assert j["best"]["ranks"] == [6] and j["sets"][0]["ranks"] == [6]
    assert j["kept"] == {"1": [[6]]} and [p["ranks"] for p in j["pareto"]][0] == [7]
    assert {"bypass", "induce", "kl", "members", "size", "passes"} <= set(j["sets"][0])


def test_set_direction_saved_beside_the_others(setup, tokenizer, tmp_path):
    model, dirs, hv, bv, rids = setup
    named = [Direction(x.vectors, x.layer, x.pos, "tiny@1", "diff_means", data_digest="abc") for x in dirs]
    res = score_sets(model, tokenizer, named, [[0, 2], [1]], hv, bv, rids, kl_threshold=1e9, induce_threshold=-1e9)
    d = res.direction(res.get([0, 2]), ranks=[3, 4, 5, 6])
    assert d.vectors.shape == (2, 64) and d.method == "set" and d.model == "tiny@1" and d.data_digest == "abc"
    torch.testing.assert_close(d.vectors, torch.stack([dirs[0].vector, dirs[2].vector]))
    assert [m["rank"] for m in d.extra["members"]] == [3, 5] and d.extra["members"][1]["layer"] == dirs[2].layer
    assert set(d.scores) == {"bypass", "induce", "kl"}
    path = tmp_path / "directions.safetensors"
    again = Direction(named[0].vectors.clone(), named[0].layer, named[0].pos)  # own storage: safetensors wants it
    DirectionSet([("selected", named[0]), ("0", again), ("1", named[1])]).save(path)
    add_to_directions(path, d)
    back = DirectionSet.load(path)
    assert list(back) == ["selected", "0", "1", "set"] and back["set"].method == "set"
    torch.testing.assert_close(back["set"].vectors, d.vectors)
    torch.testing.assert_close(back["1"].vectors, named[1].vectors)
    with pytest.raises(RefusalError, match="No direction set"):
        add_to_directions(tmp_path / "missing.safetensors", d)


def test_bad_inputs(setup, tokenizer):
    model, dirs, hv, bv, rids = setup
    with pytest.raises(RefusalError, match="another model"):
        search_sets(model, tokenizer, [dirs[0], Direction(torch.randn(32), 1, -1)], hv, bv, rids)
    with pytest.raises(RefusalError, match="at least 1"):
        search_sets(model, tokenizer, dirs, hv, bv, rids, beam=0)
    with pytest.raises(RefusalError, match="outside"):
        score_sets(model, tokenizer, dirs, [[0, 9]], hv, bv, rids)
    with pytest.raises(RefusalError, match="no source layer"):
        score_sets(model, tokenizer, [Direction(torch.randn(64))], [[0]], hv, bv, rids)
    with pytest.raises(RefusalError, match="validation prompts"):
        score_sets(model, tokenizer, dirs, [[0]], hv, [], rids)


# ---- the command on a tiny run folder ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tokenizer, tmp_path_factory):
    """A tiny qwen2 run folder after extract and select (filters open, so every candidate is ranked)."""
    from refusal.config import resolve
    from refusal.runs.pipeline import Run

    root = tmp_path_factory.mktemp("sets-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_HOME", str(root / "home"))
        m = build_model("qwen2", len(tokenizer), n_layers=5)
        m.save_pretrained(root / "tiny-qwen2")
        tokenizer.save_pretrained(root / "tiny-qwen2")
        h, b = root / "harmful.json", root / "harmless.json"
        h.write_text(json.dumps(builtin("harmful")[:12]))
        b.write_text(json.dumps(builtin("harmless")[:12]))
        cfg = root / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({"data": {"n_train": 4, "n_val": 3, "n_test": 2, "filter": False},
                                       "select": {"kl_threshold": 1e9, "induce_threshold": -1e9},
                                       "device": "cpu", "preset": "paper"}))
        c = resolve(cfg, {"model": str(root / "tiny-qwen2"), "output": str(root / "runs"),
                          "data": {"harmful": str(h), "harmless": str(b)}})
        Run(c).run(("extract", "select"))
    return root / "runs" / "tiny-qwen2"


def _fail(args) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Error:" in r.output and "Fix:" in r.output
    return " ".join(r.output.split())


def test_sets_command_searches_writes_and_saves(run_dir):
    ranked = io.read_json(run_dir / "scores.json")["ranked"]
    assert len(ranked) >= 4
    r = runner.invoke(app, ["sets", str(run_dir), "--k", "2", "--beam", "2", "--pool", "4"])
    assert r.exit_code == 0, r.output
    assert "size" in r.output and "bypass" in r.output and "Saved ranks" in r.output
    j = io.read_json(run_dir / "sets.json")
    assert j["settings"]["beam"] == 2 and j["settings"]["pool"] == 4 and len(j["candidates"]) == 4
    assert [c["layer"] for c in j["candidates"]] == [x["layer"] for x in ranked[:4]]
    assert sum(s["size"] == 1 for s in j["sets"]) == 4 and j["best"] is not None and j["pareto"]
    assert (run_dir / "sets.png").read_bytes()[:4] == b"\x89PNG"
    ds = RunFolder(run_dir).directions()  # the saved set is its own artifact (sets.safetensors), read with the rest
    assert "selected" in ds and "0" in ds and ds["set"].method == "set"
    assert ds["set"].k == len(j["best"]["ranks"])
    assert [m["rank"] for m in ds["set"].extra["members"]] == j["best"]["ranks"]
    assert ds["set"].model == ds["selected"].model

    # given sets only: exactly those are scored, in batched forwards
    r = runner.invoke(app, ["sets", str(run_dir), "--directions", "0-1", "--directions", "0,3", "--no-save"])
    assert r.exit_code == 0, r.output
    j = io.read_json(run_dir / "sets.json")
    assert sorted(s["ranks"] for s in j["sets"]) == [[0, 1], [0, 3]] and j["settings"]["beam"] is None


def test_sets_command_errors(run_dir, tmp_path, tokenizer):
    n = len(io.read_json(run_dir / "scores.json")["ranked"])
    assert "out of range" in _fail(["sets", str(run_dir), "--directions", f"0-{n + 3}"])
    assert "Cannot read the ranks" in _fail(["sets", str(run_dir), "--directions", "a-b"])
    assert "not a run folder" in _fail(["sets", str(tmp_path)])
    # a run without select
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    msg = _fail(["sets", str(bare)])
    assert "no finished select" in msg and "refusal select" in msg
    # candidates from another model (another hidden size) beside this run's selection
    import shutil

    from refusal.directions.diff_means import Candidates

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    c = Candidates.load(other / "candidates.safetensors")
    Candidates(torch.randn(*c.harmful_mean.shape[:2], 32), torch.randn(*c.harmful_mean.shape[:2], 32),
               c.positions).save(other / "candidates.safetensors")
    assert "another model" in _fail(["sets", str(other), "--k", "1"])
