"""Write the YAML configs of the lent-GPU runs (``gpu_issues.sh``) into a folder.

    python -m benchmarks.gpu.configs OUT_DIR [--data .data] [--judge /tmp/m/hf] [--dry]

``--data`` is a folder holding copies of the team's datasets (``refusal_direction/``, ``polyrefuse/``, ``text/``,
``benchmarks/``). ``--dry`` loosens the selection filters and shrinks every size so that the same commands run in a
minute on a CPU with a tiny random model (which refuses nothing): a check of the plumbing before GPU time is spent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def configs(data: Path, judge: str, dry: bool) -> dict[str, dict]:
    ce = [
        {"name": "wikitext2", "source": str(data / "text/wikitext-2-raw/wiki.test.raw"), "mode": "text",
         "max_tokens": 2048 if dry else 65536, "seq_len": 512},
        {"name": "truthfulqa_responses", "source": str(data / "benchmarks/truthfulqa/TruthfulQA.csv"),
         "mode": "response", "columns": {"instruction": "Question", "response": "Best Answer"},
         "max_tokens": 1024 if dry else 32768},
        {"name": "own_completions", "source": "completions"},
    ]
    judges = [{"type": "substring"}, {"type": "refusal_score"},
              {"type": "llm", "model": judge, "rubric": "refusal", "batch_size": 128, "name": "llm_refusal"},
              {"type": "llm", "model": judge, "rubric": "safety", "batch_size": 128, "name": "llm_safety"}]
    suite = {"evaluate": {"judges": judges, "cross_entropy": ce, "ce_batch_size": 32, "magnitude": True,
                          "over_refusal": {"contrast": "builtin", "max_new_tokens": 16 if dry else 64}}}
    bench = {"evaluate": {**suite["evaluate"], "benchmarks": {
        "tasks": ["refusal_mmlu", "refusal_arc_challenge", "refusal_truthfulqa_mc1", "refusal_truthfulqa_mc2"],
        "limit": 0.005 if dry else 0.1, "data_dir": str(data / "benchmarks"), "batch_size": 4 if dry else 32}}}
    bench_only = {"evaluate": {"benchmarks": bench["evaluate"]["benchmarks"]}}
    families = yaml.safe_load(Path("docs/configs/inlp-families.yaml").read_text())
    families["evaluate"] = {"cross_entropy": [ce[1], ce[2]], "ce_batch_size": 32}
    judge_pick = {"select": {"objective": {"type": "substring"}, "judge_candidates": 8, "judge_max_new_tokens": 64},
                  "evaluate": {"judges": judges[:2], "cross_entropy": [ce[2]], "magnitude": False, "over_refusal": {}}}
    cross = {"preset": "paper", "data": {"n_test": 100}, "generate": {"max_new_tokens": 64}}
    out = {"base": {}, "eval-suite": suite, "eval-benchmarks": bench, "benchmarks-only": bench_only,
           "inlp-families": families,
           "judge-pick": judge_pick, "crosslingual": cross}
    if dry:
        loose = {"kl_threshold": 1e9, "induce_threshold": -1e9}
        small = {"n_train": 16, "n_val": 8, "n_test": 8, "filter": False}
        for cfg in out.values():
            cfg["select"] = {**cfg.get("select", {}), **loose}
            cfg["data"] = {**cfg.get("data", {}), **small}
            cfg["generate"] = {**cfg.get("generate", {}), "max_new_tokens": 8}
            if "extract" in cfg:
                cfg["extract"]["inlp"] = {"n_iterations": 4}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--data", default=".data")
    ap.add_argument("--judge", default="/tmp/m/hf")
    ap.add_argument("--dry", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, cfg in configs(Path(a.data).resolve(), a.judge, a.dry).items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"Wrote {len(list(out.glob('*.yaml')))} configs to {out}")


if __name__ == "__main__":
    main()
