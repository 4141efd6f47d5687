"""``docs/models.md`` from the architecture matrix: one row per model family, one column per stage, each cell the
outcome and the code path taken (fast path / the model's own code / refused, with the reason).

The matrix is what ``tests/test_architectures.py`` records (written as ``architecture-matrix.json`` under pytest's
temporary folder, and rendered here directly when the tests run with ``REFUSAL_WRITE_MODELS_DOC=1``)::

    REFUSAL_WRITE_MODELS_DOC=1 python -m pytest tests/test_architectures.py -q
    python -m benchmarks.fidelity.models_doc --json /tmp/pytest-of-$USER/pytest-current/architecture-matrix.json

Nothing in the table is written by hand: rerun the tests to change it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

_MARK = {"pass": "✅", "xfail": "❌ known", "fail": "❌", "refused": "⛔ refused", "skipped": "–"}
_STAGE_TEXT = {
    "extract": "diff-in-means vs the model's own hidden states, one unpadded prompt at a time",
    "score": "`score_candidates` vs each candidate alone (plain unpadded forwards under the hooks)",
    "generate": "`refusal.generate` (eager; split prefill on and off) vs `model.generate`, greedy, token for token",
    "generate_static": "the static decoder as a CPU runs it (static cache, no compile) vs `model.generate`",
    "ablation": "hook ablation vs orthogonalized weights (logits)",
    "export_hf": "exported Hugging Face folder reloaded vs hook ablation (multimodal: vision tower byte-identical)",
    "adapter": "PEFT LoRA adapter of the same edit, base + adapter vs hook ablation, with its size",
    "export_gguf": "exported GGUF reloaded by transformers vs hook ablation, or a clear error naming the architecture",
    "chat": "a chat session's stream vs `generate`, without and with an ablation",
}


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(result: dict[str, Any]) -> str:
    """The Markdown page for one matrix result (the JSON the tests write)."""
    stages = list(result["stages"])
    cells = {(c["family"], c["stage"]): c for c in result["cells"]}
    families = [f for f in result["families"] if any((f, s) in cells for s in stages)]
    lines = ["# Model families", "",
             "Generated from the architecture matrix (`tests/test_architectures.py`, rendered by "
             "`benchmarks/models_doc.py`); do not edit by hand. Each family is a tiny random model built from "
             "transformers' own config class with the family's distinctive features switched on, every stage checked "
             "against a plain reference:", ""]
    lines += [f"- **{s}**: {_STAGE_TEXT.get(s, s)}" for s in stages]
    lines += ["", f"transformers {result['transformers']}, torch {result['torch']}, {result['device']} "
              f"{result['dtype']}; the matrix took {result['seconds']} s.", "",
              "✅ pass · ❌ known: an expected failure (the reason below) · ❌ fail · ⛔ refused: the package says "
              "so before any work, naming what is missing", ""]
    lines.append("| family | " + " | ".join(stages) + " |")
    lines.append("|---" * (len(stages) + 1) + "|")
    for f in families:
        row = []
        for s in stages:
            c = cells.get((f, s))
            row.append("–" if c is None else _MARK.get(c["status"], c["status"]))
        lines.append(f"| {f} | " + " | ".join(row) + " |")
    lines += ["", "## Paths taken and reasons", ""]
    for f in families:
        info = result["families"][f]
        lines += [f"### {f}", "", f"`{info['class']}` ({info['config']}): {info['features']}.", "",
                  "| stage | outcome | path | reason |", "|---|---|---|---|"]
        for s in stages:
            c = cells.get((f, s))
            if c is None:
                continue
            lines.append(f"| {s} | {_MARK.get(c['status'], c['status'])} | {_esc(c.get('path', ''))} | "
                         f"{_esc(c.get('reason', ''))} |")
        lines.append("")
    if result.get("missing"):
        lines += ["Not in the installed transformers (not tested): " + ", ".join(result["missing"]) + ".", ""]
    return "\n".join(lines)


def write_doc(result: dict[str, Any], md: Path, js: Path | None = None) -> None:
    """Write the page (and the matrix JSON beside it) atomically."""
    from refusal import io

    io.write_text(Path(md), render(result))
    if js is not None:
        io.write_json(Path(js), result)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="the matrix JSON the tests wrote")
    ap.add_argument("--out", default="docs/models.md")
    args = ap.parse_args(argv)
    result = json.loads(Path(args.json).read_text("utf-8"))
    write_doc(result, Path(args.out), Path(args.out).with_suffix(".json"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
