"""Every judge checked against completions labelled by a reader: confusion table, Cohen's kappa, Wilson intervals.

    python -m benchmarks.judges_agreement                      # substring list + stored refusal scores
    python -m benchmarks.judges_agreement --llm-model PATH     # + the LLM judge (refusal rubric) with that model
    python -m benchmarks.judges_agreement --llm-verdicts FILE  # + its verdicts saved on the GPU by
                                                               #   benchmarks.quality.llm_verdicts (keyed by text)

Reads ``benchmarks/data/judge_labels.jsonl`` (one completion a row: ``id``, ``source``, ``prompt``,
``completion``, ``label`` in refusal / partial / compliance / degenerate, ``harmful_content``, ``quotes_request``,
``disclaimer_then_compliance`` (yes / no), ``notes``; optional ``refusal_score``, the first-token score stored with
the completion). The rules the labels follow are in ``docs/judge-labels.md``. Writes
``benchmarks/results/judges.json`` with the device, date, commit and command.

Agreement is strict. A reader's label maps to the label a judge must give to agree with it:

* ``refusal`` -> ``refusal``; ``compliance`` -> ``compliance``;
* ``partial`` -> ``partial`` for a judge that has a partial class; a judge without one cannot agree with a partial
  item (calling it refusal or compliance is half wrong, and counting either as agreement is how a 10 / 20 judge
  reads as 15 / 20);
* ``degenerate`` -> ``degenerate`` for a judge with that class, else ``compliance`` (a degenerate output did not
  refuse, which is all a refusal judge is asked).

A failed judgement (no stored score, an unparseable answer) is never agreement; it stays in n. Kappa is Cohen's
kappa between the reader's mapped labels and the judge's labels (a failure is its own category). A second, binary
view asks only "refusal or not" (the reader's ``refusal`` against the judge's ``refusal``), with the judge's
recall and precision on refusals.

Each judge's result also breaks down by where the rows come from, so a reader sees where a judge fails:
``by_group`` (the paper run's five conditions, the XSTest-style contrast set, the cross-lingual run; see
``source_group``), ``by_prompt_set`` (JailbreakBench, Alpaca, the contrast set, each language of the cross-lingual
run) and ``by_condition`` (group / prompt kind / condition), each with n, agreement, kappa, failures, the confusion
table and the binary view. The existing keys are unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "benchmarks" / "data" / "judge_labels.jsonl"
OUT = ROOT / "benchmarks" / "results" / "judges.json"

READER_LABELS = ("refusal", "partial", "compliance", "degenerate")
YES_NO_FIELDS = ("harmful_content", "quotes_request", "disclaimer_then_compliance")
REQUIRED = ("id", "source", "prompt", "completion", "label", *YES_NO_FIELDS, "notes")
FAILED = "failed"


def load_labels(path: str | Path = LABELS) -> list[dict]:
    """The labelled rows, checked: every field present, labels and yes / no fields from their sets, ids unique."""
    from refusal.errors import RefusalError

    path = Path(path)
    if not path.is_file():
        raise RefusalError(f"No labels file at {path}.", "Write one row per completion (see docs/judge-labels.md).")
    rows, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RefusalError(f"{path}:{n} is not JSON ({e.msg}).", "Write one JSON object a line.") from None
        if not isinstance(row, dict):
            raise RefusalError(f"{path}:{n} is a {type(row).__name__}, not an object.", "Write one object a line.")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise RefusalError(f"{path}:{n} lacks {', '.join(missing)}.", f"Give every row: {', '.join(REQUIRED)}.")
        if row["label"] not in READER_LABELS:
            raise RefusalError(f"{path}:{n} has label {row['label']!r}.", f"Use one of {', '.join(READER_LABELS)}.")
        for k in YES_NO_FIELDS:
            if row[k] not in ("yes", "no"):
                raise RefusalError(f"{path}:{n} has {k} = {row[k]!r}.", "Use 'yes' or 'no'.")
        if row["id"] in seen:
            raise RefusalError(f"{path}:{n} repeats id {row['id']!r}.", "Give every row its own id.")
        seen.add(row["id"])
        rows.append(row)
    return rows


def expected_label(reader: str, judge_labels: Sequence[str]) -> str | None:
    """The label a judge with ``judge_labels`` must give to agree with the reader's ``reader`` (``None``: it
    cannot agree; see the module docs)."""
    if reader == "partial":
        return "partial" if "partial" in judge_labels else None
    if reader == "degenerate":
        return "degenerate" if "degenerate" in judge_labels else "compliance"
    return reader


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two equally long label sequences (``None`` when chance agreement is 1: one category)."""
    if len(a) != len(b):
        raise ValueError("kappa needs two sequences of the same length")
    n = len(a)
    if n == 0:
        return None
    cats = sorted(set(a) | set(b))
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((list(a).count(c) / n) * (list(b).count(c) / n) for c in cats)
    if pe >= 1.0:
        return None
    return (po - pe) / (1.0 - pe)


def source_group(row: Mapping) -> str:
    """Which of the three sources a labelled row comes from (its ``prompt_set``; the path when it has none)."""
    ps = str(row.get("prompt_set") or "")
    if ps.startswith("contrast") or "over_refusal" in row.get("source", ""):
        return "contrast set (XSTest-style)"
    if ps in ("JailbreakBench", "Alpaca (paper split)") or "paper-after-completions" in row.get("source", ""):
        return "paper run (JailbreakBench + Alpaca)"
    if ps.startswith("cross-lingual") or "crosslingual" in row.get("source", ""):
        return "cross-lingual"
    return ps or "other"


def breakdown(rows: Sequence[Mapping], verdicts: Sequence[str | None], judge_labels: Sequence[str],
              key=source_group) -> dict:
    """The judge's agreement within each group of rows (``key(row)``), without the per-row lists: where a judge
    fails, not only how often."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(key(r), []).append(i)
    out = {}
    for name, idx in groups.items():
        res = agreement([rows[i] for i in idx], [verdicts[i] for i in idx], judge_labels, by_source=False)
        b = res["binary_refusal"]
        out[name] = {"n": res["n"], "agree": res["agree"], "accuracy": res["accuracy"], "kappa": res["kappa"],
                     "failed": res["failed"], "confusion": res["confusion"],
                     "binary_refusal": {"agree": b["agree"], "kappa": b["kappa"], "recall": b["recall"],
                                        "precision": b["precision"]}}
    return out


def _prompt_set(row: Mapping) -> str:
    return str(row.get("prompt_set") or source_group(row))


def _condition(row: Mapping) -> str:
    kind = row.get("prompt_kind")
    return " / ".join([source_group(row), *([str(kind)] if kind else []), str(row.get("condition") or "any condition")])


def agreement(rows: Sequence[Mapping], verdicts: Sequence[str | None], judge_labels: Sequence[str],
              by_source: bool = True) -> dict:
    """One judge's agreement with the reader: ``verdicts`` are the judge's labels (``None`` = failed). With
    ``by_source``, also ``by_group`` (paper run, contrast set, cross-lingual), ``by_prompt_set`` (JailbreakBench,
    Alpaca, the contrast set, each language of the cross-lingual run) and ``by_condition`` (group / prompt kind /
    condition)."""
    from refusal.evaluation.stats import Rate

    if len(rows) != len(verdicts):
        raise ValueError("one verdict per row")
    got = [FAILED if v is None else v for v in verdicts]
    want = [expected_label(r["label"], judge_labels) for r in rows]
    agree = [w is not None and w == g for w, g in zip(want, got)]
    confusion: dict[str, dict[str, int]] = {}
    for r, g in zip(rows, got):
        row = confusion.setdefault(r["label"], {})
        row[g] = row.get(g, 0) + 1
    # kappa on the mapped labels; an item the judge cannot agree with keeps the reader's own label
    mapped = [w if w is not None else r["label"] for w, r in zip(want, rows)]
    reader_ref = [r["label"] == "refusal" for r in rows]
    judge_ref = [g == "refusal" for g in got]
    tp = sum(x and y for x, y in zip(reader_ref, judge_ref))
    out = {
        "labels": list(judge_labels),
        "n": len(rows),
        "agree": sum(agree),
        "accuracy": Rate.of(sum(agree), len(rows)).to_json(),
        "kappa": _round(cohen_kappa(mapped, got)),
        "failed": got.count(FAILED),
        "confusion": {lab: dict(sorted(confusion[lab].items())) for lab in READER_LABELS if lab in confusion},
        "binary_refusal": {
            "agree": sum(x == y for x, y in zip(reader_ref, judge_ref)),
            "kappa": _round(cohen_kappa([str(x) for x in reader_ref], [str(y) for y in judge_ref])),
            "recall": Rate.of(tp, sum(reader_ref)).to_json(),
            "precision": Rate.of(tp, sum(judge_ref)).to_json(),
        },
        "disagreements": [r["id"] for r, ok in zip(rows, agree) if not ok],
    }
    if by_source:
        out["by_group"] = breakdown(rows, verdicts, judge_labels)
        out["by_prompt_set"] = dict(sorted(breakdown(rows, verdicts, judge_labels, _prompt_set).items()))
        out["by_condition"] = dict(sorted(breakdown(rows, verdicts, judge_labels, _condition).items()))
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def offline_judges(llm_model: str | None = None, device: str | None = None, dtype: str | None = None) -> list:
    """The judges that run without a network: the substring list, the stored refusal score, and (given a model)
    the LLM judge with the refusal rubric."""
    from refusal.evaluation.judges.base import make_judge

    judges = [make_judge({"type": "substring"}), make_judge({"type": "refusal_score"})]
    if llm_model:
        judges.append(make_judge({"type": "llm", "model": llm_model, "rubric": "refusal", "device": device,
                                  "dtype": dtype}))
    return judges


def saved_verdicts(rows: Sequence[Mapping], path: str | Path) -> tuple[str, dict]:
    """(judge name, agreement) for verdicts saved by ``benchmarks.quality.llm_verdicts``: each row finds its
    verdict by the sha256 of its prompt and completion; a row the file does not hold counts as a failed judgement
    (never agreement) and is listed under ``missing``."""
    from benchmarks.quality.llm_verdicts import item_key
    from refusal.evaluation.judges.llm import RUBRICS

    saved = json.loads(Path(path).read_text("utf-8"))
    verdicts = saved["verdicts"]
    got, missing = [], []
    for r in rows:
        v = verdicts.get(item_key(r["prompt"], r["completion"]))
        if v is None:
            missing.append(r["id"])
        got.append(None if v is None or v["failed"] else v["label"])
    labels = sorted(set(RUBRICS[saved.get("rubric", "refusal")].answers.values()))
    res = agreement(rows, got, labels)
    res.update(missing=missing, verdicts_file=str(path), verdicts_device=saved.get("device"),
               verdicts_date=saved.get("date"), verdicts_model=saved.get("model"))
    return f"{saved.get('judge', 'llm')} (saved verdicts)", res


def run_judges(rows: Sequence[Mapping], judges: Sequence) -> dict:
    """``{judge name: agreement}`` for every judge on the labelled rows."""
    out = {}
    for judge in judges:
        if judge.kind != "refusal":
            continue  # safety judges answer another question (safe / unsafe), not refusal
        verdicts = judge.judge([dict(r) for r in rows])
        out[judge.name] = agreement(rows, [None if v.failed else v.label for v in verdicts], judge.labels)
    return out


def labels_sha256(path: str | Path = LABELS) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not recorded (no git)"
    return f"{head} + uncommitted changes" if dirty else head


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default=str(LABELS), help="labelled completions (JSONL)")
    ap.add_argument("--out", default=str(OUT), help="where to write the agreement (JSON)")
    ap.add_argument("--llm-model", default=None, help="also run the LLM judge (refusal rubric) with this model")
    ap.add_argument("--llm-verdicts", default=None, help="the LLM judge's verdicts saved by "
                    "benchmarks.quality.llm_verdicts (matched to the rows by text)")
    ap.add_argument("--device", default=None, help="the LLM judge's device")
    ap.add_argument("--dtype", default=None, help="the LLM judge's dtype")
    args = ap.parse_args(argv)

    from refusal import io

    rows = load_labels(args.labels)
    judges = offline_judges(args.llm_model, args.device, args.dtype)  # specs checked before any model loads
    results = run_judges(rows, judges)
    if args.llm_verdicts:
        name, res = saved_verdicts(rows, args.llm_verdicts)
        results[name] = res
    counts = {lab: sum(r["label"] == lab for r in rows) for lab in READER_LABELS}
    sources: dict[str, int] = {}
    for r in rows:
        src = r["source"].split("#")[0]
        sources[src] = sources.get(src, 0) + 1
    groups: dict[str, int] = {}
    for r in rows:
        groups[source_group(r)] = groups.get(source_group(r), 0) + 1
    device = "cpu (no model: phrase list and stored scores)"
    if args.llm_model:
        device = f"{args.device or 'auto'} for the LLM judge ({platform.machine()} host)"
    out = {
        "device": device,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _commit(),
        "command": "python -m benchmarks.judges_agreement" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "labels_file": str(Path(args.labels).resolve().relative_to(ROOT)) if Path(args.labels).resolve()
        .is_relative_to(ROOT) else args.labels,
        "labels_sha256": labels_sha256(args.labels),
        "n_rows": len(rows),
        "label_counts": counts,
        "sources": dict(sorted(sources.items())),
        "groups": groups,
        "agreement_rule": "strict: partial agrees only with a judge's partial class; degenerate with compliance "
                          "for judges without a degenerate class; failed judgements never agree",
        "judges": results,
    }
    io.write_json(Path(args.out), out)
    for name, res in results.items():
        acc = res["accuracy"]
        print(f"{name}: {res['agree']}/{res['n']} agree ({acc['low']:.2f}-{acc['high']:.2f}), kappa {res['kappa']}")
        for group, g in res["by_group"].items():
            print(f"    {group}: {g['agree']}/{g['n']} agree, kappa {g['kappa']}, refusal or not "
                  f"{g['binary_refusal']['agree']}/{g['n']}, failed {g['failed']}")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
