"""The parts a cross-lingual run is composed of, without a model: stage manifests through RunFolder, the prompt plan,
a language's state, config and run (a main-pipeline Run on a model it does not own), and the run's headline."""

from __future__ import annotations

import json

import pytest

from refusal import io
from refusal.config import resolve
from refusal.crosslingual.language_stage import Language, language_config, language_run
from refusal.crosslingual.pools import plan_prompts
from refusal.crosslingual.runs import headline
from refusal.errors import DamagedFileError, RefusalError
from refusal.runs.folder import RunFolder
from refusal.runs.pipeline import Inputs, Run, SummaryExtra


def test_stage_manifests_go_through_the_run_folder(tmp_path):
    rf = RunFolder(tmp_path / "xl")
    assert rf.manifest("transfer") is None
    rf.path.mkdir()
    io.write_json(rf.file("transfer.json"), {"languages": ["en", "fr"]})
    m = rf.write_manifest("transfer", "abc", 1.234, ["transfer.json", "absent.json"], {"generation_digest": "g"})
    assert m["seconds"] == 1.23 and m["generation_digest"] == "g" and list(m["sha256"]) == ["transfer.json"]
    assert rf.manifest("transfer", "abc") == io.read_json(rf.file("transfer.done.json")) == m
    assert rf.manifest("transfer", "other") is None and rf.manifest("transfer")["digest"] == "abc"
    rf.file("transfer.done.json").write_text("{cut", "utf-8")
    with pytest.raises(DamagedFileError):
        rf.manifest("transfer")


def test_prompt_plan_draws_every_language_alike(tmp_path):
    fr = tmp_path / "fr.json"
    fr.write_text(json.dumps([{"instruction": f"[fr] prompt {i}"} for i in range(12)]), "utf-8")
    sizes = {"train": 3, "val": 2, "test": 2}
    with pytest.raises(RefusalError, match="at least two languages"):  # the files' languages: fr alone
        plan_prompts(None, {"fr": {"harmful": str(fr)}}, None, None, sizes, 7)
    with pytest.raises(RefusalError, match="fewer than the 20"):
        plan_prompts(["fr", "en"], {"fr": {"harmful": str(fr)}}, None, None, {**sizes, "train": 16}, 7)
    plan = plan_prompts(["fr", "en"], {"fr": {"harmful": str(fr)}}, None, None, sizes, 7)
    assert plan.languages == ["fr", "en"] and plan.translating
    assert not plan.pools[("fr", "harmful")].translate and plan.pools[("fr", "harmless")].translate
    assert not plan.pools[("en", "harmless")].translate
    assert {s: len(r) for s, r in plan.chosen[("fr", "harmful")].items()} == sizes
    again = plan_prompts(["fr", "en"], {"fr": {"harmful": str(fr)}}, None, None, sizes, 7)
    assert again.chosen == plan.chosen  # seeded


def _sets():
    rows = {s: [{"instruction": f"{s} {i}"} for i in range(2)] for s in ("train", "val", "test")}
    return {"harmful": rows, "harmless": rows}


def test_a_language_state_gives_its_config_and_phrase_source(tmp_path):
    cfg = resolve(None, {"model": "x", "device": "cpu", "refusal_tokens": ["I"]})
    shipped = {"phrases": ["je ne peux"], "refusal_openings": ["Je"], "confidence": "high", "list": "fr", "note": ""}
    fr = Language("fr", shipped, sets=_sets())
    assert fr.phrase_source == "shipped" and fr.judging()["judgement_confidence"] == "high"
    c = language_config(cfg, fr, tmp_path)
    assert c.refusal_tokens == ["Je"] and c.name == "fr" and c.output == str(tmp_path)
    assert [(x.name, x.prompts) for x in c.generate.conditions] == [
        ("baseline", "harmful"), ("ablation", "harmful"), ("baseline", "harmless"), ("actadd", "harmless")]
    assert c.data.harmful.startswith("crosslingual:fr:harmful:sha256:")
    # evaluate: one substring judge with the language's phrases, the measures that need more than text switched off
    ev = c.evaluate
    assert [(j.type, j.phrases) for j in ev.judges] == [("substring", ["je ne peux"])]
    assert ev.cross_entropy == [] and not ev.benchmarks and not ev.over_refusal and ev.magnitude is False
    en = Language("en", {**shipped, "list": "en", "refusal_openings": ["Sorry"]}, sets=_sets())
    assert language_config(cfg, en, tmp_path).refusal_tokens == ["I"]  # English keeps the config's own tokens
    en.learns = True
    assert language_config(cfg, en, tmp_path).refusal_tokens == ["Sorry"]  # unless it learns its openings
    assert Language("yo", {**shipped, "list": "en"}).phrase_source == "shipped:en"
    assert Language("yo", {**shipped, "list": "learned", "source": "learned"}).phrase_source == "learned"


def test_headline_takes_a_target_only_language_from_the_transfer():
    rate = {"count": 1, "n": 4, "rate": 0.25, "low": 0.05, "high": 0.7}
    own = {"selected": {"pos": -1, "layer": 1}, "judgement_confidence": "high", "phrase_source": "shipped",
           "results": {"harmful": {"baseline": {"refusal": rate}, "ablation": {"non_refusal": rate}},
                       "harmless": {"baseline": {"refusal": rate}, "actadd": {"refusal": rate}}}}
    none = {"selected": None, "no_direction": "no candidate", "judgement_confidence": "low",
            "phrase_source": "shipped:en"}
    out = headline({"en": own, "sw": none},
                   {"baseline": {"sw": {"harmful_non_refusal": rate, "harmless_refusal": rate}}})
    assert out["en"]["harmful_ablation_non_refusal"] == rate and out["en"]["phrase_source"] == "shipped"
    assert out["sw"]["harmful_baseline_refusal"] == {"count": 3, "n": 4, "rate": 0.75, "low": 0.3, "high": 0.95}
    assert out["sw"]["no_direction"] == "no candidate" and "harmful_ablation_non_refusal" not in out["sw"]


def test_a_language_run_shares_a_model_and_adds_its_summary_fields(model_dir, tmp_path):
    from refusal.models.loading import resolve_source

    cfg = resolve(None, {"model": str(model_dir), "device": "cpu"})
    base = Run(cfg, Inputs(resolve_source(str(model_dir)), {}), tmp_path / "xl")
    loads = []

    def provide():
        loads.append(1)
        return "the model", "the tokenizer"

    base.model_provider = provide  # stands in for the shared model: nothing is loaded here
    shipped = {"phrases": ["je ne peux"], "refusal_openings": ["Je"], "confidence": "low", "list": "fr", "note": "n"}
    run = language_run(base, Language("fr", shipped, sets=_sets()), tmp_path / "xl")
    assert type(run) is Run and run.dir == tmp_path / "xl" / "fr" and run.inputs.splits["harmful"]["test"]
    assert (run.model, run.tokenizer, len(loads)) == ("the model", "the tokenizer", 1)
    extra = run.summary_extra
    assert extra.refused_by == "substring" and extra.fields["language"] == "fr"
    assert extra.fields["judgement_confidence"] == "low" and extra.fields["refusal_tokens"] == ["Je"]
    # the fixed fields are part of evaluate's digest (a changed list's confidence redoes evaluate), not the others'
    other = language_run(base, Language("fr", {**shipped, "confidence": "high"}, sets=_sets()), tmp_path / "xl")
    assert other.digests["generate"] == run.digests["generate"]
    assert other.digests["evaluate"] != run.digests["evaluate"]
    plain = Run(run.cfg, run.inputs, tmp_path / "plain")
    assert plain.digests["generate"] == run.digests["generate"] and plain.summary_extra.key() == {}
    with pytest.raises(ValueError, match="replace the summary's own language"):
        SummaryExtra({"language": "fr"}).add_to(run, {"language": "en"})


def test_damaged_files_of_a_crosslingual_run_name_its_command(tmp_path):
    root = tmp_path / "runs" / "xl"
    (root / "fr").mkdir(parents=True)
    io.write_yaml(root / "config.yaml", {"crosslingual": {"languages": ["en", "fr"]}, "model": "x"})
    io.write_yaml(root / "fr" / "config.yaml", {"model": "x"})  # a language's folder: a run's config
    for name in ("prompts.json", "transfer.json", "summary.json"):
        rf = RunFolder(root)
        rf.file(name).write_text("{cut", "utf-8")
        with pytest.raises(DamagedFileError) as e:
            rf.read_json(name)
        fix = " ".join(e.value.fix.split())
        assert "refusal crosslingual" in fix and f"--output {root.parent} --name xl" in fix, fix
        assert "refusal run" not in fix
        stage = name.removesuffix(".json")
        assert (f"Delete {root / f'{stage}.done.json'}" in fix) == (name != "summary.json"), fix
    (root / "fr" / "evaluate.done.json").write_text("{cut", "utf-8")
    with pytest.raises(DamagedFileError) as e:
        RunFolder(root / "fr").manifest("evaluate")
    fix = " ".join(e.value.fix.split())
    assert f"Delete {root / 'fr' / 'evaluate.done.json'}" in fix and "refusal crosslingual" in fix
    assert "refusal run --resume" not in fix
    main = tmp_path / "runs" / "plain"  # a main run's folder keeps its own command
    main.mkdir()
    io.write_yaml(main / "config.yaml", {"model": "x"})
    (main / "scores.json").write_text("{cut", "utf-8")
    with pytest.raises(DamagedFileError) as e:
        RunFolder(main).read_json("scores.json")
    assert "refusal run --resume" in e.value.fix and "--from-stage select" in e.value.fix
