"""The default run as a new user starts it, timed from process start to exit, and compared with a reference run:
``refusal run`` with no flags (on a CPU: the cpu preset on the default catalog model), or with ``--extra`` flags.

    python -m benchmarks.speed.default_run --out benchmarks/results/cpu-run.json \\
        [--reference docs/runs/cpu-default/summary.json] [--extra "--preset cpu"]

Writes the device, date, commit, command, ``wall_s``, the summary's stage seconds, selection and headline rates, and,
with ``--reference``, whether the selection and every condition's rates equal the reference's (a refactor that was
meant to change nothing must leave them equal).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.speed.paper_run import device_name


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def compare(summary: dict, reference: dict) -> dict:
    """Selection and each condition's rate (refusal / non-refusal counts) against the reference summary."""
    def rates(s: dict) -> dict:
        return {f"{kind}/{cond}": {k: (m.get(k) or {}).get("count") for k in ("refusal", "refusal_score_positive")}
                for kind, conds in s["results"].items() for cond, m in conds.items()}
    ours, theirs = rates(summary), rates(reference)
    differ = {k: {"now": ours.get(k), "reference": theirs.get(k)} for k in sorted(set(ours) | set(theirs))
              if ours.get(k) != theirs.get(k)}
    return {"same_selection": summary["selected"] == reference["selected"], "same_rates": not differ,
            "differences": differ, "reference_selected": reference["selected"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="/tmp/runs")
    ap.add_argument("--name", default="default")
    ap.add_argument("--reference", help="a summary.json to compare the selection and rates with")
    ap.add_argument("--extra", default="", help='more flags for refusal run, as one string')
    ap.add_argument("--note", default="", help="what else the machine was doing (said beside wall_s)")
    a = ap.parse_args()
    run_dir = Path(a.runs) / a.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: nothing resumed
    cmd = [sys.executable, "-m", "refusal", "run", "--output", a.runs, "--name", a.name, *shlex.split(a.extra)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    s = json.loads((run_dir / "summary.json").read_text())
    import torch
    import transformers

    out = {"device": device_name(), "model": s["model"], "command": " ".join(["refusal", *cmd[3:]]),
           "wall_s": round(wall, 2),
           "wall_note": "process start to exit, the model's first load included (with its one-time dequantization "
                        "where the cache held only the GGUF)"
           + (f"; {a.note}" if a.note else ""),
           "commit": _commit(), "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "stage_seconds": s["stage_seconds"], "selected": s["selected"], "harmful": s.get("harmful"),
           "harmless": s.get("harmless"), "max_new_tokens": s["max_new_tokens"], "dtype": s["dtype"],
           "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    if a.reference:
        out["reference"] = {"file": a.reference, **compare(s, json.loads(Path(a.reference).read_text()))}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("device", "wall_s", "selected", "harmful", "harmless")}, indent=1))
    if a.reference:
        print(json.dumps(out["reference"], indent=1))


if __name__ == "__main__":
    main()
