"""The paper's setup end to end, timed as a user sees it: ``refusal run --preset paper`` from the command to
summary.json, on Qwen2.5-Coder-1.5B-Instruct (or any model), the paper's splits, JailbreakBench and 100 harmless test
prompts, 256 new tokens.

    python -m benchmarks.speed.paper_run --model /tmp/m/hf --data PATH/refusal_direction \
        --out benchmarks/results/h200-run.json

Writes ``device``, ``model``, ``wall_s`` (process start to exit, imports and loading included), ``stage_seconds``,
``selected``, ``harmful`` and ``harmless`` (the summary's headline rates) and the whole summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError):
        return f"cpu ({platform.processor() or platform.machine()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="folder laid out like refusal_direction (splits/, processed/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="/tmp/runs")
    ap.add_argument("--name", default="paper")
    ap.add_argument("--extra", default="", help='more flags for refusal run, as one string: --extra="--config F.yaml"')
    a = ap.parse_args()
    d = Path(a.data)
    run_dir = Path(a.runs) / a.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: nothing resumed
    cmd = [sys.executable, "-m", "refusal", "run", "--model", a.model, "--preset", "paper", "--harmful", str(d),
           "--harmless", str(d), "--harmful-test", str(d / "processed" / "jailbreakbench.json"),
           "--output", a.runs, "--name", a.name, *shlex.split(a.extra)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    s = json.loads((run_dir / "summary.json").read_text())
    import torch
    import transformers

    out = {"device": device_name(), "model": s["model"], "command": " ".join(cmd[1:]), "wall_s": round(wall, 2),
           "stage_seconds": s["stage_seconds"], "selected": s["selected"], "harmful": s["harmful"],
           "harmless": s["harmless"], "max_new_tokens": s["max_new_tokens"], "dtype": s["dtype"],
           "torch": torch.__version__, "transformers": transformers.__version__,
           "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "summary": s}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("device", "wall_s", "stage_seconds", "selected", "harmful", "harmless")},
                     indent=1))


if __name__ == "__main__":
    main()
