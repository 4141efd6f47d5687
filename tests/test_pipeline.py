"""The staged pipeline and the CLI on a tiny local model: outputs, resume, and every bad input's error."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from refusal import io
from refusal.cli import app
from refusal.config import resolve
from refusal.errors import RefusalError
from refusal.runs.pipeline import STAGES, Run

runner = CliRunner()


@pytest.fixture
def datasets(tmp_path):
    from refusal.data import builtin

    h = tmp_path / "harmful.json"
    b = tmp_path / "harmless.jsonl"
    h.write_text(json.dumps(builtin("harmful")[:12]))
    b.write_text("\n".join(json.dumps({"prompt": r["instruction"]}) for r in builtin("harmless")[:12]))
    return h, b


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "cfg.yaml"
    # a random model refuses nothing: open the filters so that a candidate is chosen
    p.write_text(yaml.safe_dump({"data": {"n_train": 4, "n_val": 3, "n_test": 3, "filter": False},
                                 "select": {"kl_threshold": 1e9, "induce_threshold": -1e9},
                                 "generate": {"max_new_tokens": 4}, "device": "cpu", "preset": "paper"}))
    return p


def _args(model_dir, datasets, cfg_file, out, *extra):
    return ["--model", str(model_dir), "--harmful", str(datasets[0]), "--harmless", str(datasets[1]),
            "--config", str(cfg_file), "--output", str(out), *extra]


def test_run_writes_every_artifact_and_resumes(model_dir, datasets, cfg_file, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    r = runner.invoke(app, ["run", *_args(model_dir, datasets, cfg_file, out)])
    assert r.exit_code == 0, r.output
    run_dir = out / "tiny-qwen2"
    for f in ("config.yaml", "splits.json", "candidates.safetensors", "scores.json", "scores.png",
              "direction.safetensors", "completions.json", "judgements.json", "summary.json"):
        assert (run_dir / f).exists(), f
    s = io.read_json(run_dir / "summary.json")
    assert set(s["harmful"]) == {"baseline", "ablation", "actadd"} and set(s["harmless"]) == {"baseline", "actadd"}
    assert s["n_harmful"] == 3 and s["n_harmless"] == 3 and s["device"] == "cpu"
    assert set(s["selected"]) == {"pos", "layer"}
    assert set(s["stage_seconds"]) >= set(STAGES)
    comps = io.read_json(run_dir / "completions.json")
    assert len(comps["harmful"]["ablation"]) == 3 and "refusal_score" in comps["harmful"]["ablation"][0]

    # a second run finds every stage finished and loads no model
    def no_load(*a, **k):
        raise AssertionError("model loaded although every stage had finished")

    monkeypatch.setattr("refusal.runs.pipeline.load_model", no_load)
    r = runner.invoke(app, ["run", *_args(model_dir, datasets, cfg_file, out)])
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output


def test_killed_run_resumes_from_first_unfinished_stage(model_dir, datasets, cfg_file, tmp_path, monkeypatch):
    cfg = resolve(cfg_file, {"model": str(model_dir), "output": str(tmp_path / "runs"),
                             "data": {"harmful": str(datasets[0]), "harmless": str(datasets[1])}})
    calls = []

    def killed(self):
        calls.append("generate")
        raise KeyboardInterrupt  # the process dies in the middle of generation

    monkeypatch.setattr(Run, "_generate", killed)
    with pytest.raises(KeyboardInterrupt):
        Run(cfg).run()
    run = Run(cfg)
    assert run.done("extract") and run.done("select") and not run.done("generate")
    assert not (run.dir / "completions.json").exists()
    monkeypatch.undo()

    counted = {s: 0 for s in STAGES}
    for s in STAGES:
        orig = getattr(Run, f"_{s}")

        def wrapped(self, orig=orig, s=s):
            counted[s] += 1
            return orig(self)
        monkeypatch.setattr(Run, f"_{s}", wrapped)
    Run(cfg).run()
    assert counted == {"extract": 0, "select": 0, "generate": 1, "evaluate": 1}
    # --from-stage redoes that stage and the later ones only
    Run(cfg).run(from_stage="select")
    assert counted == {"extract": 0, "select": 1, "generate": 2, "evaluate": 2}
    # redoing one stage on its own leaves the later ones unfinished, so the next run redoes them too
    Run(cfg).run(("select",), force=True)
    assert not Run(cfg).done("generate") and not Run(cfg).done("evaluate")
    summary = Run(cfg).run()
    assert counted == {"extract": 0, "select": 2, "generate": 3, "evaluate": 3}
    assert summary["stage_seconds"]["evaluate"] is not None


def test_stage_subcommands(model_dir, datasets, cfg_file, tmp_path):
    out = tmp_path / "runs"
    r = runner.invoke(app, ["select", *_args(model_dir, datasets, cfg_file, out)])
    assert r.exit_code == 2 and "needs stage 'extract'" in r.output
    r = runner.invoke(app, ["extract", *_args(model_dir, datasets, cfg_file, out)])
    assert r.exit_code == 0, r.output
    assert (out / "tiny-qwen2" / "extract.done.json").exists()
    assert not (out / "tiny-qwen2" / "select.done.json").exists()


def _error(args) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Error:" in r.output and "Fix:" in r.output
    return " ".join(r.output.split())


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be caught before any model is loaded."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr("refusal.runs.pipeline.load_model", boom)


def test_unknown_model(no_model_load, tmp_path):
    assert "Unknown model 'not a model!'" in _error(["run", "--model", "not a model!", "--output", str(tmp_path)])
    assert "does not exist" in _error(["run", "--model", str(tmp_path / "x.gguf"), "--output", str(tmp_path)])
    assert "no config.json" in _error(["run", "--model", str(tmp_path), "--output", str(tmp_path)])


def test_bad_datasets(no_model_load, model_dir, datasets, cfg_file, tmp_path):
    base = ["run", "--model", str(model_dir), "--config", str(cfg_file), "--output", str(tmp_path / "r")]
    assert "does not exist" in _error(base + ["--harmful", str(tmp_path / "missing.json")])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in _error(base + ["--harmful", str(empty)])
    nofield = tmp_path / "nofield.json"
    nofield.write_text(json.dumps([{"foo": "bar"}]))
    assert "no instruction field" in _error(base + ["--harmful", str(nofield)])
    msg = _error(base + ["--harmful", str(datasets[0]), "--harmless", str(datasets[1]), "--n-train", "50"])
    assert "fewer than" in msg and "harmful" in msg


def test_unknown_stage_and_config_mismatch(model_dir, datasets, cfg_file, tmp_path):
    args = _args(model_dir, datasets, cfg_file, tmp_path / "runs")
    assert "Unknown stage 'bogus'" in _error(["run", *args, "--from-stage", "bogus"])
    r = runner.invoke(app, ["extract", *args])
    assert r.exit_code == 0, r.output
    before = (tmp_path / "runs" / "tiny-qwen2" / "candidates.safetensors").read_bytes()
    msg = _error(["run", *args, "--seed", "7"])
    assert "another config" in msg and "--force" in msg
    assert (tmp_path / "runs" / "tiny-qwen2" / "candidates.safetensors").read_bytes() == before  # untouched


def test_bad_config_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  n_trian: 3\n")
    with pytest.raises(RefusalError, match="Unknown config key 'n_trian'"):
        resolve(p)


def test_config_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  n_val: 5\n  n_test: 7\n")
    cpu = resolve(p, {"data": {"n_test": 9}}, has_gpu=False)
    assert cpu.preset == "cpu" and cpu.data.n_train == 24 and cpu.select.layer_stride == 4  # preset
    assert cpu.data.n_val == 5 and cpu.data.n_test == 9  # file over preset, flag over file
    gpu = resolve(None, None, has_gpu=True)
    assert gpu.preset == "paper" and gpu.data.n_train == 128 and gpu.generate.max_new_tokens == 256
    assert gpu.digest() != cpu.digest()


def test_oom_halves_batch(monkeypatch):
    import torch

    from refusal.batching import in_batches

    seen = []

    def fn(chunk):
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        seen.extend(chunk)

    assert in_batches(fn, list(range(7)), 8) == 2
    assert seen == list(range(7))
