"""Coherence benchmarks (MMLU, ARC-Challenge, TruthfulQA-MC, any lm-eval task) on an already loaded model, with
or without an intervention.

>>> from refusal.evaluation.benchmarks import run_benchmarks
>>> run_benchmarks(model, tok, ["mmlu", "arc_challenge"])                    # lm-eval's own tasks (needs the hub)
>>> run_benchmarks(model, tok, ["refusal_mmlu", "refusal_truthfulqa_mc2"], data_dir="benchmarks/",
...                interventions=[ablation(direction)], limit=100)          # local files, direction ablated
{"refusal_mmlu": {"acc": 0.61, "acc_stderr": 0.01, "n": 5700, "subtasks": {...}}, ...}

The model is wrapped in lm-eval's ``HFLM`` (``pretrained=model``) and evaluated by ``lm_eval.simple_evaluate`` with
the condition active around the whole evaluation: a list of :class:`~refusal.interventions.Intervention` or a
shared :class:`~refusal.interventions.Plan` (hooks through :func:`refusal.interventions.apply`), or any context
manager, such as :func:`refusal.interventions.weights.orthogonalized` (weights edited on entry, restored on exit).

Task names: any lm-eval task or group (``mmlu``, ``arc_challenge``, ``truthfulqa_mc1``, ``truthfulqa_mc2``, ...),
which download their data from the hub; and the offline copies shipped in :mod:`refusal.evaluation.tasks`,
``refusal_mmlu`` (every subject with a file in ``data_dir``; ``refusal_mmlu_<subject>`` for one),
``refusal_arc_challenge``, ``refusal_truthfulqa_mc1`` and ``refusal_truthfulqa_mc2``, which read the files in
``data_dir`` (formats in :mod:`refusal.evaluation.tasks.loaders`). The prompts, choices and metrics are those of
lm-eval's tasks of the same name. ``refusal_arc_challenge`` and TruthfulQA are zero-shot (``num_fewshot`` is
ignored for them, as lm-eval ignores it for its TruthfulQA); MMLU takes its few-shot examples from ``dev/``.

Everything a user can get wrong (an unknown task name, a missing or malformed data file, too few few-shot examples,
a bad ``limit``, an intervention on a layer the model lacks, lm-eval not installed) is a
:class:`~refusal.errors.RefusalError` raised before the model runs. Per task the result holds ``acc`` (and
``acc_norm`` where the task defines it), their standard errors and ``n``, the number of questions evaluated (with
``limit``, per leaf task: ``refusal_mmlu`` with ``limit=10`` scores up to 10 questions of each subject). Groups
and tags (``refusal_mmlu``, lm-eval's ``mmlu`` or ``ai2_arc``) weight their subtasks by size and list them under
``subtasks``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import RefusalError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from ..interventions.hooks import Plan
    from ..interventions.scopes import Intervention

    # what a benchmark condition runs under: interventions, a shared plan, a context manager, or nothing
    Interventions = Sequence[Intervention] | Intervention | Plan | AbstractContextManager[object] | None

OFFLINE_TASKS = ("refusal_mmlu", "refusal_arc_challenge", "refusal_truthfulqa_mc1", "refusal_truthfulqa_mc2")
HUB_TASKS = ("mmlu", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2")
_INSTALL = "Install lm-eval: pip install 'refusal[eval]' (or pip install 'lm-eval>=0.4')."


def _lm_eval() -> ModuleType:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        raise RefusalError(f"Benchmarks run through lm-eval, which is not installed ({exc}).", _INSTALL) from None
    return lm_eval


@lru_cache(maxsize=4)
def _manager(defaults: bool, data_dir: str | None) -> TaskManager:
    """lm-eval's task index with the offline tasks (and lm-eval's own when ``defaults``; indexing those takes
    seconds, so managers are kept)."""
    from lm_eval.tasks import TaskManager

    from .tasks import TASKS_DIR

    if not any(TASKS_DIR.glob("*/*.yaml")):
        raise RefusalError(f"refusal's lm-eval task files are missing from '{TASKS_DIR}' (an install without its "
                           "package data).", "Reinstall refusal (pip install 'refusal[eval]').")
    meta = {"data_dir": data_dir} if data_dir is not None else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=defaults, metadata=meta)


# ---- checking the request (no model work) -------------------------------------------------------------------------


def _check_args(tasks: object, limit: object, batch_size: object, num_fewshot: object) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise RefusalError(f"Benchmarks must be a non-empty list of task names, not {tasks!r}.",
                           f"For example {list(HUB_TASKS)} or {list(OFFLINE_TASKS)} with data_dir.")
    names = []
    for t in tasks:
        if not isinstance(t, str) or not t.strip():
            raise RefusalError(f"Benchmark names must be non-empty strings; got {t!r}.", "Fix the list of tasks.")
        names.append(t.strip())
    dup = sorted({t for t in names if names.count(t) > 1})
    if dup:
        raise RefusalError(f"Benchmark(s) {', '.join(dup)} asked for twice.", "Name each benchmark once.")
    if limit is not None:
        ok = (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1) or (
            isinstance(limit, float) and 0 < limit <= 1)
        if not ok:
            raise RefusalError(f"limit={limit!r} is neither a number of questions (>= 1) nor a fraction in (0, 1].",
                               "Give limit as an int >= 1, a float in (0, 1], or None for every question.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RefusalError(f"batch_size={batch_size!r} must be a positive int.", "Pass e.g. batch_size=8.")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise RefusalError(f"num_fewshot={num_fewshot!r} must be an int >= 0 (or None: each task's default).",
                           "Pass e.g. num_fewshot=5.")
    return names


def _check_offline_name(name: str) -> None:
    from .tasks.loaders import MMLU_SUBJECTS

    if name in OFFLINE_TASKS or (name.startswith("refusal_mmlu_") and name[len("refusal_mmlu_"):] in MMLU_SUBJECTS):
        return
    close = [t for t in OFFLINE_TASKS if t.startswith(name)] or difflib.get_close_matches(name, OFFLINE_TASKS, n=1)
    raise RefusalError(f"Unknown offline benchmark '{name}'" + (f" (did you mean '{close[0]}'?)." if close else "."),
                       f"The offline benchmarks are {', '.join(OFFLINE_TASKS)} and refusal_mmlu_<subject>.")


def _offline_tasks(name: str, data_dir: str | None, num_fewshot: int | None) -> list[str]:
    """The lm-eval tasks that ``name`` (an offline task) runs, after checking its files."""
    from .tasks import loaders

    if name == "refusal_arc_challenge":
        loaders.read_arc(loaders._find(data_dir, "arc", loaders.ARC_FILE))
        return [name]
    if name in ("refusal_truthfulqa_mc1", "refusal_truthfulqa_mc2"):
        loaders.read_truthfulqa(loaders._find(data_dir, "truthfulqa", loaders.TRUTHFULQA_FILE))
        return [name]
    if name == "refusal_mmlu":
        subjects = loaders.mmlu_subjects(data_dir)
    else:
        subjects = [name[len("refusal_mmlu_"):]]
    root = loaders.mmlu_folder(data_dir)
    for s in subjects:
        test = root / "test" / f"{s}_test.csv"
        if not test.is_file():
            raise RefusalError(f"MMLU's {s} test file '{test}' does not exist.", "Add it, or leave the subject out.")
        loaders.read_mmlu_csv(test)
        if num_fewshot:
            dev = root / "dev" / f"{s}_dev.csv"
            if not dev.is_file():
                raise RefusalError(f"{num_fewshot}-shot MMLU needs '{dev}', which does not exist.",
                                   "Add MMLU's dev files, or use num_fewshot=0.")
            if len(loaders.read_mmlu_csv(dev)) < num_fewshot:
                raise RefusalError(f"'{dev}' has fewer than {num_fewshot} questions for {num_fewshot}-shot prompts.",
                                   "Use a smaller num_fewshot.")
    return [f"refusal_mmlu_{s}" for s in subjects]


def _intervention_context(model: Any, interventions: Interventions) -> AbstractContextManager[object]:
    """A context manager for the condition, with its plan built (layers checked) now."""
    from ..interventions.hooks import Plan, apply
    from ..interventions.scopes import Intervention

    if interventions is None:
        return contextlib.nullcontext()
    if isinstance(interventions, Plan):
        if interventions.n_rows is not None:
            raise RefusalError("A per-row plan cannot run benchmarks: lm-eval forms its own batches.",
                               "Pass the interventions of one condition (a list, or Plan.shared).")
        return apply(model, interventions)
    if hasattr(interventions, "__enter__") and hasattr(interventions, "__exit__"):
        return interventions
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    if isinstance(interventions, Sequence) and all(isinstance(iv, Intervention) for iv in interventions):
        return apply(model, Plan.shared(model, list(interventions)))
    raise RefusalError(f"interventions must be a list of Interventions, a Plan or a context manager; got "
                       f"{type(interventions).__name__}.", "Pass e.g. [ablation(direction)].")


@contextlib.contextmanager
def _without_environment_report(evaluator: ModuleType) -> Iterator[None]:
    """lm-eval adds the environment (``pip list``, ``git describe``, CUDA details: subprocesses taking seconds on
    every call) to its results; the report here does not use it, so it is skipped for the call."""
    saved = {k: getattr(evaluator, k) for k in ("add_env_info", "get_git_commit_hash") if hasattr(evaluator, k)}
    stubs = {"add_env_info": lambda results: None, "get_git_commit_hash": lambda: None}
    try:
        for k in saved:
            setattr(evaluator, k, stubs[k])
        yield
    finally:
        for k, v in saved.items():
            setattr(evaluator, k, v)


# ---- reading lm-eval's output -------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _metrics(row: dict) -> dict[str, Any]:
    """A task's metrics (float or None), in a row to which the callers add ``n``, subtasks and samples."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else key] = _num(value)
    return out


def _samples(raw: list[dict], task: str | None = None) -> list[dict]:
    out = []
    for s in raw:
        rec = {"doc_id": s.get("doc_id"), "target": s.get("target"),
               "loglikelihoods": [_num(r[0]) if isinstance(r, (list, tuple)) else _num(r)
                                  for r in s.get("filtered_resps", [])]}
        for m in s.get("metrics", []):
            rec[m] = _num(s.get(m))
        if task is not None:
            rec["task"] = task
        out.append(rec)
    return out


def _leaves(name: str, group_subtasks: dict) -> list[str]:
    kids = group_subtasks.get(name)
    if not kids:
        return [name]
    return [leaf for k in kids for leaf in _leaves(k, group_subtasks)]


def _pool(parts: dict[str, dict]) -> dict[str, Any]:
    """Size-weighted means of the subtasks' metrics, with the standard error of a weighted mean of independent
    parts (lm-eval's ``weight_by_size``)."""
    n = sum(p["n"] for p in parts.values())
    out: dict[str, Any] = {}
    metrics = [m for m in next(iter(parts.values())) if m not in ("n", "samples") and not m.endswith("_stderr")]
    for m in metrics:
        vals = [(p["n"], p.get(m), p.get(f"{m}_stderr")) for p in parts.values()]
        if n == 0 or any(v is None for _, v, _ in vals):
            out[m] = out[f"{m}_stderr"] = None
            continue
        out[m] = sum(k * v for k, v, _ in vals) / n
        se = [s for _, _, s in vals]
        out[f"{m}_stderr"] = (math.sqrt(sum((k * s) ** 2 for k, _, s in vals)) / n
                              if all(s is not None for s in se) else None)
    out["n"] = n
    return out


# ---- the entry point ----------------------------------------------------------------------------------------------


def run_benchmarks(model: Any, tokenizer: Any, tasks: list[str], *, limit: int | float | None = None,
                   interventions: Interventions = None,
                   data_dir: str | Path | None = None, batch_size: int = 8, num_fewshot: int | None = None,
                   samples: bool = False, apply_chat_template: bool = False) -> dict[str, dict]:
    """Evaluate ``model`` on lm-eval ``tasks`` with ``interventions`` active (see the module docs).

    Returns ``{task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n", ["subtasks"], ["samples"]}}`` in
    the order asked; with ``samples=True`` each task also lists its questions' ``loglikelihoods`` (one per choice),
    ``target`` and per-question metrics. ``limit`` caps the questions of each leaf task (an int, or a fraction);
    ``apply_chat_template`` formats each question with the tokenizer's chat template (lm-eval's option)."""
    names = _check_args(tasks, limit, batch_size, num_fewshot)
    offline = [t for t in names if t.startswith("refusal_")]
    hub = [t for t in names if not t.startswith("refusal_")]
    for t in offline:
        _check_offline_name(t)
    lm_eval = _lm_eval()
    from .tasks import loaders

    root = str(loaders.benchmark_dir(data_dir)) if offline else (str(data_dir) if data_dir is not None else None)
    runs = {t: _offline_tasks(t, root, num_fewshot) for t in offline}
    manager = _manager(bool(hub), root)
    for t in hub:
        if t not in manager.all_tasks:
            pool = [x for x in manager.all_tasks if x[:3] == t[:3]]  # difflib over all ~15k names takes seconds
            close = difflib.get_close_matches(t, pool, n=3)
            raise RefusalError(f"Unknown benchmark '{t}': lm-eval has no task, group or tag of that name"
                               + (f" (close: {', '.join(close)})." if close else "."),
                               f"Use an lm-eval task name such as {', '.join(HUB_TASKS)}, or an offline one "
                               f"({', '.join(OFFLINE_TASKS)}) with data_dir.")
        entry = manager.task_index.get(t)
        is_tag = getattr(getattr(entry, "kind", None), "name", "") == "TAG"
        # a tag (e.g. ai2_arc) runs its tasks, pooled here as refusal_mmlu's subjects are
        runs[t] = (sorted(entry.tags) if is_tag and entry.tags else None) or [t]
    condition = _intervention_context(model, interventions)

    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    flat = list(dict.fromkeys(x for t in names for x in runs[t]))
    with condition, _without_environment_report(importlib.import_module("lm_eval.evaluator")):
        out = lm_eval.simple_evaluate(model=lm, tasks=flat, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=samples,
                                      apply_chat_template=apply_chat_template)
    results, counts = out["results"], out.get("n-samples", {})
    group_subtasks = out.get("group_subtasks", {})
    raw_samples = out.get("samples", {}) if samples else {}

    def leaf(task: str) -> dict:
        row = _metrics(results.get(task, {}))
        row["n"] = int(counts.get(task, {}).get("effective", 0))
        if samples:
            row["samples"] = _samples(raw_samples.get(task, []))
        return row

    report: dict[str, dict] = {}
    for t in names:
        parts = runs[t]
        if t in group_subtasks:  # an lm-eval group: its own aggregate, and its leaves
            leaves = _leaves(t, group_subtasks)
            row = _metrics(results.get(t, {}))
            row["n"] = sum(int(counts.get(x, {}).get("effective", 0)) for x in leaves)
            row["subtasks"] = {x: {k: v for k, v in leaf(x).items() if k != "samples"} for x in leaves}
            if samples:
                row["samples"] = [s for x in leaves for s in _samples(raw_samples.get(x, []), x)]
        elif len(parts) > 1 or parts[0] != t:  # refusal_mmlu or a tag: pooled here from its tasks
            sub = {x: leaf(x) for x in parts}
            row = _pool(sub)
            row["subtasks"] = {x: {k: v for k, v in r.items() if k != "samples"} for x, r in sub.items()}
            if samples:
                row["samples"] = [dict(s, task=x) for x, r in sub.items() for s in r["samples"]]
        else:
            row = leaf(t)
        report[t] = row
    return report
