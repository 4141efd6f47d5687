"""Two run folders of the same run made by two versions of the code, compared file by file.

    python -m benchmarks.fidelity.same_outputs BEFORE_DIR AFTER_DIR --out same.json [--expect-changed NAME ...]

Every file (recursively; ``.lock`` files skipped) is hashed (sha256). A file is ``identical`` (same bytes), ``differs``
or ``only_before`` / ``only_after``. For a JSON file that differs, the top-level keys whose values differ are listed,
and ``same_except_timing`` says whether every differing key is a timing or date field (``*seconds*``, ``*_s``,
``date``, ``measured_at``, ``started``/``finished``...). ``--expect-changed`` names files a change was meant to
alter (they are reported apart). The result says whether every other file is identical or differs only in timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TIMING = ("seconds", "_s", "date", "measured_at", "started", "finished", "time", "elapsed")


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _timing_key(key: str) -> bool:
    k = key.lower()
    return any(k.endswith(t) or t in k for t in TIMING)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths (two levels deep) whose values differ between two JSON values."""
    if isinstance(a, dict) and isinstance(b, dict) and prefix.count(".") < 2:
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                out.extend(_diff_keys(a.get(k), b.get(k), f"{prefix}{k}."))
        return out
    return [prefix.rstrip(".")] if a != b else []


def compare(before: Path, after: Path, expect_changed: Sequence[str] = ()) -> dict:
    for d in (before, after):
        if not d.is_dir() or not any(d.iterdir()):
            raise SystemExit(f"{d} is not a run folder (missing or empty): nothing to compare")
    fb, fa = _files(before), _files(after)
    rows: dict[str, dict] = {}
    for name in sorted(set(fb) | set(fa)):
        if name not in fa:
            rows[name] = {"status": "only_before"}
            continue
        if name not in fb:
            rows[name] = {"status": "only_after"}
            continue
        hb = hashlib.sha256(fb[name].read_bytes()).hexdigest()
        ha = hashlib.sha256(fa[name].read_bytes()).hexdigest()
        row: dict[str, Any] = {"status": "identical" if hb == ha else "differs", "sha256": ha}
        if hb != ha and name.endswith((".yaml", ".txt", ".md")):
            import difflib

            lines = difflib.unified_diff(fb[name].read_text("utf-8").splitlines(),
                                         fa[name].read_text("utf-8").splitlines(), lineterm="", n=0)
            row["diff"] = [ln for ln in lines if ln[:1] in "+-" and ln[:3] not in ("+++", "---")][:20]
        if hb != ha and name.endswith(".json"):
            try:
                keys = _diff_keys(json.loads(fb[name].read_text("utf-8")), json.loads(fa[name].read_text("utf-8")))
            except json.JSONDecodeError:
                keys = ["(not JSON)"]
            row["keys"] = keys
            row["same_except_timing"] = bool(keys) and all(any(_timing_key(p) for p in k.split(".")) for k in keys)
        rows[name] = row
    expected = {n for n in rows if any(n == e or n.endswith("/" + e) for e in expect_changed)}
    # a manifest's digest of another file is explained when that file's own change is (timing, or expected)
    explained = expected | {n for n, r in rows.items() if r.get("same_except_timing")}
    for r in rows.values():
        keys = r.get("keys")
        if keys and not r.get("same_except_timing"):
            rest = [k for k in keys if not any(_timing_key(p) for p in k.split("."))
                    and not (k.startswith("sha256.") and k.removeprefix("sha256.") in explained)]
            if not rest:
                r["same_except_timing"] = True
                r["note"] = "differs in timing and in digests of files whose change is explained"
    others = {n: r for n, r in rows.items() if n not in expected}
    unexplained = sorted(n for n, r in others.items()
                         if r["status"] != "identical" and not r.get("same_except_timing"))
    return {
        "before": str(before), "after": str(after),
        "counts": {s: sum(r["status"] == s for r in rows.values())
                   for s in ("identical", "differs", "only_before", "only_after")},
        "timing_only": sorted(n for n, r in others.items() if r.get("same_except_timing")),
        "expected_changes": {n: rows[n] for n in sorted(expected)},
        "unexplained": unexplained,
        "same_where_unchanged": not unexplained,
        "files": rows,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--out", required=True)
    ap.add_argument("--expect-changed", nargs="*", default=[], help="files a change was meant to alter")
    a = ap.parse_args(argv)
    res = compare(Path(a.before), Path(a.after), a.expect_changed)
    res["command"] = "python -m benchmarks.fidelity.same_outputs " + " ".join(argv if argv is not None
                                                                                else sys.argv[1:])
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n", "utf-8")
    print(json.dumps({k: res[k] for k in ("counts", "timing_only", "unexplained", "same_where_unchanged")}, indent=1))
    print("expected changes:", {n: r["status"] for n, r in res["expected_changes"].items()})
    return res


if __name__ == "__main__":
    main()
