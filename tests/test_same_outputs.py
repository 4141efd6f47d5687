"""benchmarks.fidelity.same_outputs: two run folders compared file by file, timing told apart from results."""

from __future__ import annotations

import json

import pytest

from benchmarks.fidelity.same_outputs import compare


def _folder(root, summary_seconds: float, completion: str, select_extra: dict | None = None):
    root.mkdir()
    (root / "completions.json").write_text(json.dumps({"harmful": [completion]}))
    (root / "summary.json").write_text(json.dumps({"rate": 0.5, "stage_seconds": {"x": summary_seconds}}))
    (root / "evaluate.done.json").write_text(json.dumps(
        {"seconds": summary_seconds, "sha256": {"summary.json": str(summary_seconds)}}))
    (root / "select.done.json").write_text(json.dumps({"selected": 1, **(select_extra or {})}))
    return root


def test_timing_and_derived_digests_are_told_apart_from_changed_results(tmp_path):
    a = _folder(tmp_path / "a", 1.0, "I can't.")
    b = _folder(tmp_path / "b", 2.0, "I can't.")
    res = compare(a, b)
    assert res["same_where_unchanged"] and res["counts"]["identical"] == 2
    assert res["timing_only"] == ["evaluate.done.json", "summary.json"]
    c = _folder(tmp_path / "c", 2.0, "Sure, here is how.", {"extra": 1})
    res = compare(a, c, expect_changed=["select.done.json"])
    assert not res["same_where_unchanged"] and res["unexplained"] == ["completions.json"]
    assert list(res["expected_changes"]) == ["select.done.json"]


def test_a_missing_folder_is_an_error_not_a_pass(tmp_path):
    a = _folder(tmp_path / "a", 1.0, "x")
    with pytest.raises(SystemExit, match="nothing to compare"):
        compare(a, tmp_path / "missing")
