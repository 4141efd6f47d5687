"""Readers for local copies of MMLU, ARC-Challenge and TruthfulQA-MC, and the ``custom_dataset`` functions the task
YAMLs next to this file call (lm-eval passes them the task's ``metadata``, which holds ``data_dir``).

``data_dir`` is one folder; each benchmark's files are looked for in it or in its subfolder named after the
benchmark (so ``data_dir`` may be a folder holding ``mmlu/``, ``arc/`` and ``truthfulqa/``):

* MMLU: ``[mmlu/]test/<subject>_test.csv`` and, for few-shot prompts, ``[mmlu/]dev/<subject>_dev.csv``, with the
  header ``question,choice0,choice1,choice2,choice3,answer`` (``answer`` the index 0-3 of the right choice; a letter
  A-D is accepted too). Subjects are MMLU's 57 (``abstract_algebra`` ... ``world_religions``).
* ARC-Challenge: ``[arc/]arc_challenge_test.jsonl``, one object per line: ``{"question": str, "options":
  [{"label": "A", "text": str}, ...], "answer": "A"}`` (AI2's own layout, ``{"question": {"stem", "choices"},
  "answerKey"}``, is read too).
* TruthfulQA: ``[truthfulqa/]mc_task.json``, a list of ``{"question": str, "mc1_targets": {answer: 0 | 1},
  "mc2_targets": {answer: 0 | 1}}`` (the upstream repository's multiple-choice file).

Without ``data_dir`` the environment variable ``REFUSAL_BENCHMARK_DIR`` names the folder. Every problem with the
files is a :class:`~refusal.errors.RefusalError` naming the file and what was expected.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from refusal.errors import RefusalError

if TYPE_CHECKING:
    import datasets

ENV = "REFUSAL_BENCHMARK_DIR"
MMLU_COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
ARC_FILE = "arc_challenge_test.jsonl"
TRUTHFULQA_FILE = "mc_task.json"

MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": ("abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"),
    "other": ("business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
              "professional_medicine", "virology"),
    "social_sciences": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
}
MMLU_SUBJECTS: tuple[str, ...] = tuple(sorted(s for v in MMLU_CATEGORIES.values() for s in v))


# ---- where the files are ------------------------------------------------------------------------------------------


def benchmark_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` (or ``$REFUSAL_BENCHMARK_DIR``) as an existing folder."""
    raw = data_dir if data_dir not in (None, "") else os.environ.get(ENV)
    if not raw:
        raise RefusalError("The local benchmark tasks (refusal_mmlu, refusal_arc_challenge, refusal_truthfulqa_*) "
                           "need the folder holding the benchmark files, and none was given.",
                           f"Pass data_dir= (lm-eval: --metadata '{{\"data_dir\": \"...\"}}') or set ${ENV}.")
    p = Path(raw).expanduser()
    if not p.is_dir():
        raise RefusalError(f"The benchmark folder '{raw}' does not exist.", "Check the path given as data_dir.")
    return p


def _find(data_dir: str | os.PathLike | None, sub: str, rel: str) -> Path:
    root = benchmark_dir(data_dir)
    for p in (root / rel, root / sub / rel):
        if p.exists():
            return p
    raise RefusalError(f"Neither '{root / rel}' nor '{root / sub / rel}' exists.",
                       f"Put the {sub} files there (see refusal.evaluation.tasks.loaders for the formats).")


def mmlu_folder(data_dir: str | os.PathLike | None) -> Path:
    """The folder holding MMLU's ``test/`` (and ``dev/``)."""
    return _find(data_dir, "mmlu", "test").parent


def mmlu_subjects(data_dir: str | os.PathLike | None) -> list[str]:
    """The subjects with a ``test/<subject>_test.csv`` file, sorted; an error for files of unknown subjects."""
    folder = mmlu_folder(data_dir) / "test"
    found = sorted(p.name[: -len("_test.csv")] for p in folder.glob("*_test.csv"))
    if not found:
        raise RefusalError(f"'{folder}' holds no <subject>_test.csv files.", "Point data_dir at a copy of MMLU.")
    unknown = [s for s in found if s not in MMLU_SUBJECTS]
    if unknown:
        raise RefusalError(f"'{folder}' has test files for subjects MMLU does not have: {', '.join(unknown)}.",
                           f"Name the files after MMLU's subjects ({', '.join(MMLU_SUBJECTS[:3])}, ...).")
    return found


# ---- readers ------------------------------------------------------------------------------------------------------


def read_mmlu_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows ``{"question", "choices" (4), "answer" (0-3)}`` of one MMLU CSV file."""
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != MMLU_COLUMNS:
            raise RefusalError(f"'{path}' has the columns {header}; expected {list(MMLU_COLUMNS)}.",
                               "Use the header question,choice0,choice1,choice2,choice3,answer (answer 0-3).")
        rows = []
        for i, r in enumerate(reader, start=2):
            if not r:
                continue
            if len(r) != len(MMLU_COLUMNS):
                raise RefusalError(f"Line {i} of '{path}' has {len(r)} fields; expected {len(MMLU_COLUMNS)}.",
                                   "Quote fields that contain commas.")
            a = r[5].strip()
            answer = int(a) if a in ("0", "1", "2", "3") else "ABCD".find(a.upper()) if len(a) == 1 else -1
            if answer < 0:
                raise RefusalError(f"Line {i} of '{path}' has the answer {a!r}.", "Give the answer as 0-3 (or A-D).")
            rows.append({"question": r[0], "choices": r[1:5], "answer": answer})
    if not rows:
        raise RefusalError(f"'{path}' holds no questions.", "Check the file.")
    return rows


def read_arc(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows ``{"id", "question", "choices" (texts), "labels", "answer" (index)}`` of an ARC JSONL file."""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RefusalError(f"Line {i} of '{path}' is not JSON ({exc.msg}).",
                               "Use one JSON object a line.") from None
        q: Any = r.get("question")  # JSON values, checked below
        opts: Any = r.get("options")
        key: Any = r.get("answer")
        if isinstance(q, dict):  # AI2's layout
            q, opts, key = q.get("stem"), q.get("choices"), r.get("answerKey")
        ok = (isinstance(q, str) and isinstance(opts, list) and len(opts) >= 2
              and all(isinstance(o, dict) and isinstance(o.get("text"), str) and "label" in o for o in opts))
        labels = [str(o["label"]) for o in opts] if ok else []
        if not ok or str(key) not in labels:
            raise RefusalError(f"Line {i} of '{path}' is not an ARC item (keys: {sorted(r)}).",
                               'Each line needs "question", "options": [{"label", "text"}, ...] and "answer" '
                               "(one of the labels).")
        rows.append({"id": str(r.get("id", i)), "question": q, "choices": [o["text"] for o in opts],
                     "labels": labels, "answer": labels.index(str(key))})
    if not rows:
        raise RefusalError(f"'{path}' holds no questions.", "Check the file.")
    return rows


def _targets(t: Any, where: str, single: bool) -> dict[str, list]:
    if not isinstance(t, dict) or len(t) < 2 or not all(v in (0, 1) for v in t.values()):
        raise RefusalError(f"{where} is not a mapping of at least two answers to 0/1.",
                           'Write the targets as {"answer": 1, "other answer": 0, ...}.')
    labels = [int(v) for v in t.values()]
    if (labels.count(1) != 1) if single else not (0 < labels.count(1) < len(labels)):
        raise RefusalError(f"{where} marks {labels.count(1)} of {len(labels)} answers true.",
                           "MC1 needs exactly one true answer; MC2 at least one true and one false.")
    return {"choices": list(t), "labels": labels}


def read_truthfulqa(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Items ``{"question", "mc1_targets": {"choices", "labels"}, "mc2_targets": {...}}`` of ``mc_task.json``."""
    path = Path(path)
    try:
        items = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise RefusalError(f"'{path}' is not JSON ({exc.msg}).", "Use TruthfulQA's mc_task.json.") from None
    if not isinstance(items, list) or not items:
        raise RefusalError(f"'{path}' is not a non-empty list of questions.", "Use TruthfulQA's mc_task.json.")
    rows = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("question"), str):
            raise RefusalError(f"Item {i} of '{path}' has no question.", "Each item needs a 'question' string.")
        rows.append({"question": it["question"].strip(),
                     "mc1_targets": _targets(it.get("mc1_targets"), f"mc1_targets of item {i} of '{path}'", True),
                     "mc2_targets": _targets(it.get("mc2_targets"), f"mc2_targets of item {i} of '{path}'", False)})
    return rows


# ---- lm-eval's custom_dataset functions ---------------------------------------------------------------------------


def _dataset(rows: list[dict], columns: dict[str, list]) -> datasets.Dataset:
    """A ``datasets.Dataset`` of ``rows`` (``columns`` gives the empty layout), fingerprinted by a hash of its rows.

    ``Dataset.from_list`` would fingerprint the table by pickling it with dill, which fails on some Python /
    pyarrow / dill combinations (seen on Python 3.12 with pyarrow 26: "Can't pickle <class 'MonthDayNano'>");
    the rows' own JSON hash is deterministic and needs no pickling."""
    import hashlib
    import json

    import datasets
    from datasets.table import InMemoryTable

    table = InMemoryTable.from_pylist(rows) if rows else InMemoryTable.from_pydict(columns)
    key = hashlib.sha256(json.dumps(rows or columns, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return datasets.Dataset(table, fingerprint=key)


def load_mmlu(subject: str | None = None, data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``{"test", "dev"}`` of one subject (``dev`` empty when its file is absent: zero-shot only)."""
    import datasets

    if subject not in MMLU_SUBJECTS:
        raise RefusalError(f"'{subject}' is not an MMLU subject.", f"Use one of {', '.join(MMLU_SUBJECTS)}.")
    root = mmlu_folder(data_dir)
    test = root / "test" / f"{subject}_test.csv"
    if not test.is_file():
        raise RefusalError(f"MMLU's {subject} test file '{test}' does not exist.", "Add it, or leave the subject out.")
    dev = root / "dev" / f"{subject}_dev.csv"
    empty: dict[str, list] = {"question": [], "choices": [], "answer": []}
    return datasets.DatasetDict({
        "test": _dataset([{**r, "subject": subject} for r in read_mmlu_csv(test)], empty),
        "dev": _dataset([{**r, "subject": subject} for r in read_mmlu_csv(dev)] if dev.is_file() else [],
                        {**empty, "subject": []}),
    })


def load_arc(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    import datasets

    return datasets.DatasetDict({"test": _dataset(read_arc(_find(data_dir, "arc", ARC_FILE)), {})})


def load_truthfulqa(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    import datasets

    return datasets.DatasetDict({"validation": _dataset(read_truthfulqa(_find(data_dir, "truthfulqa",
                                                                               TRUTHFULQA_FILE)), {})})


def process_results_mc2(doc: dict, results: list) -> dict[str, float]:
    """TruthfulQA MC2: the probability mass on the true answers, normalised over all answers."""
    ll = np.array([r[0] for r in results], dtype=np.float64)
    p = np.exp(ll - ll.max())
    labels = np.array(doc["mc2_targets"]["labels"])
    return {"acc": float(p[labels == 1].sum() / p.sum())}
