"""The LLM judge (refusal rubric, a local model) over every completion in some result files, saved by content.

    python -m benchmarks.quality.llm_verdicts --model /tmp/m/hf --out verdicts.json \\
        /tmp/runs/paper/completions.json benchmarks/results/h200-2026-12-01/over_refusal.json /tmp/runs/learned-x

Each input is a JSON file or a folder (every ``completions.json`` below it). Any object in it with a prompt field
(``instruction`` / ``prompt``) and a ``completion`` string is one item; items are keyed by the sha256 of
``prompt + "\\0" + completion``, so the same text judged twice is judged once, and a reader's label on the same text
(``benchmarks/data/judge_labels.jsonl``) finds its verdict by key (``python -m benchmarks.judges_agreement
--llm-verdicts FILE``). The run needs the model where it runs (the lent GPU); the agreement is then computed on any
machine, after the labels are written. ``--dry`` judges with a tiny random chat model on the CPU (plumbing only).

Writes OUT: command, date, device, model (path and the sha256 of its config), rubric, the inputs with their item
counts, and ``verdicts``: ``{key: {"label", "score", "failed", "raw", "sources"}}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PROMPT_KEYS = ("instruction", "prompt")


def item_key(prompt: str, completion: str) -> str:
    return hashlib.sha256(f"{prompt}\0{completion}".encode()).hexdigest()


def walk(obj: Any, path: str) -> Iterator[tuple[str, str, str]]:
    """(json path, prompt, completion) for every record below ``obj``."""
    if isinstance(obj, dict):
        prompt = next((obj[k] for k in PROMPT_KEYS if isinstance(obj.get(k), str)), None)
        if prompt is not None and isinstance(obj.get("completion"), str):
            yield path, prompt, obj["completion"]
            return
        for k, v in obj.items():
            yield from walk(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}/{i}")


def collect(inputs: Sequence[str]) -> tuple[dict[str, dict], dict[str, int | None]]:
    """Items by key, and per input file its item count (``None``: an input that does not exist, skipped)."""
    items: dict[str, dict] = {}
    counts: dict[str, int | None] = {}
    for spec in inputs:
        p = Path(spec)
        if not p.exists():
            print(f"skipped (not there): {p}")
            counts[str(p)] = None
            continue
        files = sorted(p.rglob("completions.json")) if p.is_dir() else [p]
        if not files:
            raise SystemExit(f"no completions.json under {p}")
        for f in files:
            n = 0
            for path, prompt, completion in walk(json.loads(f.read_text("utf-8")), ""):
                key = item_key(prompt, completion)
                items.setdefault(key, {"prompt": prompt, "completion": completion, "sources": []})
                items[key]["sources"].append(f"{f}#{path.lstrip('/')}")
                n += 1
            counts[str(f)] = n
    return items, counts


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="completions files or folders")
    ap.add_argument("--model", help="HF folder of the judge model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--dry", action="store_true", help="a tiny random chat model on the CPU (plumbing only)")
    a = ap.parse_args(argv)

    from refusal import io
    from refusal.evaluation.judges.base import make_judge

    items, counts = collect(a.inputs)
    model = a.model
    if a.dry:
        from benchmarks.tiny import save_tiny_qwen2

        texts = [t for it in items.values() for t in (it["prompt"], it["completion"])][:2000]
        model = str(save_tiny_qwen2(Path(a.out).parent / "tiny-judge", texts + ["REFUSAL COMPLIANCE PARTIAL"],
                                    max_positions=4096))
    if not model:
        raise SystemExit("--model is needed (or --dry)")
    spec: dict[str, Any] = {"type": "llm", "model": model, "rubric": "refusal", "device": a.device, "dtype": a.dtype}
    if a.batch_size:
        spec["batch_size"] = a.batch_size
    judge = make_judge(spec)
    keys = sorted(items)
    verdicts = judge.judge([{"prompt": items[k]["prompt"], "completion": items[k]["completion"]} for k in keys])
    cfg = Path(model) / "config.json"
    out = {
        "command": "python -m benchmarks.quality.llm_verdicts " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": _device(),
        "model": model,
        "model_config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None,
        "judge": judge.name,
        "rubric": "refusal",
        "inputs": counts,
        "n_items": len(keys),
        "n_failed": sum(v.failed for v in verdicts),
        "verdicts": {k: {"label": v.label, "score": v.score, "failed": v.failed, "raw": v.raw,
                         "sources": items[k]["sources"]} for k, v in zip(keys, verdicts)},
    }
    io.write_json(Path(a.out), out)
    labels: dict[str, int] = {}
    for v in verdicts:
        labels[str(v.label)] = labels.get(str(v.label), 0) + 1
    print(f"{len(keys)} items judged ({out['n_failed']} failed): {labels}; wrote {a.out}")
    return out


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    except ImportError:
        pass
    return f"cpu ({platform.machine()})"


if __name__ == "__main__":
    main()
