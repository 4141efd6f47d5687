"""Which completions were drawn for labelling (``judge_labels.jsonl``), reproducibly, and a check that the labelled
rows still match their sources byte for byte.

    python benchmarks/data/sample_labels.py --pool-from /tmp/gpu/Bruns/learned-openings-learned   # writes the pool
    python benchmarks/data/sample_labels.py --skeleton /tmp/skeleton.jsonl   # the drawn rows, unlabelled
    python benchmarks/data/sample_labels.py --check                          # labelled rows == their sources

Two draws, each with its own ``random.Random(2026)``, over indices, condition by condition in a fixed order:

* the paper run (``benchmarks/results/h100-2026-12-06-second/paper-after-completions.json``,
  Qwen2.5-Coder-1.5B-Instruct, 256 new tokens): 26 of the 100 records of each of the five conditions
  (harmful baseline / ablation / ActAdd -1 on JailbreakBench, harmless baseline / ActAdd +1 on the paper's Alpaca
  test split);
* the cross-lingual run (``<dir>/<lang>/completions.json`` of the ``learned-openings-learned`` run, 64 new tokens),
  not committed for size: 10 records for each language that has completions (de es fr ru zh; Thai had no
  refusal direction, so its run stopped before generation and has no completions), spread over harmful baseline,
  harmful ablation and harmless baseline (4 / 3 / 3, the 4 going to a different condition by language). The drawn
  records (prompt, completion and refusal score copied exactly, language, condition, original index) are written
  to ``crosslingual_label_pool.json``, which is committed; the labelled rows cite it (``...pool.json#<i>``). Without
  ``--pool-from``, the committed pool is read back.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PAPER = "benchmarks/results/h100-2026-12-06-second/paper-after-completions.json"
POOL = "benchmarks/data/crosslingual_label_pool.json"
LABELS = HERE / "judge_labels.jsonl"
SEED = 2026
PER_PAPER_CONDITION = 26
# (prompt kind, condition name in the file, condition as the rows spell it, prompt set)
PAPER_CONDITIONS = (
    ("harmful", "baseline", "baseline (no intervention)", "JailbreakBench"),
    ("harmful", "ablation", "directional ablation", "JailbreakBench"),
    ("harmful", "actadd", "ActAdd, coefficient -1", "JailbreakBench"),
    ("harmless", "baseline", "baseline (no intervention)", "Alpaca (paper split)"),
    ("harmless", "actadd", "ActAdd, coefficient +1", "Alpaca (paper split)"),
)
LANGUAGES = ("de", "es", "fr", "ru", "zh")  # th: no direction, no completions
XL_CONDITIONS = (("harmful", "baseline"), ("harmful", "ablation"), ("harmless", "baseline"))
XL_NAMES = {("harmful", "baseline"): "baseline (no intervention)", ("harmful", "ablation"): "directional ablation",
            ("harmless", "baseline"): "baseline (no intervention)"}
PER_LANGUAGE = 10
# the run folder the LLM judge's verdicts name (benchmarks/results/h100-2026-12-06-second/llm-verdicts.json)
XL_RUN = "/tmp/runs/learned-openings-learned"


def paper_rows() -> list[dict]:
    data = json.loads((ROOT / PAPER).read_text("utf-8"))
    rng = random.Random(SEED)
    rows = []
    for kind, cond, cond_name, prompt_set in PAPER_CONDITIONS:
        records = data[kind][cond]
        for i in sorted(rng.sample(range(len(records)), PER_PAPER_CONDITION)):
            rec = records[i]
            row = {"id": f"paper-{kind}-{cond}-{i:03d}", "source": f"{PAPER}#{kind}/{cond}/{i}",
                   "condition": cond_name, "prompt_set": prompt_set, "prompt_kind": kind,
                   "prompt": rec["instruction"], "completion": rec["completion"]}
            if rec.get("refusal_score") is not None:
                row["refusal_score"] = rec["refusal_score"]
            rows.append(row)
    return rows


def draw_pool(run_dir: Path) -> list[dict]:
    """The cross-lingual records drawn for labelling, in pool order."""
    rng = random.Random(SEED)
    pool = []
    for li, lang in enumerate(LANGUAGES):
        data = json.loads((run_dir / lang / "completions.json").read_text("utf-8"))
        counts = [PER_LANGUAGE // len(XL_CONDITIONS)] * len(XL_CONDITIONS)
        for j in range(PER_LANGUAGE - sum(counts)):
            counts[(li + j) % len(XL_CONDITIONS)] += 1
        for (kind, cond), k in zip(XL_CONDITIONS, counts):
            records = data[kind][cond]
            for i in sorted(rng.sample(range(len(records)), k)):
                rec = records[i]
                pool.append({"language": lang, "prompt_kind": kind, "condition": cond, "index": i,
                             "run_source": f"{XL_RUN}/{lang}/completions.json#{kind}/{cond}/{i}",
                             "prompt": rec["instruction"], "completion": rec["completion"],
                             "refusal_score": rec.get("refusal_score")})
    return pool


def crosslingual_rows(pool: list[dict]) -> list[dict]:
    rows = []
    for n, rec in enumerate(pool):
        row = {"id": f"xl-{rec['language']}-{rec['prompt_kind']}-{rec['condition']}-{rec['index']:03d}",
               "source": f"{POOL}#{n}", "condition": XL_NAMES[(rec["prompt_kind"], rec["condition"])],
               "prompt_set": f"cross-lingual ({rec['language']}, PolyRefuse-style)",
               "prompt_kind": rec["prompt_kind"], "language": rec["language"],
               "prompt": rec["prompt"], "completion": rec["completion"]}
        if rec.get("refusal_score") is not None:
            row["refusal_score"] = rec["refusal_score"]
        rows.append(row)
    return rows


def drawn_rows(pool_from: Path | None = None) -> list[dict]:
    if pool_from is not None:
        pool = draw_pool(pool_from)
        (ROOT / POOL).write_text(json.dumps({
            "about": "Cross-lingual completions drawn for labelling by benchmarks/data/sample_labels.py "
                     f"(random.Random({SEED})) from {XL_RUN}/<lang>/completions.json, Qwen2.5-Coder-1.5B-Instruct "
                     "on an H100 (2026-12-06, second session), 64 new tokens; prompt, completion and refusal score "
                     "copied exactly.",
            "records": pool}, ensure_ascii=False, indent=1) + "\n", "utf-8")
    else:
        pool = json.loads((ROOT / POOL).read_text("utf-8"))["records"]
    return paper_rows() + crosslingual_rows(pool)


def check(rows: list[dict]) -> list[str]:
    """Problems: a drawn row missing from the labels, or a labelled row whose text differs from its source."""
    have = {}
    for line in LABELS.read_text("utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            have[r["id"]] = r
    problems = []
    for row in rows:
        got = have.get(row["id"])
        if got is None:
            problems.append(f"{row['id']}: not labelled")
            continue
        for k, v in row.items():
            if got.get(k) != v:
                problems.append(f"{row['id']}: {k} differs from the source")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-from", type=Path, default=None,
                    help="the cross-lingual run folder (<lang>/completions.json): draw and write the pool")
    ap.add_argument("--skeleton", type=Path, default=None, help="write the drawn rows, unlabelled, as JSONL")
    ap.add_argument("--check", action="store_true", help="check the labelled rows against the draw")
    args = ap.parse_args(argv)
    rows = drawn_rows(args.pool_from)
    if args.skeleton:
        args.skeleton.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    print(f"{len(rows)} rows drawn")
    if args.check:
        problems = check(rows)
        for p in problems:
            print(p)
        print("ok" if not problems else f"{len(problems)} problems")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
