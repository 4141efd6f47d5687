"""The fault suite: hostile but realistic input, shared folders and two processes at once. Every case ends in one
message that names the file or setting and the fix (no traceback without --debug), runs no code a saved file asks
for, and deletes nothing it should not. docs/reliability.md has the table of these cases."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from refusal import io
from refusal.cli import app
from refusal.errors import DamagedFileError, RefusalError
from refusal.runs.folder import RunFolder, widening_settings
from refusal.runs.pipeline import STAGES, Run

runner = CliRunner(env={"COLUMNS": "400"})  # no wrapped lines in the messages
SRC = Path(__file__).resolve().parents[1] / "src"


# ---- a finished run on a tiny model, made once and copied for each test --------------------------------------------

@pytest.fixture
def finished(finished_tiny_run):
    """``(model folder, run folder)``: the session's finished tiny run (conftest; copy with ``run_copy``)."""
    return finished_tiny_run


@pytest.fixture
def run_copy(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished[1], dst)
    return dst


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be caught before any model is loaded."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr("refusal.runs.pipeline.load_model", boom)
    monkeypatch.setattr("refusal.models.loading.load_model", boom)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def _error(args: list[str]) -> str:
    """The message of a command that must fail cleanly: exit 2, "Error:" and "Fix:", no traceback."""
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "Error:" in r.output and "Fix:" in r.output and "Traceback" not in r.output, r.output
    return " ".join(r.output.split())


def _cli(args: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real ``refusal`` command in a new process (Hugging Face's module cache in a temporary folder)."""
    e = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "400", **(env or {})}
    return subprocess.run([sys.executable, "-m", "refusal", *map(str, args)], capture_output=True, text=True, env=e,
                          timeout=timeout)


# ---- 1. trust only what the user says now ----------------------------------------------------------------------

def _evil_run(finished, tmp_path) -> tuple[Path, Path, Path]:
    """A shared run folder whose config.yaml says trust_remote_code: true (its digests made consistent, as an honest
    run made with the flag would have them), over a model folder whose config.json maps AutoConfig to code that
    writes a marker file when imported. Returns ``(run folder, model folder, marker)``."""
    model = tmp_path / "evil-model"
    shutil.copytree(finished[0], model)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (model / "configuration_evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("ran")
        from transformers import Qwen2Config


        class EvilConfig(Qwen2Config):
            pass
    """))
    c = json.loads((model / "config.json").read_text())
    c["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(c))
    run_dir = tmp_path / "shared-run"
    shutil.copytree(finished[1], run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["model"] = str(model)
    saved["trust_remote_code"] = True
    saved.pop("digests")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    run = Run.open(run_dir, {"trust_remote_code": True}, force=True)  # computes digests; runs no model code
    for s in STAGES:  # the run's manifests, as a run made with this config would have written them
        m = io.read_json(run_dir / f"{s}.done.json")
        io.write_json(run_dir / f"{s}.done.json", {**m, "digest": run.digests[s]})
    io.write_yaml(run_dir / "config.yaml", {"digests": run.digests, **run.recorded_config()})
    assert not marker.exists()
    return run_dir, model, marker


def test_saved_trust_remote_code_is_not_obeyed_by_control_vector(finished, tmp_path):
    run_dir, _, marker = _evil_run(finished, tmp_path)
    r = _cli(["control-vector", run_dir, "--out", tmp_path / "x.gguf", "--layer", "2"],
             {"HF_MODULES_CACHE": str(tmp_path / "hfm")})
    assert not marker.exists(), "code from the model folder ran on the saved config's word"
    assert "Traceback" not in r.stderr, r.stderr
    assert "asks for trust_remote_code" in r.stderr and "config.yaml" in r.stderr
    assert r.returncode == 0 and (tmp_path / "x.gguf").is_file(), r.stderr


def test_saved_trust_remote_code_is_not_obeyed_by_resume(finished, tmp_path):
    run_dir, _, marker = _evil_run(finished, tmp_path)
    r = _cli(["run", "--resume", run_dir, "--max-new-tokens", "1"], {"HF_MODULES_CACHE": str(tmp_path / "hfm")},
             timeout=300)
    assert not marker.exists(), "code from the model folder ran on the saved config's word"
    assert "Traceback" not in r.stderr, r.stderr
    assert "asks for trust_remote_code" in r.stderr
    assert r.returncode == 0, r.stderr
    # recorded as saved (the run's digests do not change), obeyed only when granted now
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trust_remote_code"] is True
    assert "extract: finished earlier, skipped" in " ".join(r.stderr.split())


def test_trust_comes_from_the_call_not_the_folder(run_copy):
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    saved["trust_remote_code"] = True
    saved["evaluate"]["judges"] = [{"type": "substring"}, {"type": "llm", "model": "x/y", "trust_remote_code": True}]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert widening_settings(saved) == [("trust_remote_code",), ("evaluate", "judges", 1, "trust_remote_code")]
    run = Run.open(run_copy, force=True)
    assert run.cfg.trust_remote_code is False and run.cfg.evaluate.judges[1]["trust_remote_code"] is False
    rec = run.recorded_config()
    assert rec["trust_remote_code"] is True and rec["evaluate"]["judges"][1]["trust_remote_code"] is True
    granted = Run.open(run_copy, {"trust_remote_code": True}, force=True)
    assert granted.cfg.trust_remote_code is True and granted.cfg.evaluate.judges[1]["trust_remote_code"] is True
    assert granted.digests == run.digests  # the record is the same; only what may run differs


# ---- 2. a run folder is validated before anything is written ---------------------------------------------------

def _cut_at_line(text: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(lines[: len(lines) // 2])


def _cut_mid_line(text: str) -> str:
    return text[: len(text) // 2 + 3]


@pytest.mark.parametrize("damage, expect", [
    (lambda t: "", "it is empty"),
    (lambda t: "\x00\x01 garbage: [unclosed\n", "not valid YAML"),
    (lambda t: "- a\n- b\n", "holds a list"),
    (_cut_at_line, "it lacks"),
    (_cut_mid_line, "damaged"),
    (lambda t: t.replace("max_new_tokens: 2", "max_new_tokens: 3"), "no longer reproduces the digests"),
], ids=["empty", "garbage", "list", "cut-at-line", "cut-mid-line", "edited"])
def test_damaged_config_stops_before_anything_is_written(run_copy, no_model_load, damage, expect):
    p = run_copy / "config.yaml"
    p.write_text(damage(p.read_text()))
    before = _snapshot(run_copy)
    msg = _error(["run", "--resume", run_copy])
    assert expect in msg and "config.yaml" in msg, msg
    assert _snapshot(run_copy) == before  # nothing deleted or rewritten: every manifest is still there


def test_edited_config_is_accepted_with_from_stage(run_copy, no_model_load):
    p = run_copy / "config.yaml"
    p.write_text(p.read_text().replace("max_new_tokens: 2", "max_new_tokens: 3"))
    assert "--from-stage generate" in _error(["run", "--resume", run_copy])
    run = Run.open(run_copy, from_stage="generate")
    assert run.cfg.generate.max_new_tokens == 3 and run.done("select") and not run.done("generate")


@pytest.mark.parametrize("command", [
    ["select"], ["sets"], ["control-vector", "--out", "{tmp}/cv.gguf"], ["abliterate", "--out", "{tmp}/abl"],
    ["chat"]])
def test_every_command_checks_the_config(run_copy, tmp_path, no_model_load, command):
    (run_copy / "config.yaml").write_text("[1, 2")
    args = [command[0], run_copy, *(a.format(tmp=tmp_path) for a in command[1:])]
    assert "config.yaml is damaged" in _error(args)


@pytest.mark.parametrize("name, command, redo", [
    ("candidates.safetensors", ["select", "{run}", "--from-stage", "select"], "--from-stage extract"),
    ("splits.json", ["generate", "{run}", "--from-stage", "generate"], "--from-stage extract"),
    ("completions.json", ["evaluate", "{run}", "--from-stage", "evaluate"], "--from-stage generate"),
    ("select.done.json", ["run", "--resume", "{run}"], "--from-stage select"),
    ("direction.safetensors", ["control-vector", "{run}", "--out", "{tmp}/cv.gguf", "--layer", "2"],
     "--from-stage select"),
    ("directions.safetensors", ["sets", "{run}"], "--from-stage select"),
    ("scores.json", ["sets", "{run}"], "--from-stage select"),
])
@pytest.mark.parametrize("how", ["truncated", "foreign"])
def test_damaged_artifact_names_the_file_and_the_stage_that_redoes_it(run_copy, tmp_path, name, command, redo, how):
    p = run_copy / name
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x89PNG\r\n\x1a\n not this file at all")
    msg = _error([a.format(run=run_copy, tmp=tmp_path) for a in command])
    assert f"{name} is damaged" in msg and redo in msg, msg


def test_finished_stage_whose_artifact_changed_is_not_trusted(run_copy, no_model_load):
    p = run_copy / "completions.json"
    comps = json.loads(p.read_text())
    comps["harmful"]["baseline"][0]["completion"] = "edited by hand"
    p.write_text(json.dumps(comps))  # valid JSON, another content
    msg = _error(["run", "--resume", run_copy])
    assert "completions.json is damaged (it changed after generate wrote it" in msg and "--from-stage generate" in msg
    p.unlink()
    assert "completions.json is missing, although stage generate finished" in _error(["run", "--resume", run_copy])


def test_sets_records_the_directions_it_rewrites(run_copy, no_model_load):
    from refusal.directions.base import Direction
    from refusal.scoring.sets import add_to_directions

    ds = run_copy / "directions.safetensors"
    add_to_directions(ds, Direction.load(run_copy / "direction.safetensors"))  # as `refusal sets` does
    assert "directions.safetensors is damaged" in _error(["run", "--resume", run_copy])
    RunFolder(run_copy).record("select", "directions.safetensors")
    r = runner.invoke(app, ["run", "--resume", str(run_copy)])
    assert r.exit_code == 0 and "evaluate: finished earlier, skipped" in r.output, r.output


def test_json_of_another_shape_is_damaged(run_copy):
    (run_copy / "scores.json").write_text("[1, 2, 3]")
    with pytest.raises(DamagedFileError, match=r"scores.json is damaged \(it holds a list"):
        RunFolder(run_copy).read_json("scores.json")


# ---- 3. one process per run folder -----------------------------------------------------------------------------

_HOLDER = """
import sys, time
from refusal.runs.folder import RunFolder
with RunFolder(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_second_process_is_refused_at_once(run_copy):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_copy)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = _error(["run", "--resume", run_copy])  # in this process
        assert f"Another refusal process (pid {holder.pid}) is using {run_copy}" in msg
        r = _cli(["report", run_copy])  # and in a third one, through the real command
        assert r.returncode == 2 and f"(pid {holder.pid})" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    r = runner.invoke(app, ["run", "--resume", str(run_copy)])  # free again once the holder has ended
    assert r.exit_code == 0, r.output


def test_stale_lock_is_taken_over_and_temporaries_are_swept(run_copy, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_copy / ".lock").write_text(f"{dead.pid}\n")
    (run_copy / ".scores.json.k2j3h4.tmp").write_bytes(b"x" * 1000)
    (run_copy / ".abl.tmp-x8y9").mkdir()
    (run_copy / ".abl.tmp-x8y9" / "model.safetensors").write_bytes(b"y" * 1000)
    r = runner.invoke(app, ["run", "--resume", str(run_copy)])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert f"left by process {dead.pid}" in out and "temporary files" in out
    assert not (run_copy / ".scores.json.k2j3h4.tmp").exists() and not (run_copy / ".abl.tmp-x8y9").exists()
    assert (run_copy / ".lock").read_text() == ""  # released


def test_lock_is_reentrant_within_a_process(run_copy):
    rf = RunFolder(run_copy)
    with rf.lock(), rf.lock():
        assert (run_copy / ".lock").read_text().strip() == str(os.getpid())
    assert (run_copy / ".lock").read_text() == ""


# ---- 4. validate at the door, before the model loads -----------------------------------------------------------

@pytest.mark.parametrize("bad, expect", [
    ({"data": {"n_train": "ten"}}, "data.n_train must be a whole number"),
    ({"select": {"kl_threshold": "abc"}}, "select.kl_threshold must be a number"),
    ({"data": 5}, "data must be a mapping"),
    ({"extract": {"methods": "diff_means"}}, "Write it as a list: methods: [diff_means]"),
    ({"generate": {"conditions": [{"name": "a", "prompts": "harmful",
                                   "interventions": [{"op": "add", "coeff": "big"}]}]}}, "coeff must be a number"),
    ({"generate": {"conditions": [{"name": "a", "prompts": "harmful",
                                   "interventions": [{"op": "ablate", "layers": [999]}]}]}}, "model has 3 layers"),
    ({"generate": {"conditions": [{"name": "a", "prompts": "harmful",
                                   "interventions": [{"op": "ablate", "direction": "best"}]}]}}, "direction 'best'"),
    ({"select": {"layer_stride": 0}}, "select.layer_stride must be at least 1"),
])
def test_bad_config_is_refused_before_the_model_loads(finished, tmp_path, no_model_load, bad, expect):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    msg = _error(["run", "--model", finished[0], "--config", cfg, "--output", tmp_path / "runs"])
    assert expect in msg
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command, expect", [
    (["abliterate", "{run}", "--gguf", "--out", "{tmp}/model.txt"], "does not end in .gguf"),
    (["control-vector", "{run}", "--out", "{tmp}/cv.txt"], "does not end in .gguf"),
    (["control-vector", "{run}", "--out", "{tmp}/folder.gguf", "--overwrite"], "is a folder"),
    (["abliterate", "{run}", "--out", "{tmp}/taken"], "already exists"),
    (["abliterate", "{run}", "--out", "{tmp}/afile/abl"], "is a file"),
    (["sets", "{run}", "--k", "0"], "--k must be at least 1"),
    (["sets", "{run}", "--beam", "0"], "--beam must be at least 1"),
])
def test_bad_command_line_is_refused_before_the_model_loads(run_copy, tmp_path, no_model_load, command, expect):
    (tmp_path / "folder.gguf").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "afile").write_text("x")
    msg = _error([a.format(run=run_copy, tmp=tmp_path) for a in command])
    assert expect in msg


# ---- 5. errors at the boundary ---------------------------------------------------------------------------------

@pytest.mark.parametrize("errno_, expect", [(28, "The disk is full"), (13, "No permission"),
                                            (20, "is not a folder")])
def test_os_errors_become_one_line_messages(run_copy, monkeypatch, errno_, expect):
    def fail(path, data):
        raise OSError(errno_, os.strerror(errno_), str(path))
    monkeypatch.setattr(io, "write_bytes", fail)
    msg = _error(["run", "--resume", run_copy, "--max-new-tokens", "1"])
    assert expect in msg and str(run_copy) in msg


def test_output_root_that_is_a_file(finished, tmp_path, no_model_load):
    (tmp_path / "afile").write_text("x")
    msg = _error(["run", "--model", finished[0], "--output", tmp_path / "afile", "--name", "r"])
    assert "afile" in msg


def test_traceback_only_with_debug(run_copy, monkeypatch):
    from refusal.runs import stages

    def broken(run, started):
        raise ValueError("something nobody expected")
    monkeypatch.setattr(stages, "generate", broken)
    msg = _error(["run", "--resume", run_copy, "--from-stage", "generate"])
    assert "Unexpected ValueError: something nobody expected" in msg and "--debug" in msg
    r = runner.invoke(app, ["--debug", "run", "--resume", str(run_copy), "--from-stage", "generate"])
    assert isinstance(r.exception, ValueError)  # the real error, with its traceback


def test_model_folder_with_only_config_json(finished, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(finished[0] / "config.json", bare / "config.json")
    msg = _error(["run", "--model", bare, "--output", tmp_path / "runs", "--n-train", "2", "--n-val", "1",
                  "--n-test", "1", "--device", "cpu"])
    assert "Could not load the model" in msg and "model.safetensors" in msg
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no folder left for nothing


# ---- 6. files people can share ---------------------------------------------------------------------------------

def test_exports_follow_the_umask(run_copy, tmp_path):
    r = runner.invoke(app, ["abliterate", str(run_copy), "--out", str(tmp_path / "abl")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["control-vector", str(run_copy), "--out", str(tmp_path / "cv.gguf"), "--layer", "2"])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "abl").stat().st_mode) == io.DIR_MODE
    for f in (tmp_path / "abl").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == io.FILE_MODE, f
    assert stat.S_IMODE((tmp_path / "cv.gguf").stat().st_mode) == io.FILE_MODE
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or lock file left


def test_an_interrupted_export_is_swept(run_copy, tmp_path):
    left = tmp_path / ".abl.tmp-q1w2e3"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"z" * 4096)
    r = runner.invoke(app, ["abliterate", str(run_copy), "--out", str(tmp_path / "abl")])
    assert r.exit_code == 0, r.output
    assert not left.exists() and (tmp_path / "abl" / "config.json").is_file()


def test_refusal_error_is_not_swallowed_in_python(run_copy):
    (run_copy / "config.yaml").write_text("")
    with pytest.raises(RefusalError, match="config.yaml is damaged"):
        Run.open(run_copy)


# ---- 7. a saved config cannot choose network destinations ------------------------------------------------------

class _Reached(Exception):
    """Raised by a stand-in for the first thing that would touch the network: the check let the command through."""


def _let_through(args: list, env: dict | None = None) -> str:
    """The output of a command that passed the checks and reached the stand-in (reported at the boundary)."""
    r = runner.invoke(app, [str(a) for a in args], env=env)
    assert "Unexpected _Reached" in r.output, (args, r.output)
    return " ".join(r.output.split())


def _edit_saved(run_dir: Path, edit, *, consistent: bool = True) -> None:
    """Edit the run folder's config.yaml as a run made with that config would have written it (its digests and
    manifests made to agree when ``consistent``)."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    edit(saved)
    saved.pop("digests")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    if not consistent:
        return
    run = Run.open(run_dir, force=True, allow_network=True)  # computes the digests; contacts nothing
    for s in STAGES:
        m = io.read_json(run_dir / f"{s}.done.json")
        io.write_json(run_dir / f"{s}.done.json", {**m, "digest": run.digests[s]})
    io.write_yaml(run_dir / "config.yaml", {"digests": run.digests, **run.recorded_config()})


def _judge_url(saved: dict) -> None:
    saved["evaluate"]["judges"].append({"type": "openai", "url": "https://user:secret@judge.example/v1?k=s3cret",
                                        "model": "gpt", "api_key_env": "OPENAI_API_KEY"})


def _openai_backend(saved: dict) -> None:
    saved["generate"]["backend"] = "openai"
    saved["generate"]["openai"]["url"] = "http://generate.example:8000/v1"


@pytest.mark.parametrize("edit, stage, shown", [
    (_judge_url, "evaluate", "evaluate.judges[2].url = 'https://judge.example/v1'"),
    (_openai_backend, "generate", "generate.openai.url = 'http://generate.example:8000/v1'"),
], ids=["judge-url", "generate-backend-openai"])
def test_saved_server_url_is_not_used_unless_named_now(run_copy, tmp_path, monkeypatch, edit, stage, shown):
    from refusal.runs import stages

    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-users-own-key")  # what a saved judge would send to its server
    _edit_saved(run_copy, edit)
    for s in STAGES[STAGES.index(stage):]:  # as if killed during that stage: resuming would run it
        (run_copy / f"{s}.done.json").unlink()
    before = _snapshot(run_copy)
    msg = _error(["run", "--resume", run_copy])
    assert shown in msg and "--allow-network" in msg and "config.yaml" in msg, msg
    assert "secret" not in msg and "sk-the" not in msg  # what may be a credential in the URL is not echoed
    assert _snapshot(run_copy) == before  # stopped before any work
    assert shown in _error([stage, run_copy])  # the stage command alone too

    def reached(run, started):
        raise _Reached(stage)
    monkeypatch.setattr(stages, stage, reached)
    _let_through(["run", "--resume", run_copy, "--allow-network"])  # the stage itself started
    own = tmp_path / "own.yaml"  # the user's own config file, given now, names the same server: allowed
    own.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load((run_copy / "config.yaml").read_text()).items()
                                   if k in ("generate", "evaluate")}))
    _let_through(["run", "--resume", run_copy, "--config", own])


def test_saved_server_url_of_a_finished_stage_is_not_a_reason_to_stop(run_copy, no_model_load, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-users-own-key")
    _edit_saved(run_copy, _judge_url)  # evaluate finished: nothing will send anything to the judge
    r = runner.invoke(app, ["run", "--resume", str(run_copy)])
    assert r.exit_code == 0 and "evaluate: finished earlier, skipped" in " ".join(r.output.split()), r.output


def test_saved_hub_ids_are_not_used_unless_named_now(run_copy, tmp_path, monkeypatch, no_model_load):
    def hub(*a, **k):
        raise _Reached("hub")
    monkeypatch.setattr("refusal.runs.pipeline.check_hub_config", hub)
    monkeypatch.setattr("refusal.models.loading.check_hub_config", hub)
    from refusal.runs import pipeline

    local = pipeline.load_source

    def load_source(spec, kind):
        if str(spec).startswith("hf:"):
            raise _Reached(spec)
        return local(spec, kind)
    monkeypatch.setattr(pipeline, "load_source", load_source)
    _edit_saved(run_copy, lambda s: s.update(model="someone/their-model"), consistent=False)
    before = _snapshot(run_copy)
    for args in (["run", "--resume", run_copy], ["evaluate", run_copy], ["sets", run_copy],
                 ["control-vector", run_copy, "--out", tmp_path / "cv.gguf"],
                 ["abliterate", run_copy, "--out", tmp_path / "abl"], ["chat", run_copy]):
        msg = _error(args)
        assert "model = 'someone/their-model' (a hub model" in msg and "--allow-network" in msg, (args, msg)
        assert "HF_HUB_OFFLINE=1" in msg
    assert _snapshot(run_copy) == before
    # granted now: the same id on the command line, the user's own --config, --allow-network, or HF_HUB_OFFLINE=1
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"model": "someone/their-model"}))
    for args, env in ((["--model", "someone/their-model"], {}), (["--config", str(own)], {}),
                      (["--allow-network"], {}), ([], {"HF_HUB_OFFLINE": "1"})):
        _let_through(["run", "--resume", run_copy, *args], env)
    _let_through(["control-vector", run_copy, "--out", tmp_path / "cv.gguf", "--allow-network"])
    # a hub data set in the saved config: the same rule
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    saved["model"] = str(Path(saved["data"]["harmful"]).parent / "tiny")  # the local model again
    saved["data"]["harmless"] = "hf:someone/their-data"
    (run_copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    msg = _error(["run", "--resume", run_copy])
    assert "data.harmless = 'hf:someone/their-data' (a hub data set)" in msg
    assert "_Reached: hf:someone/their-data" in _let_through(["run", "--resume", run_copy, "--harmless",
                                                               "hf:someone/their-data"])


def test_network_settings_finds_every_destination():
    from refusal.config import RunConfig
    from refusal.runs.folder import network_settings, unnamed_destinations

    d = RunConfig().to_dict()
    assert network_settings(d) == []  # the defaults: a catalog model, built-in data, local judges and decoding
    d["model"] = "org/model"
    d["data"]["harmful_test"] = "hf:org/data"
    d["evaluate"]["judges"] += [{"type": "openai", "url": "http://localhost:8000/v1", "model": "served-name"},
                                {"type": "llm", "model": "org/judge"}]
    d["evaluate"]["benchmarks"] = {"tasks": ["refusal_mmlu", "mmlu"], "data_dir": "x"}
    d["select"]["objective"] = {"type": "guard", "model": "org/guard"}
    found = {(x.path, x.value, x.stage) for x in network_settings(d)}
    assert found == {(("model",), "org/model", None), (("data", "harmful_test"), "hf:org/data", None),
                     (("evaluate", "judges", 2, "url"), "http://localhost:8000/v1", "evaluate"),
                     (("evaluate", "judges", 3, "model"), "org/judge", "evaluate"),
                     (("evaluate", "benchmarks", "tasks", 1), "mmlu", "evaluate"),
                     (("select", "objective", "model"), "org/guard", "select")}
    named_now = {"model": "org/model", "data": {"harmful_test": "hf:org/data"}, "tasks": ["mmlu"]}
    assert {x.value for x in unnamed_destinations(d, named_now)} == {"http://localhost:8000/v1", "org/guard",
                                                                      "org/judge"}


# ---- 8. language codes and set-search limits at the door --------------------------------------------------------

def test_unknown_language_code_is_refused_at_once(monkeypatch):
    def started(*a, **k):
        raise _Reached("the cross-lingual run")
    monkeypatch.setattr("refusal.crosslingual.runs.Crosslingual.__init__", started)
    msg = _error(["crosslingual", "--languages", "en,zz"])
    assert "--languages: zz (" in msg and "--allow-unknown-language" in msg
    _let_through(["crosslingual", "--languages", "en,zz", "--allow-unknown-language"])
    _let_through(["crosslingual", "--languages", "en,fr"])


def test_known_language_codes():
    from refusal.cli.crosslingual import check_languages

    check_languages("en,fr,pt-br,zh_CN,am,sw,yo")  # ISO 639-1, regional forms, the package's languages
    with pytest.raises(RefusalError, match="qq"):
        check_languages("en,qq")


def test_language_a_given_source_holds_is_known(tmp_path):
    from refusal.cli.crosslingual import check_languages

    (tmp_path / "harmful_train_fil.json").write_text("[]")
    check_languages("en,fil", polyrefuse=tmp_path)  # Filipino (no ISO 639-1 code): the folder has it
    check_languages("en,yue", files=f"yue={tmp_path / 'x.json'}")
    with pytest.raises(RefusalError, match="fil"):
        check_languages("en,fil")


def test_sets_caps_k_at_the_pool_and_shows_its_progress(run_copy):
    r = runner.invoke(app, ["sets", str(run_copy), "--k", "1000", "--pool", "3", "--no-save"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    n = json.loads((run_copy / "sets.json").read_text())["settings"]["k_searched"]
    assert 1 <= n <= 3
    assert f"--k 1000 is capped at {n}" in out and f"sets of 1 to {n} are scored" in out
    assert f"Set search (sizes 1-{n} of {n} directions, beam 1)" in out  # the search's own progress bar


# ---- 9. killed at random points, resumed to the same result ----------------------------------------------------

# the artifacts of a run in the order they appear, in three parts (extract; select; generate and evaluate): seed i
# kills the run after an artifact of part i % 3 appears, plus a random delay (the kill may land anywhere after it,
# or after the run ended: only the invariant is asserted, whatever the point)
KILL_AFTER = (("config.yaml", "splits.json", "candidates.safetensors"),
              ("extract.done.json", "scores.json", "rankings.json"),
              ("select.done.json", "completions.partial.json", "completions.json", "generate.done.json",
               "judgements.json"))
TIMING = ("seconds", "finished_at", "stage_seconds")


def _without_timing(x):
    if isinstance(x, dict):
        return {k: _without_timing(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_without_timing(v) for v in x]
    return x


def _results(run_dir: Path) -> dict[str, object]:
    """Every file a run leaves: JSON without its timing fields, config.yaml without the output root, safetensors as
    their tensors' bytes and metadata, the rest (the plot) as bytes. The manifests' sha256 of summary.json (it holds
    the timings) and of safetensors files are left out: a safetensors file's bytes differ from process to process
    (the library writes its metadata in hash order); their content is compared instead."""
    out: dict[str, object] = {}
    for p in sorted(run_dir.iterdir()):
        if p.name == ".lock":
            continue
        if p.suffix == ".json":
            out[p.name] = _without_timing(json.loads(p.read_text()))
            if p.name.endswith(".done.json"):
                out[p.name]["sha256"] = {k: v for k, v in out[p.name].get("sha256", {}).items()
                                         if not k.endswith(".safetensors") and k != "summary.json"}
        elif p.suffix == ".safetensors":
            tensors, meta = io.read_tensors(p)
            out[p.name] = ({k: (str(t.dtype), tuple(t.shape), t.numpy().tobytes()) for k, t in tensors.items()}, meta)
        elif p.name == "config.yaml":
            out[p.name] = {k: v for k, v in yaml.safe_load(p.read_text()).items() if k != "output"}
        else:
            out[p.name] = p.read_bytes()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_run_killed_at_a_random_point_resumes_to_the_same_result(finished, tmp_path, seed):
    import random
    import signal
    import time

    rng = random.Random(seed)
    after, delay = rng.choice(KILL_AFTER[seed % 3]), rng.uniform(0.0, 0.2)
    model, reference = finished
    root = model.parent
    run_dir = tmp_path / "runs" / "run"
    log = (tmp_path / "killed.log").open("w")
    run = subprocess.Popen(
        [sys.executable, "-m", "refusal", "run", "--model", str(model), "--harmful", str(root / "harmful.json"),
         "--harmless", str(root / "harmless.json"), "--config", str(root / "cfg.yaml"), "--output",
         str(tmp_path / "runs"), "--name", "run"], stdout=log, stderr=log,
        env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "400"})
    try:
        deadline = time.monotonic() + 240
        while run.poll() is None and not (run_dir / after).exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        if run.poll() is None:
            run.send_signal(signal.SIGKILL)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    assert (run_dir / "config.yaml").is_file(), (tmp_path / "killed.log").read_text()
    r = _cli(["run", "--resume", run_dir], timeout=240)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    got, want = _results(run_dir), _results(reference)
    assert not [n for n in got if n.startswith(".")], "temporary files were left behind"
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs after a kill -9 {delay:.3f} s after {after} and a resume"


def test_safetensors_artifacts_are_byte_identical_across_processes(tmp_path):
    """Equal tensors and metadata give equal bytes whatever process writes them (the library's header map is in hash
    order), so two runs' artifacts compare by checksum."""
    import subprocess
    import sys

    code = ("import sys, torch; from pathlib import Path; from refusal import io; "
            "io.write_tensors(Path(sys.argv[1]), {'b': torch.arange(6.).view(2, 3), 'a': torch.ones(3)}, "
            "{f'k{i}': {'v': i} for i in range(12)})")
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for i, path in enumerate(paths):
        env = {**os.environ, "PYTHONHASHSEED": str(i)}
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)
    blobs = [p.read_bytes() for p in paths]
    assert blobs[0] == blobs[1] == blobs[2]
    from refusal import io

    tensors, meta = io.read_tensors(paths[0])
    assert meta == {f"k{i}": {"v": i} for i in range(12)} and tensors["b"].tolist() == [[0, 1, 2], [3, 4, 5]]
