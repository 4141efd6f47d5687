"""Cross-lingual runs on a tiny model: per-language runs, transfer matrix, similarity, plots, resume, and the
translation-quality gate."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from refusal import io
from refusal.cli import app
from refusal.config import resolve
from refusal.crosslingual.inputs import language_phrases, parse_files, parse_languages
from refusal.crosslingual.plots import resource_order
from refusal.crosslingual.runs import Crosslingual
from refusal.crosslingual.similarity import direction_similarity, layer_curves
from refusal.data import builtin
from refusal.directions.base import Direction
from refusal.directions.diff_means import Candidates
from refusal.errors import RefusalError

runner = CliRunner()
FOLDER_SIZES = {"train": 5, "val": 3, "test": 3}
LANGS = ("fr", "sw")


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")


@pytest.fixture
def poly(tmp_path):
    """A PolyRefuse-style folder (fr, sw; English test files with the original beside the "translation") and a
    paper-style English folder for train/val. "Translations" are the English prompts with a language tag."""
    root, eng = tmp_path / "polyrefuse", tmp_path / "paper"
    for kind in ("harmful", "harmless"):
        texts = [r["instruction"] for r in builtin(kind)]
        start = 0
        for split, n in FOLDER_SIZES.items():
            english = texts[start:start + n]
            start += n
            for lang in LANGS:
                if split == "test":
                    rows = [{"instruction": e, "instruction_translated": f"[{lang}] {e}", "category": "c"}
                            for e in english]
                else:
                    rows = [{"instruction": f"[{lang}] {e}", "category": "c"} for e in english]
                _write(root / f"{kind}_{split}_{lang}.json", rows)
            if split == "test":
                _write(root / f"{kind}_test_en.json",
                       [{"instruction": e, "instruction_translated": e, "category": "c"} for e in english])
            else:
                _write(eng / "splits" / f"{kind}_{split}.json", [{"instruction": e, "category": "c"} for e in english])
    return root, eng


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "cfg.yaml"
    # a random model refuses nothing: open the selection filters so that every language gets a direction
    p.write_text(yaml.safe_dump({"data": {"n_train": 4, "n_val": 2, "n_test": 2, "filter": False},
                                 "select": {"kl_threshold": 1e9, "induce_threshold": -1e9},
                                 "generate": {"max_new_tokens": 3}, "device": "cpu", "preset": "paper"}))
    return p


def _counter(monkeypatch, target: str, calls: list):
    module, _, name = target.rpartition(".")
    import importlib

    mod = importlib.import_module(module)
    real = getattr(mod, name)

    def wrapped(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, wrapped)
    return real


def test_crosslingual_end_to_end_resumes_and_batches_the_transfer(model_dir, poly, cfg_file, tmp_path, monkeypatch):
    root, eng = poly
    out = tmp_path / "runs"
    gen_calls: list = []
    _counter(monkeypatch, "refusal.crosslingual.transfer.generate", gen_calls)
    args = ["crosslingual", "--model", str(model_dir), "--languages", "en,fr,sw", "--polyrefuse", str(root),
            "--paper", str(eng), "--config", str(cfg_file), "--output", str(out), "--name", "xl"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    d = out / "xl"
    for f in ("config.yaml", "prompts.json", "prompts.done.json", "transfer.json", "transfer_completions.json",
              "similarity.json", "summary.json", "transfer_ablation.png", "transfer_addition.png",
              "transfer_kl.png", "similarity.png", "layer_similarity.png", "transfer.done.json",
              "similarity.done.json", "plots.done.json"):
        assert (d / f).is_file(), f
    assert not (d / "transfer.partial.json").exists()
    for lang in ("en", "fr", "sw"):
        for f in ("splits.json", "candidates.safetensors", "scores.json", "direction.safetensors",
                  "completions.json", "summary.json", "extract.done.json", "select.done.json", "generate.done.json",
                  "evaluate.done.json"):
            assert (d / lang / f).is_file(), f"{lang}/{f}"

    # every language drew the same seeded rows: sizes from the config, aligned (verified where originals are known)
    prompts = io.read_json(d / "prompts.json")
    assert prompts["alignment"]["harmful/test"] == "verified" and prompts["alignment"]["harmless/train"] == "by index"
    for kind in ("harmful", "harmless"):
        for split, n in (("train", 4), ("val", 2), ("test", 2)):
            rows = {lang: prompts["prompts"][lang][kind][split] for lang in ("en", "fr", "sw")}
            assert all(len(v) == n for v in rows.values())
            assert [f"[fr] {r['instruction']}" for r in rows["en"]] == [r["instruction"] for r in rows["fr"]]

    # the transfer: 3 x 3 matrices (row = source, column = target), the off-diagonal pairs in ONE generate call
    t = io.read_json(d / "transfer.json")
    assert t["languages"] == ["en", "fr", "sw"]
    for key in ("ablation_non_refusal", "addition_refusal", "ablation_kl", "ablation_refusal_score",
                "addition_refusal_score"):
        assert len(t[key]) == 3 and all(len(row) == 3 for row in t[key]), key
    cell = t["ablation_non_refusal"][0][2]
    assert {"count", "n", "rate", "low", "high"} <= set(cell) and cell["n"] == 2
    assert 0 <= cell["low"] <= cell["rate"] <= cell["high"] <= 1
    assert cell["judgement_confidence"] == "low" and t["judgement_confidence"]["fr"] == "high"
    assert all(c["mean"] >= 0 and c["n"] == 2 for row in t["ablation_kl"] for c in row)
    assert len(gen_calls) == 1
    (_model, _tok, prompts_arg), kwargs = gen_calls[0]
    assert len(prompts_arg) == len(kwargs["rows"]) == 6 * (2 + 2) and kwargs["plan"].n_rows == 24
    assert t["generation"]["rows_generated"] == 24

    # low-confidence judging is said, never a confident zero
    sw = io.read_json(d / "sw" / "summary.json")
    assert sw["judgement_confidence"] == "low" and sw["warnings"]
    assert io.read_json(d / "fr" / "summary.json")["judgement_confidence"] == "high"
    assert "low-confidence" in r.output

    # similarity: the selected directions' cosines and the layer curves against English
    s = io.read_json(d / "similarity.json")
    assert len(s["cosine"]) == 3 and abs(s["cosine"][1][1] - 1) < 1e-4
    curves = s["layer_curves"]
    assert curves["reference"] == "en" and set(curves["curves"]) == {"fr", "sw"}
    assert all(len(c) == 3 for c in curves["curves"].values())

    # a second run finds everything finished: no model load, no extraction
    def no_load(*a, **k):
        raise AssertionError("model loaded although every stage had finished")

    extracts: list = []
    _counter(monkeypatch, "refusal.runs.stages.extract", extracts)
    monkeypatch.setattr("refusal.runs.pipeline.load_model", no_load)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "fr: finished earlier, skipped" in r.output and not extracts and len(gen_calls) == 1

    # a run killed in fr's evaluate resumes there: fr's evaluate only (no model, nothing else redone)
    (d / "fr" / "evaluate.done.json").unlink()
    (d / "fr" / "summary.json").unlink()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "en: finished earlier, skipped" in r.output and "fr: finished earlier" not in r.output
    assert (d / "fr" / "summary.json").is_file() and not extracts and len(gen_calls) == 1
    assert "transfer: finished earlier, skipped" in r.output

    # a changed phrase list re-judges the saved completions: no model, no generation, the scores kept
    import refusal.crosslingual.runs as xl_runs

    real_phrases = xl_runs.language_phrases
    before = io.read_json(d / "transfer.json")

    def phrases(lang):
        p = real_phrases(lang)
        return {**p, "phrases": p["phrases"] + [""]} if lang == "fr" else p  # "" is in every text: all refused

    monkeypatch.setattr(xl_runs, "language_phrases", phrases)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "judged again" in " ".join(r.output.split()) and not extracts and len(gen_calls) == 1
    t = io.read_json(d / "transfer.json")
    fr = t["languages"].index("fr")
    assert all(row[fr]["rate"] == 1.0 for row in t["addition_refusal"])  # every harmless answer in fr now "refused"
    assert all(row[fr]["rate"] == 0.0 for row in t["ablation_non_refusal"])
    assert t["ablation_kl"] == before["ablation_kl"] and t["generation"] == before["generation"]
    assert t["addition_refusal"][0][0] == before["addition_refusal"][0][0]  # other columns as they were
    assert io.read_json(d / "transfer.done.json")["rejudged"] is True


class EmptyTranslator:
    name = "test:empty"

    def translate(self, texts, target, source="en"):
        return ["" for _ in texts]


def test_flagged_translations_stop_the_run_unless_allowed(model_dir, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("no model is needed to translate with a fake backend")

    monkeypatch.setattr("refusal.runs.pipeline.load_model", no_load)
    cfg = resolve(None, {"model": str(model_dir), "device": "cpu", "preset": "paper",
                         "data": {"n_train": 2, "n_val": 1, "n_test": 1, "filter": False}})
    out = tmp_path / "xl"
    with pytest.raises(RefusalError) as e:
        Crosslingual(cfg, "en,fr", translator=EmptyTranslator(), out_dir=out).run()
    assert "fr translations are flagged" in e.value.problem and "--allow-flagged" in e.value.fix
    assert (out / "translation_checks.json").is_file() and not (out / "prompts.done.json").exists()
    cache = io.read_json(out / "translations.json")
    assert len(cache["entries"]) == 8  # 2 kinds x (2 + 1 + 1) prompts, kept for the next run

    run = Crosslingual(cfg, "en,fr", translator=EmptyTranslator(), out_dir=out, allow_flagged=True)
    data = run.prompts()
    tr = data["translation"]
    assert tr["backend"] == "test:empty" and tr["languages"]["fr"]["flagged_share"] == 1.0
    assert len(tr["cache_digest"]) == 64 and tr["languages"]["fr"]["cache_digest"]
    assert data["prompts"]["fr"]["harmful"]["test"][0]["instruction"] == ""
    assert data["prompts"]["en"]["harmful"]["test"][0]["instruction"] == \
        data["prompts"]["fr"]["harmful"]["test"][0]["source_instruction"]
    assert any("allowed" in w for w in run.warnings)
    assert (out / "prompts.done.json").is_file()


def test_inputs_are_checked_before_any_model_work(model_dir, poly, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("model loaded before the inputs were checked")

    monkeypatch.setattr("refusal.runs.pipeline.load_model", no_load)
    root, eng = poly
    cfg = resolve(None, {"model": str(model_dir), "device": "cpu", "preset": "paper",
                         "data": {"n_train": 4, "n_val": 2, "n_test": 2}})
    assert parse_languages("EN, fr,fr") == ["en", "fr"]
    assert parse_files("fr=a.json,fr:harmless=b.json,de=c.csv") == {"fr": {"harmful": "a.json",
                                                                          "harmless": "b.json"},
                                                                   "de": {"harmful": "c.csv"}}
    with pytest.raises(RefusalError, match="not a language code"):
        parse_languages("en,french!")
    with pytest.raises(RefusalError, match="Cannot read"):
        parse_files("fr")
    with pytest.raises(RefusalError, match="at least two languages"):
        Crosslingual(cfg, "en", polyrefuse=root, paper=eng, out_dir=tmp_path / "x")
    with pytest.raises(RefusalError, match="leaves out"):
        Crosslingual(cfg, "en,fr", files={"de": str(tmp_path / "de.json")}, out_dir=tmp_path / "x")
    with pytest.raises(RefusalError, match="lacks"):  # no English train/val without the paper folder
        Crosslingual(cfg, "en,fr", polyrefuse=root, out_dir=tmp_path / "x")
    big = resolve(None, {"model": str(model_dir), "device": "cpu", "preset": "paper",
                         "data": {"n_train": 9, "n_val": 2, "n_test": 2}})
    with pytest.raises(RefusalError, match="fewer than the 9"):
        Crosslingual(big, "en,fr", polyrefuse=root, paper=eng, out_dir=tmp_path / "x")
    with pytest.raises(RefusalError, match="Unknown model"):
        Crosslingual(cfg, "en,fr", translator="no-such-model-xyz", out_dir=tmp_path / "x")
    # languages default to the folder's; an unknown code is judged with English phrases, at low confidence
    assert Crosslingual(cfg, None, polyrefuse=root, paper=eng, out_dir=tmp_path / "x").languages == ["en", "fr", "sw"]
    assert language_phrases("yo")["confidence"] == "low" and language_phrases("de")["confidence"] == "high"
    r = runner.invoke(app, ["crosslingual", "--model", str(model_dir), "--languages", "en,fr", "--polyrefuse",
                            str(tmp_path / "missing"), "--output", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())


def test_resource_order_and_similarity_helpers():
    order, breaks = resource_order(["sw", "xx", "de", "en", "am", "fr"])
    assert order == ["en", "fr", "de", "sw", "am", "xx"] and breaks == [2, 3, 5]
    diffs = torch.zeros(2, 3, 4)
    diffs[:, 1:, 0] = 1.0  # layer 0: no difference (as the post-instruction tokens' embeddings)
    other = diffs.clone()
    other[:, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    zero = torch.zeros(2, 3, 4)
    a, b = Candidates(diffs, zero, [-2, -1]), Candidates(other, zero, [-2, -1])
    curves = layer_curves({"en": a, "fr": b}, "en", -1)
    assert curves["curves"]["fr"] == [None, 1.0, 0.0] and curves["layers"] == [0, 1, 2]
    sim = direction_similarity({"en": Direction(torch.tensor([1.0, 0, 0]), 1, -1),
                                "fr": Direction(torch.tensor([1.0, 1.0, 0]), 2, -1)})
    assert sim["cosine"][0][1] == pytest.approx(2 ** -0.5, abs=1e-5) and sim["directions"]["fr"]["layer"] == 2


def test_languages_missing_from_the_folder_are_translated_from_its_english(model_dir, poly, tmp_path):
    """PolyRefuse lacks Swahili and Amharic: asked for with the folder, such a language is translated item by item
    from the folder's own English rows (so it stays aligned with the others); the folder's languages are read."""
    root, eng = poly
    cfg = resolve(None, {"model": str(model_dir), "device": "cpu", "preset": "paper",
                         "data": {"n_train": 4, "n_val": 2, "n_test": 2}})
    x = Crosslingual(cfg, "en,fr,am", polyrefuse=root, paper=eng, out_dir=tmp_path / "x")
    for kind in ("harmful", "harmless"):
        am, en, fr = x.pools[("am", kind)], x.pools[("en", kind)], x.pools[("fr", kind)]
        assert am.translate and not en.translate and not fr.translate
        assert am.rows == en.rows and am.origin == en.origin
    assert x._translating


def test_a_language_without_a_direction_stays_a_target(model_dir, poly, cfg_file, tmp_path, monkeypatch):
    """A language the model does not refuse in yields no direction (selection finds no candidate): the run goes on,
    records why, applies the other languages' directions to its prompts (its column), leaves its row empty, and
    takes its baseline rates from baseline rows of the same one-batch generation; a second run skips it."""
    import refusal.runs.stages as stages
    from refusal.errors import NoDirectionError

    root, eng = poly
    real_choose = stages.choose

    def choose(scores, **kw):
        if stages_dir[0].name == "sw":
            raise NoDirectionError("No candidate direction passed the filters (test).", "Loosen them.")
        return real_choose(scores, **kw)

    stages_dir = [None]
    real_select = stages.select

    def select(run, *a, **kw):
        stages_dir[0] = run.dir
        return real_select(run, *a, **kw)

    monkeypatch.setattr(stages, "choose", choose)
    monkeypatch.setattr(stages, "select", select)
    gen_calls: list = []
    _counter(monkeypatch, "refusal.crosslingual.transfer.generate", gen_calls)
    out = tmp_path / "runs"
    args = ["crosslingual", "--model", str(model_dir), "--languages", "en,fr,sw", "--polyrefuse", str(root),
            "--paper", str(eng), "--config", str(cfg_file), "--output", str(out), "--name", "xl"]
    r = runner.invoke(app, args)
    import traceback
    assert r.exit_code == 0, "".join(traceback.format_exception(*r.exc_info)) if r.exc_info else r.output
    d = out / "xl"
    t = io.read_json(d / "transfer.json")
    assert t["sources"] == ["en", "fr"] and t["no_direction"] == ["sw"]
    sw = t["languages"].index("sw")
    for key in ("ablation_non_refusal", "addition_refusal", "ablation_kl"):
        assert t[key][sw] == [None, None, None], key
        assert all(t[key][i][sw] is not None for i in range(3) if i != sw), key  # en's and fr's on sw's prompts
    assert t["baseline"]["sw"]["harmful_non_refusal"]["n"] == 2 and "harmful_refusal_score" in t["baseline"]["sw"]
    (_m, _t, prompts_arg), kwargs = gen_calls[0]
    assert len(gen_calls) == 1 and len(kwargs["rows"]) == 4 * (2 + 2) + (2 + 2)  # 4 off-diagonal pairs + sw baseline
    s = io.read_json(d / "summary.json")
    assert s["languages_summary"]["sw"]["selected"] is None and "no_direction" in s["languages_summary"]["sw"]
    assert any("sw: no refusal direction" in w for w in s["warnings"])
    assert io.read_json(d / "similarity.json")["languages"] == ["en", "fr"]
    assert all((d / p).is_file() for p in Crosslingual.PLOTS)
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "sw: finished earlier" in " ".join(r.output.split())

    # the report of the cross-lingual folder: each language's rates, the matrices as grids, the heatmaps embedded
    from refusal.report import write_report

    html, md = write_report(d, tmp_path / "report")
    text = md.read_text()
    assert "## Cross-lingual" in text and "Each language's own run" in text and "no direction" in text
    assert "Non-refusal on the target's harmful prompts" in text and "Cosine similarity" in text
    assert "No direction in sw" in text and "summary.json holds no results" not in text
    assert html.read_text().count('src="data:image/png;base64,') == len(Crosslingual.PLOTS)
