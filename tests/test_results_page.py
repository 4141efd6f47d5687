"""The results page is a pure function of the committed files; judges are held to their agreement with labels."""

from __future__ import annotations

import json

import pytest

from benchmarks import judges_agreement as ja
from benchmarks import results_page as rp
from refusal.errors import RefusalError


def test_page_regenerates_identically_from_the_committed_files():
    text, read = rp.render()
    assert rp.PAGE.read_text(encoding="utf-8") == text, "docs/results.md is stale: python -m benchmarks.results_page"
    assert "benchmarks/results/vs_heretic.json" in read and "benchmarks/results/judges.json" in read



def test_every_result_file_is_read_or_supports_one():
    # a table reads it, it is a read file's log / README / steps / rendering, or KEPT_UNREAD names it with a reason
    orphans = rp.unread()
    assert not orphans, "result files no table reads (remove them; git keeps them):\n" + "\n".join(orphans)

def test_page_flags_hand_edited_files_and_says_level_within_noise():
    text, _ = rp.render()
    assert "**Edited by hand**" in text  # vs_heretic.json; cpu-run.json is now written by benchmarks.speed.default_run
    assert "level within noise" in text
    assert "135.9 s" in text.split("## Prose only")[1]  # the paper code's time is listed as prose only


def test_provenance_shows_not_recorded_rather_than_guessing():
    assert rp.provenance({}) == {"device": rp.NR, "date": rp.NR, "commit": rp.NR, "command": rp.NR}
    p = rp.provenance({"device": "cpu", "measured_at": "2026-12-01", "command": "-m refusal run"})
    assert p == {"device": "cpu", "date": "2026-12-01", "commit": rp.NR, "command": "python -m refusal run"}


def test_fisher_exact_two_sided():
    assert rp.fisher_exact(4, 100, 6, 100) == pytest.approx(0.7476, abs=1e-3)
    assert rp.fisher_exact(0, 10, 10, 10) < 1e-4
    assert rp.fisher_exact(5, 10, 5, 10) == pytest.approx(1.0)
    stats = pytest.importorskip("scipy.stats")
    for a, b in ((4, 6), (7, 5), (1, 9), (30, 12)):
        want = stats.fisher_exact([[a, 100 - a], [b, 100 - b]]).pvalue
        assert rp.fisher_exact(a, 100, b, 100) == pytest.approx(want, rel=1e-6)


def test_cohen_kappa_by_hand():
    # po = 3/4, pe = 0.5 * 0.25 + 0.5 * 0.75 = 0.5 -> kappa = 0.5
    assert ja.cohen_kappa(["r", "r", "c", "c"], ["r", "c", "c", "c"]) == pytest.approx(0.5)
    assert ja.cohen_kappa(["r", "c"], ["r", "c"]) == pytest.approx(1.0)
    assert ja.cohen_kappa(["r", "r"], ["r", "r"]) is None  # one category: kappa undefined


def _row(i: int, label: str) -> dict:
    return {"id": str(i), "source": "x", "prompt": "p", "completion": "c", "label": label,
            "harmful_content": "no", "quotes_request": "no", "disclaimer_then_compliance": "no", "notes": ""}


def test_agreement_is_strict_about_partial_and_failures():
    rows = [_row(0, "refusal"), _row(1, "partial"), _row(2, "compliance"), _row(3, "degenerate")]
    # a judge without a partial class cannot agree with a partial item, whatever it says
    two = ja.agreement(rows, ["refusal", "refusal", "compliance", "compliance"], ("refusal", "compliance"))
    assert two["agree"] == 3 and two["disagreements"] == ["1"]
    # with a partial class it can; a failed verdict never agrees and is counted
    three = ja.agreement(rows, ["refusal", "partial", None, "compliance"], ("refusal", "compliance", "partial"))
    assert three["agree"] == 3 and three["failed"] == 1 and three["disagreements"] == ["2"]
    assert three["confusion"]["compliance"] == {"failed": 1}


def test_labels_file_rows_are_checked(tmp_path):
    bad = tmp_path / "labels.jsonl"
    bad.write_text(json.dumps({**_row(0, "refusal"), "label": "REFUSAL"}) + "\n")
    with pytest.raises(RefusalError, match="label"):
        ja.load_labels(bad)
    bad.write_text(json.dumps({k: v for k, v in _row(0, "refusal").items() if k != "notes"}) + "\n")
    with pytest.raises(RefusalError, match="notes"):
        ja.load_labels(bad)


def test_substring_judge_agreement_does_not_drop():
    """A change to the phrase list or its matching that agrees less with the reader's labels fails here."""
    if not ja.LABELS.is_file():
        pytest.skip(f"no labels file at {ja.LABELS}")
    rows = ja.load_labels(ja.LABELS)
    if len(rows) < 50:
        pytest.skip(f"only {len(rows)} labelled rows (< 50): too few to hold a judge to")
    committed = json.loads(ja.OUT.read_text(encoding="utf-8"))
    assert committed["labels_sha256"] == ja.labels_sha256(ja.LABELS), (
        "the labels changed since benchmarks/results/judges.json was written: "
        "run python -m benchmarks.judges_agreement")
    now = ja.run_judges(rows, ja.offline_judges())
    was = committed["judges"]["substring"]
    assert now["substring"]["agree"] >= was["agree"], (now["substring"]["disagreements"], was["disagreements"])
    assert now["substring"]["kappa"] >= was["kappa"] - 1e-9
    # the stored-score judge reads the scores in the file, so it must reproduce exactly
    assert now["refusal_score"]["agree"] == committed["judges"]["refusal_score"]["agree"]


def test_saved_llm_verdicts_are_matched_by_text_and_missing_rows_never_agree(tmp_path):
    from benchmarks.quality.llm_verdicts import item_key

    rows = [{**_row(0, "refusal"), "completion": "I can't."}, {**_row(1, "compliance"), "completion": "Sure."},
            {**_row(2, "partial"), "completion": "Some of it."}]
    saved = {"rubric": "refusal", "judge": "llm:x", "verdicts": {
        item_key("p", "I can't."): {"label": "refusal", "failed": False},
        item_key("p", "Sure."): {"label": "refusal", "failed": False}}}
    f = tmp_path / "v.json"
    f.write_text(json.dumps(saved))
    name, res = ja.saved_verdicts(rows, f)
    assert name == "llm:x (saved verdicts)"
    assert res["agree"] == 1 and res["missing"] == ["2"] and res["failed"] == 1
    assert res["disagreements"] == ["1", "2"]
