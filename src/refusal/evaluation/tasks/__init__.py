"""lm-eval task configs for MMLU, ARC-Challenge and TruthfulQA-MC that read local files instead of the hub.

The YAML files here are in lm-eval's own format; register them with ``TaskManager(include_path=TASKS_DIR,
metadata={"data_dir": ...})`` (what :func:`refusal.evaluation.benchmarks.run_benchmarks` does), or from lm-eval's
command line::

    lm_eval --model hf --model_args pretrained=MODEL --include_path $(python -c \\
        "import refusal.evaluation.tasks as t; print(t.TASKS_DIR)") --tasks refusal_mmlu \\
        --metadata '{"data_dir": "/path/to/benchmarks"}'

Tasks (names and prompts as lm-eval's ``mmlu``, ``arc_challenge``, ``truthfulqa_mc1``, ``truthfulqa_mc2``):
``refusal_mmlu`` (a group of ``refusal_mmlu_<subject>`` tasks, with the four category subgroups),
``refusal_arc_challenge``, ``refusal_truthfulqa_mc1``, ``refusal_truthfulqa_mc2``. The files they read are listed
in :mod:`.loaders`.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
