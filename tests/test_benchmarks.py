"""Coherence benchmarks through lm-eval on a tiny model and tiny local copies of MMLU, ARC and TruthfulQA."""

from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import build_model  # noqa: E402

from refusal.errors import RefusalError  # noqa: E402
from refusal.evaluation.benchmarks import OFFLINE_TASKS, run_benchmarks  # noqa: E402
from refusal.interventions import addition  # noqa: E402

MMLU = {
    "anatomy": [("Which bone is in the arm?", "femur", "humerus", "tibia", "fibula", 1),
                ("Where is the heart?", "chest", "head", "foot", "hand", 0),
                ("How many lungs do people have?", "one", "three", "two", "four", 2)],
    "astronomy": [("What orbits the Earth?", "the Sun", "Mars", "Venus", "the Moon", 3),
                  ("Which planet is largest?", "Jupiter", "Mercury", "Mars", "Venus", 0),
                  ("What is a star made of, mostly?", "rock", "hydrogen", "iron", "ice", 1)],
}
ARC = [("What do plants need to grow?", ["sand", "light", "noise"], "B"),
       ("Which is a liquid at room temperature?", ["water", "salt", "iron", "wood"], "A"),
       ("What makes a shadow?", ["heat", "sound", "blocked light", "wind"], "C"),
       ("Which animal can fly?", ["dog", "fish", "cat", "bird"], "D"),
       ("What melts ice fastest?", ["heat", "cold", "dark"], "A")]
TQA = [("What happens if you crack your knuckles?", ["Nothing in particular.", "You get arthritis."],
        ["Nothing in particular.", "It makes a sound."]),
       ("Can you see the Great Wall from space?", ["No, not with the naked eye.", "Yes, easily.", "Only at night."],
        ["No, not with the naked eye."]),
       ("Do we use only ten percent of the brain?", ["No, we use all of it.", "Yes.", "Yes, only ten percent."],
        ["No, we use all of it.", "No."]),
       ("Is blood blue inside the body?", ["No, it is red.", "Yes, until it meets air."], ["No, it is red."])]


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    for subject, rows in MMLU.items():
        _write_csv(root / "mmlu" / "test" / f"{subject}_test.csv", rows)
        _write_csv(root / "mmlu" / "dev" / f"{subject}_dev.csv", rows[:1])
    (root / "arc").mkdir()
    (root / "arc" / "arc_challenge_test.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": q, "options": [{"label": "ABCD"[j], "text": t}
                                                               for j, t in enumerate(opts)], "answer": a}) + "\n"
        for i, (q, opts, a) in enumerate(ARC)), encoding="utf-8")
    items = []
    for q, mc1, true2 in TQA:
        mc2 = {a: int(a in true2) for a in dict.fromkeys(true2 + mc1[1:])}
        items.append({"question": q, "mc1_targets": {a: int(j == 0) for j, a in enumerate(mc1)}, "mc2_targets": mc2})
    (root / "truthfulqa").mkdir()
    (root / "truthfulqa" / "mc_task.json").write_text(json.dumps(items), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build_model("qwen2", len(tokenizer), n_layers=2)


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), computed here as lm-eval splits it: the whole text's tokens after those of
    the context."""
    whole = tokenizer(context + continuation)["input_ids"]
    n = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n, len(whole))))


def test_offline_benchmarks_run_with_the_right_counts(tiny, tokenizer, data_dir):
    out = run_benchmarks(tiny, tokenizer, list(OFFLINE_TASKS), data_dir=data_dir, limit=2, batch_size=4,
                         samples=True)
    assert list(out) == list(OFFLINE_TASKS)
    assert out["refusal_mmlu"]["n"] == 4  # limit applies per subject
    assert set(out["refusal_mmlu"]["subtasks"]) == {"refusal_mmlu_anatomy", "refusal_mmlu_astronomy"}
    for name, row in out.items():
        assert 0.0 <= row["acc"] <= 1.0
        if name != "refusal_mmlu":
            assert row["n"] == 2
        assert len(row["samples"]) == row["n"]
        assert row["acc"] == pytest.approx(sum(s["acc"] for s in row["samples"]) / row["n"])
    assert 0.0 <= out["refusal_arc_challenge"]["acc_norm"] <= 1.0
    assert "acc_norm" not in out["refusal_mmlu"]
    for s in out["refusal_truthfulqa_mc1"]["samples"] + out["refusal_arc_challenge"]["samples"]:
        lls = s["loglikelihoods"]
        assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == s["target"])
    for s in out["refusal_truthfulqa_mc2"]["samples"]:
        p = torch.tensor(s["loglikelihoods"]).softmax(0)
        doc = TQA[s["doc_id"]]
        true = [a in doc[2] for a in dict.fromkeys(doc[2] + doc[1][1:])]
        assert s["acc"] == pytest.approx(float(p[torch.tensor(true)].sum()), abs=1e-6)
    # whole-data run and one-shot MMLU: every question, same pooled accuracy as the subjects' weighted mean
    full = run_benchmarks(tiny, tokenizer, ["refusal_mmlu"], data_dir=data_dir, num_fewshot=1)["refusal_mmlu"]
    assert full["n"] == 6
    subs = full["subtasks"].values()
    assert full["acc"] == pytest.approx(sum(r["acc"] * r["n"] for r in subs) / 6)


def test_intervention_changes_the_loglikelihoods(tiny, tokenizer, data_dir):
    from refusal.interventions import apply

    base = run_benchmarks(tiny, tokenizer, ["refusal_arc_challenge"], data_dir=data_dir, samples=True)
    torch.manual_seed(1)
    iv = addition(torch.randn(64) * 4.0, coeff=1.0, layers=[0])
    steered = run_benchmarks(tiny, tokenizer, ["refusal_arc_challenge"], data_dir=data_dir, samples=True,
                             interventions=[iv])
    b, s = base["refusal_arc_challenge"]["samples"], steered["refusal_arc_challenge"]["samples"]
    assert [x["doc_id"] for x in b] == [x["doc_id"] for x in s]
    assert any(abs(x - y) > 1e-3 for u, v in zip(b, s) for x, y in zip(u["loglikelihoods"], v["loglikelihoods"]))
    # lm-eval's numbers are the model's own under the intervention: recompute one choice here
    q, opts, _ = ARC[b[0]["doc_id"]]
    ctx = f"Question: {q}\nAnswer:"
    assert b[0]["loglikelihoods"][0] == pytest.approx(_loglikelihood(tiny, tokenizer, ctx, " " + opts[0]), abs=1e-3)
    with apply(tiny, [iv]):
        want = _loglikelihood(tiny, tokenizer, ctx, " " + opts[0])
    assert s[0]["loglikelihoods"][0] == pytest.approx(want, abs=1e-3)
    # hooks are gone afterwards
    again = run_benchmarks(tiny, tokenizer, ["refusal_arc_challenge"], data_dir=data_dir, samples=True)
    assert again["refusal_arc_challenge"]["samples"][0]["loglikelihoods"] == pytest.approx(b[0]["loglikelihoods"])


def test_orthogonalized_weights_work_as_the_condition(tiny, tokenizer, data_dir):
    from refusal.interventions import ablation
    from refusal.interventions.weights import orthogonalized

    torch.manual_seed(2)
    d = torch.randn(64)
    hooks = run_benchmarks(tiny, tokenizer, ["refusal_truthfulqa_mc2"], data_dir=data_dir, limit=2, samples=True,
                           interventions=[ablation(d)])
    weights = run_benchmarks(tiny, tokenizer, ["refusal_truthfulqa_mc2"], data_dir=data_dir, limit=2, samples=True,
                             interventions=orthogonalized(tiny, d))
    for u, v in zip(hooks["refusal_truthfulqa_mc2"]["samples"], weights["refusal_truthfulqa_mc2"]["samples"]):
        assert u["loglikelihoods"] == pytest.approx(v["loglikelihoods"], abs=1e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=["refusal_mmlu_nope"]), "Unknown offline benchmark"),
    (dict(tasks=["refusal_arc"]), "did you mean 'refusal_arc_challenge'"),
    (dict(tasks=["refusal_mmlu"], data_dir=None), "need the folder"),
    (dict(tasks=[]), "non-empty list"),
    (dict(tasks="refusal_mmlu"), "non-empty list"),
    (dict(tasks=["refusal_mmlu"], limit=0), "limit"),
    (dict(tasks=["refusal_mmlu"], num_fewshot=2), "fewer than 2 questions"),
    (dict(tasks=["refusal_mmlu", "refusal_mmlu"]), "twice"),
])
def test_user_errors_come_before_any_model_work(data_dir, kwargs, match, monkeypatch):
    monkeypatch.delenv("REFUSAL_BENCHMARK_DIR", raising=False)
    kwargs = {"data_dir": data_dir, **kwargs}
    with pytest.raises(RefusalError, match=match):
        run_benchmarks(None, None, **kwargs)  # no model: any model work would fail differently


def test_bad_files_are_named(tmp_path):
    _write_csv(tmp_path / "test" / "anatomy_test.csv", MMLU["anatomy"])
    (tmp_path / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,answer\nx,1,2,3,4,0\n", encoding="utf-8")
    with pytest.raises(RefusalError, match=r"columns \['q', 'a'.*expected \['question', 'choice0'"):
        run_benchmarks(None, None, ["refusal_mmlu"], data_dir=tmp_path)
    (tmp_path / "arc_challenge_test.jsonl").write_text('{"question": "x", "options": []}\n', encoding="utf-8")
    with pytest.raises(RefusalError, match="not an ARC item"):
        run_benchmarks(None, None, ["refusal_arc_challenge"], data_dir=tmp_path)
    with pytest.raises(RefusalError, match="mc_task.json"):
        run_benchmarks(None, None, ["refusal_truthfulqa_mc1"], data_dir=tmp_path)


def test_unknown_lm_eval_task_is_refused(monkeypatch):
    """Against a stand-in index (lm-eval's full index takes 10-30 s to build on this CPU)."""
    import refusal.evaluation.benchmarks as bm

    class Index:
        all_tasks = ["arc_challenge", "arc_easy", "mmlu", "truthfulqa_mc1"]

    monkeypatch.setattr(bm, "_manager", lambda defaults, data_dir: Index())
    with pytest.raises(RefusalError, match="Unknown benchmark 'arc_challange'.*close: arc_challenge"):
        run_benchmarks(None, None, ["arc_challange"])


def test_the_hub_names_are_lm_eval_tasks():
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager

    from refusal.evaluation.benchmarks import HUB_TASKS

    tasks = Path(lm_eval.__file__).parent / "tasks"
    index = TaskManager(include_defaults=False, include_path=[str(tasks / d) for d in ("arc", "mmlu", "truthfulqa")])
    assert all(t in index.all_tasks for t in HUB_TASKS)


def test_a_bad_condition_is_refused_before_evaluation(tiny, tokenizer, data_dir):
    from refusal.interventions import Plan

    with pytest.raises(RefusalError, match="outside the model's 2 layers"):
        run_benchmarks(tiny, tokenizer, ["refusal_arc_challenge"], data_dir=data_dir,
                       interventions=[addition(torch.randn(64), layers=[7])])
    per_row = Plan.rows(tiny, [[addition(torch.randn(64), layers=[0])], []])
    with pytest.raises(RefusalError, match="per-row plan"):
        run_benchmarks(tiny, tokenizer, ["refusal_arc_challenge"], data_dir=data_dir, interventions=per_row)
    with pytest.raises(RefusalError, match="list of Interventions, a Plan or a context manager"):
        run_benchmarks(tiny, tokenizer, ["refusal_arc_challenge"], data_dir=data_dir, interventions="ablation")


def test_benchmarks_config_takes_a_batch_size_and_names_unknown_keys():
    from refusal.config import resolve

    cfg = resolve(None, {"evaluate": {"benchmarks": {"tasks": ["refusal_arc_challenge"], "batch_size": 32}}})
    assert cfg.evaluate.benchmarks["batch_size"] == 32
    with pytest.raises(RefusalError, match="batch_size"):
        resolve(None, {"evaluate": {"benchmarks": {"tasks": ["refusal_arc_challenge"], "batch": 32}}})


def test_task_datasets_are_fingerprinted_without_pickling_the_table(monkeypatch):
    """datasets' default fingerprint pickles the arrow table with dill, which failed on the lent GPU (Python 3.12,
    pyarrow 26: "Can't pickle <class 'MonthDayNano'>"); the offline tasks hash their rows instead."""
    import datasets.fingerprint

    from refusal.evaluation.tasks.loaders import _dataset

    def no_pickling(*_a, **_k):
        raise AssertionError("the table was pickled for its fingerprint")

    monkeypatch.setattr(datasets.fingerprint, "generate_fingerprint", no_pickling)
    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", no_pickling)
    a = _dataset([{"question": "q", "choices": ["a", "b"], "answer": 0}], {})
    b = _dataset([{"question": "q", "choices": ["a", "b"], "answer": 0}], {})
    assert a.num_rows == 1 and a[0]["choices"] == ["a", "b"] and a._fingerprint == b._fingerprint
    assert _dataset([], {"question": [], "answer": []}).column_names == ["question", "answer"]
