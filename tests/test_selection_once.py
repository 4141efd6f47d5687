"""The selection is stored once (scores.json's "selected"; every other file refers to it or is derived from it), and
`refusal sets` writes its own artifact (sets.safetensors + sets.done.json) without touching select's files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from refusal import io
from refusal.cli import app
from refusal.directions.base import Direction, DirectionSet
from refusal.errors import DamagedFileError, RefusalError
from refusal.runs.folder import RunFolder
from refusal.runs.pipeline import Run

runner = CliRunner()
SELECT_FILES = ("splits.json", "candidates.safetensors", "scores.json", "scores.png", "direction.safetensors",
                "directions.safetensors", "rankings.json", "extract.done.json", "select.done.json")
SET_CONDITION = {"name": "set_ablation", "prompts": "harmful", "interventions": [{"op": "ablate", "direction": "set"}]}


@pytest.fixture
def finished(finished_tiny_run) -> Path:
    """The session's finished tiny run folder (conftest; do not modify: copy it with ``run_copy``)."""
    return finished_tiny_run[1]


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _sets(run_dir: Path, *args: str) -> None:
    r = runner.invoke(app, ["sets", str(run_dir), *args])
    assert r.exit_code == 0, r.output


def _error(args: list[str]) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "Error:" in r.output and "Fix:" in r.output and "Traceback" not in r.output, r.output
    return " ".join(r.output.split())


# ---- (a) the selection, stored once -----------------------------------------------------------------------------

def test_the_selection_is_stored_in_scores_json_and_referred_to_elsewhere(finished):
    rf = RunFolder(finished)
    sel = io.read_json(finished / "scores.json")["selected"]
    assert {"pos", "layer", "bypass", "induce", "kl", "n_passing"} <= set(sel)
    assert rf.selection() == sel

    # direction.safetensors: the vector and a reference (file, key, sha256) to the selection, not its scores
    raw = Direction.load(finished / "direction.safetensors")
    assert raw.scores == {}
    ref = {"file": "scores.json", "key": "selected", "sha256": _sha(finished / "scores.json")}
    assert raw.extra["selection"] == ref
    assert (raw.pos, raw.layer) == (sel["pos"], sel["layer"])  # where the vector was read, needed to apply it
    # read through the folder, it has the selection's scores
    d = rf.selected_direction()
    assert d.scores == {k: pytest.approx(sel[k]) for k in ("bypass", "induce", "kl")}

    # directions.safetensors: the ranked set only; "selected" comes from direction.safetensors when read
    assert "selected" not in DirectionSet.load(finished / "directions.safetensors")
    ds = rf.directions()
    assert list(ds)[:2] == ["selected", "0"]
    torch.testing.assert_close(ds["selected"].vectors, raw.vectors)
    assert ds["selected"].scores == d.scores

    # no copy in select's manifest; summary.json's is derived (pos and layer only)
    assert "selected" not in io.read_json(finished / "select.done.json")
    assert io.read_json(finished / "summary.json")["selected"] == {"pos": sel["pos"], "layer": sel["layer"]}


def test_scores_json_is_written_once_by_select(run_copy, monkeypatch):
    writes: list[str] = []
    real = io.write_json

    def spy(path, obj):
        writes.append(Path(path).name)
        return real(path, obj)

    monkeypatch.setattr(io, "write_json", spy)
    Run.open(run_copy, from_stage="select").run(("select",), from_stage="select")
    assert writes.count("scores.json") == 1, writes


def test_a_direction_file_that_disagrees_with_the_selection_is_damaged(run_copy):
    p = run_copy / "scores.json"
    scores = json.loads(p.read_text())
    scores["selected"]["layer"] = (scores["selected"]["layer"] + 1) % 3
    p.write_text(json.dumps(scores))
    with pytest.raises(DamagedFileError) as e:
        RunFolder(run_copy).selected_direction()
    assert "direction.safetensors is damaged" in str(e.value) and "--from-stage select" in str(e.value.fix)


def test_an_older_folder_with_copies_is_still_read(run_copy):
    """Before the selection had one owner: direction.safetensors carried the scores, directions.safetensors a
    "selected" entry and `refusal sets` added "set" to it."""
    raw = Direction.load(run_copy / "direction.safetensors")
    old = Direction(raw.vectors, raw.layer, raw.pos, raw.model, raw.method, {"bypass": -1.5, "induce": 2.0, "kl": 0.01},
                    raw.data_digest)
    old.save(run_copy / "direction.safetensors")
    ranked = DirectionSet.load(run_copy / "directions.safetensors")
    s = ranked["0"].stack(ranked["1"])
    DirectionSet([("selected", old), *ranked.items(), ("set", s)]).save(run_copy / "directions.safetensors")
    rf = RunFolder(run_copy)
    assert rf.selected_direction().scores == {"bypass": -1.5, "induce": 2.0, "kl": 0.01}
    ds = rf.directions()
    assert ds["selected"].scores == old.scores and ds["set"].k == 2 and "0" in ds


# ---- (b) `refusal sets`: its own artifact, its own manifest ------------------------------------------------------

def test_sets_writes_its_own_artifact_and_leaves_select_files_byte_identical(run_copy):
    before = {n: (run_copy / n).read_bytes() for n in SELECT_FILES}
    _sets(run_copy, "--k", "2", "--pool", "3")
    assert {n: (run_copy / n).read_bytes() for n in SELECT_FILES} == before

    m = io.read_json(run_copy / "sets.done.json")
    # its inputs: the manifests of the stages it read (digest and sha256), and its options
    for stage in ("extract", "select"):
        assert m["after"][stage] == {"digest": io.read_json(run_copy / f"{stage}.done.json")["digest"],
                                     "manifest_sha256": _sha(run_copy / f"{stage}.done.json")}
    assert m["options"]["k"] == 2 and m["options"]["pool"] == 3 and m["options"]["beam"] == 1
    assert m["outputs"] == ["sets.safetensors"]
    assert m["sha256"] == {"sets.safetensors": _sha(run_copy / "sets.safetensors")}
    assert m["best"] == io.read_json(run_copy / "sets.json")["best"]
    rf = RunFolder(run_copy)
    assert rf.sets_state() == "fresh"
    s = rf.directions()["set"]
    assert s.method == "set" and [x["rank"] for x in s.extra["members"]] == m["best"]["ranks"]
    # a resume trusts select's files as they are (nothing was recorded behind its back)
    r = runner.invoke(app, ["run", "--resume", str(run_copy)])
    assert r.exit_code == 0, r.output

    # other options: another digest; --no-save leaves the saved set and its manifest alone
    _sets(run_copy, "--directions", "0-1")
    m2 = io.read_json(run_copy / "sets.done.json")
    assert m2["digest"] != m["digest"] and m2["options"]["directions"] == [[0, 1]]
    saved = (run_copy / "sets.safetensors").read_bytes()
    _sets(run_copy, "--directions", "0,2", "--no-save")
    assert (run_copy / "sets.safetensors").read_bytes() == saved and io.read_json(run_copy / "sets.done.json") == m2
    assert RunFolder(run_copy).sets_state() == "fresh"


def test_select_run_again_makes_the_saved_set_stale(run_copy):
    _sets(run_copy, "--k", "1", "--pool", "2")
    rf = RunFolder(run_copy)
    assert rf.sets_state() == "fresh" and "set" in rf.directions()
    Run.open(run_copy, from_stage="select").run(("select",), from_stage="select")
    assert rf.sets_state() == "stale" and "set" not in rf.directions() and rf.set_reference() is None
    _sets(run_copy, "--k", "1", "--pool", "2")  # saved again for the new select
    assert rf.sets_state() == "fresh"


def test_a_hand_edited_saved_set_is_damaged(run_copy):
    _sets(run_copy, "--k", "1", "--pool", "2")
    d = Direction.load(run_copy / "sets.safetensors")
    Direction(d.vectors * 2, d.layer, d.pos, d.model, d.method, d.scores, d.data_digest, d.extra).save(
        run_copy / "sets.safetensors")
    with pytest.raises(DamagedFileError) as e:
        RunFolder(run_copy).directions()
    assert "sets.safetensors is damaged" in str(e.value) and "refusal sets" in str(e.value.fix)


def test_a_condition_that_names_the_set_follows_the_saved_set(run_copy):
    conds = [{"name": "baseline", "prompts": "harmful"}, SET_CONDITION, {"name": "baseline", "prompts": "harmless"}]
    overrides = {"generate": {"conditions": conds}}
    with pytest.raises(RefusalError) as e:  # no set saved yet
        Run.open(run_copy, overrides).run(resume=True)
    assert "has not been saved" in e.value.problem and "refusal sets" in e.value.fix

    _sets(run_copy, "--k", "1", "--pool", "2")
    Run.open(run_copy, overrides).run(resume=True)
    run = Run.open(run_copy, overrides)
    gen = run.done("generate")
    assert gen is not None and gen["sets"] == RunFolder(run_copy).set_reference()
    assert "set_ablation" in io.read_json(run_copy / "completions.json")["harmful"]

    _sets(run_copy, "--directions", "0-1")  # another set saved: generate (and so evaluate) are redone
    run = Run.open(run_copy, overrides)
    assert run.done("generate") is None and run.done("select") is not None

    Run.open(run_copy, overrides, from_stage="select").run(("select",), from_stage="select")
    with pytest.raises(RefusalError) as e:  # the set was saved for the earlier select
        Run.open(run_copy, overrides).run(resume=True)
    assert "select ran again" in e.value.problem


def test_the_report_shows_the_reference_and_the_saved_set(run_copy):
    from refusal.report import build_report
    from refusal.report.markdown import render

    _sets(run_copy, "--k", "1", "--pool", "2")
    md = render(build_report(run_copy))
    assert "selected (sha256" in md and "the file as it is now" in md  # direction.safetensors' reference
    assert "Saved set (refusal sets)" in md and "made from this selection" in md
    Run.open(run_copy, from_stage="select").run(("select",), from_stage="select")
    assert "stale: select ran again" in render(build_report(run_copy))
