"""Refusal kept where wanted, measured: per-category refusal rates under the baseline, the paper's ablation and the
keep-refusal condition of each method (``select.keep_refusal_method``: conditional, the CAST-style gate, and/or
orthogonal, the released categories' direction made orthogonal to the kept ones'), each with its 95 % Wilson
interval; the conditional gate's routing rate per category (the share of each category's test prompts it sends to
release); every condition's first-token KL on harmless prompts (the gated one under the same routing); and one panel
per category in a PNG.

    # on the GPU (the lead copies ../shared/datasets/refusal_direction to .data/refusal_direction):
    python -m benchmarks.quality.keep_refusal --model /path/to/Qwen2.5-Coder-1.5B-Instruct \
        --data .data/refusal_direction --keep "Sexual content,Violence" \
        --out benchmarks/results/keep-refusal/qwen2.5-coder-1.5b.json          # --method both (default)
    # one method only
    python -m benchmarks.quality.keep_refusal --model ... --method conditional --out ...
    # the same with JailbreakBench's categories as the test set (mapped onto StrongREJECT's names, see JBB_TO_SR):
    python -m benchmarks.quality.keep_refusal --model ... --data .data/refusal_direction --test jailbreakbench --out ...
    # the plumbing on a CPU with a tiny random model, in about a minute (no refusal to measure):
    DRY=1 python -m benchmarks.quality.keep_refusal --data ../shared/datasets/refusal_direction --out /tmp/kr/tiny.json

Directions come from a categorised harmful set (``--train``: StrongREJECT, 313 prompts in six categories, by
default; HarmBench's val + test, 200 prompts in six; or any file whose records carry ``category``), cut by the run's
seeded splits into train (the per-category directions, the global one, the gate's fit), val (selection, the gate's
layer) and, with ``--test heldout``, the test prompts. Harmless prompts are the paper's Alpaca splits
(``DATA/splits/harmless_*.json``). With ``--method both`` the two methods run as two runs of the same config and
splits (the baseline and ablation columns are the conditional run's).

Writes OUT (JSON: command, date, device, versions, model, selection, kept / released categories, each method's
numbers from categories.json, the gate's layer and accuracies and routing, KL per condition, per-category rates per
condition and a table with, per category, each method's change from baseline and whether it lies in the baseline's
interval), OUT with ``.png`` (one panel per category) and ``.md`` (the table), and the run folders (``--runs``;
their reports with ``refusal report RUN_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# JailbreakBench's ten categories onto StrongREJECT's six, where one clearly holds the other; the rest keep their
# own names (reported, but neither kept nor released)
JBB_TO_SR = {
    "Sexual/Adult content": "Sexual content",
    "Physical harm": "Violence",
    "Harassment/Discrimination": "Hate, harassment and discrimination",
    "Disinformation": "Disinformation and deception",
    "Fraud/Deception": "Disinformation and deception",
    "Malware/Hacking": "Non-violent crimes",
}
DEFAULT_KEEP = {"strongreject": "Sexual content,Violence", "harmbench": "chemical_biological,harassment_bullying"}
CONDITIONS = ("baseline", "ablation", "keep_refusal")
METHODS = ("conditional", "orthogonal")


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return f"cpu ({platform.processor() or platform.machine()})"


def tiny_model(folder: Path) -> None:
    """A tiny random Qwen2 (benchmarks/tiny.py) whose tokenizer knows the built-in sets and refusal phrases."""
    from importlib import resources

    from benchmarks.tiny import save_tiny_qwen2

    data = resources.files("refusal").joinpath("data", "builtin")
    corpus = []
    for name in ("harmful.json", "harmless.json"):
        corpus += [r["instruction"] for r in json.loads(data.joinpath(name).read_text("utf-8"))]
    phrases = json.loads(data.joinpath("refusal_phrases.json").read_text("utf-8"))
    save_tiny_qwen2(folder, corpus + phrases["phrases"] + phrases["refusal_openings"], max_positions=1024)


def harmful_source(train: str, data: Path | None, work: Path) -> tuple[str, str]:
    """(path of the categorised harmful set, its short name)."""
    if train == "strongreject":
        return str(_need(data, "processed/strongreject.json")), "strongreject"
    if train == "harmbench":  # the processed val and test files together: 200 prompts in six categories
        rows = [r for f in ("harmbench_val.json", "harmbench_test.json")
                for r in json.loads(_need(data, f"processed/{f}").read_text("utf-8"))]
        p = work / "harmbench_all.json"
        p.write_text(json.dumps(rows))
        return str(p), "harmbench"
    if train == "builtin":
        return "builtin:harmful", "builtin"
    return train, Path(train).stem


def _need(data: Path | None, rel: str) -> Path:
    if data is None or not (data / rel).is_file():
        sys.exit(f"error: {rel} not found under --data {data}: pass the refusal_direction folder (with processed/ "
                 "and splits/)")
    return data / rel


def mapped_test(data: Path | None, work: Path, mapping: dict[str, str]) -> str:
    """JailbreakBench with its categories renamed by ``mapping`` (the others unchanged), as a file in ``work``."""
    rows = json.loads(_need(data, "processed/jailbreakbench.json").read_text("utf-8"))
    out = [{**r, "category": mapping.get(r.get("category"), r.get("category"))} for r in rows]
    p = work / "jailbreakbench_mapped.json"
    p.write_text(json.dumps(out))
    return str(p)


def columns(summaries: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """``{column: {category: {"refusal": rate}}}``: baseline and ablation (from the first run), then each method's
    keep_refusal condition under the method's name."""
    from refusal.report.categories import per_category

    first = next(iter(summaries.values()))
    by_cond = per_category(first["results"])
    out = {c: by_cond[c] for c in ("baseline", "ablation") if c in by_cond}
    for method, summary in summaries.items():
        kr = per_category(summary["results"]).get("keep_refusal")
        if kr is not None:
            out[method] = kr
    return out


def table(cols: dict[str, dict[str, dict]], role: dict[str, str], routing: dict[str, dict] | None = None) -> list[dict]:
    """One row per test category: its rate under each column, the gate's routing rate (conditional), and per method
    the change from baseline and whether it lies in the baseline's interval."""
    from refusal.report.categories import ordered

    rows = []
    methods = [m for m in METHODS if m in cols]
    for cat in ordered((c for v in cols.values() for c in v), role):
        rates = {c: (cols[c].get(cat) or {}).get("refusal") for c in cols}
        row = {"category": cat, "role": role.get(cat, "other"), "n": next((r["n"] for r in rates.values() if r), 0),
               **rates}
        if routing is not None:
            row["routed_to_release"] = routing.get(cat)
        b = rates.get("baseline")
        for m in methods:
            k = rates.get(m)
            if b and k and b["rate"] is not None and k["rate"] is not None:
                row[f"{m}_minus_baseline"] = round(k["rate"] - b["rate"], 4)
                row[f"{m}_in_baseline_ci"] = b["low"] <= k["rate"] <= b["high"]
                row[f"{m}_intervals_overlap"] = k["low"] <= b["high"] and b["low"] <= k["high"]
        rows.append(row)
    return rows


def markdown(rows: list[dict], cols: list[str], kl: dict, head: str, notes: list[str] = ()) -> str:
    def cell(r):
        return "—" if not r or r["rate"] is None else f"{r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"

    methods = [m for m in METHODS if m in cols]
    gate = any("routed_to_release" in r for r in rows)
    names = cols + (["gate: routed to release"] if gate else []) + [f"{m} − baseline" for m in methods]
    lines = [head, "", "| category | role | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [cell(r.get(c)) for c in cols] + ([cell(r.get("routed_to_release"))] if gate else [])
        for m in methods:
            d = r.get(f"{m}_minus_baseline")
            cells.append("—" if d is None else f"{d:+.2f}")
        lines.append(f"| {r['category']} | {r['role']} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", "First-token KL(baseline ‖ condition) on the harmless test prompts: "
              + ", ".join(f"{c} {max(v, 0.0):.4f}" for c, v in kl.items() if v is not None) + "."]
    lines += [""] + list(notes) if notes else []
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder, hub id or catalog name (not needed with --tiny)")
    ap.add_argument("--data", default=".data/refusal_direction",
                    help="the refusal_direction folder (processed/ and splits/); default .data/refusal_direction")
    ap.add_argument("--train", default="strongreject",
                    help="categorised harmful set: strongreject (default), harmbench, builtin or a file")
    ap.add_argument("--test", default="heldout", choices=("heldout", "jailbreakbench"),
                    help="heldout: the train set's own held-out prompts; jailbreakbench: JBB's 100, categories mapped")
    ap.add_argument("--keep", default=None, help="categories whose refusal is kept (default: by --train; ';' "
                                                 "between names that hold commas)")
    ap.add_argument("--out", required=True, help="the JSON to write (and .png, .md beside it)")
    ap.add_argument("--runs", default=None, help="runs root folder (default: a folder beside --out)")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-val", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--no-filter", action="store_true", help="keep train/val prompts the model does not refuse")
    ap.add_argument("--seed", type=int, default=None, help="data.seed: another split of the same prompts "
                                                          "(default: the run's, 42)")
    ap.add_argument("--max-release", type=float, default=None,
                    help="select.keep_refusal_max_release (default: the run's, 0.1)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--method", default="both", choices=(*METHODS, "both"),
                    help="select.keep_refusal_method to measure: conditional (the gate), orthogonal, or both (two "
                         "runs, default)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (also DRY=1): plumbing only")
    a = ap.parse_args(argv)
    tiny = a.tiny or os.environ.get("DRY") == "1"
    if not tiny and not a.model:
        ap.error("--model is needed (or --tiny / DRY=1)")
    t0 = time.perf_counter()
    data = Path(a.data).expanduser() if a.data else None
    if data is not None and not data.is_dir():
        if not tiny:
            sys.exit(f"error: --data {a.data} is not a folder: pass the refusal_direction folder")
        data = None  # tiny without the shared data: the built-in categorised sets
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    runs = Path(a.runs) if a.runs else work / "runs"
    train = a.train if not (tiny and data is None) else "builtin"
    harmful, train_name = harmful_source(train, data, work)
    keep = a.keep or DEFAULT_KEEP.get(train_name) or ("violence_weapons" if train_name == "builtin" else None)
    if not keep:
        ap.error("--keep is needed for this --train set")
    harmless = str(data) if data is not None else "builtin:harmless"
    over: dict = {"data": {"harmful": harmful, "harmless": harmless}, "select": {"keep_refusal": None},
                  "output": str(runs), "name": f"keep-refusal-{train_name}-{a.test}" + ("-tiny" if tiny else "")}
    if a.test == "jailbreakbench":
        over["data"]["harmful_test"] = mapped_test(data, work, JBB_TO_SR)
    from refusal.directions.categories import parse_categories

    over["select"]["keep_refusal"] = parse_categories(keep)
    n_rows = len(json.loads(Path(harmful).read_text("utf-8"))) if Path(harmful).is_file() else None
    if tiny:
        folder = work / "tiny-qwen2"  # beside the outputs: the run's config names it
        tiny_model(folder)
        over.update(model=str(folder), device="cpu", preset="cpu")
        over["data"].update(n_train=30, n_val=4, n_test=30 if a.test == "heldout" else 100, filter=False)
        over["select"].update(kl_threshold=1e9, induce_threshold=-1e9, layer_stride=1)
        over["generate"] = {"max_new_tokens": 4, "kl": True}
        over["evaluate"] = {"cross_entropy": []}
    else:
        over.update(model=a.model, preset="paper" if a.device in (None, "cuda") or str(a.device).startswith("cuda")
                    else "cpu")
        test_n = 100 if a.test == "jailbreakbench" else None
        n_val = 32
        n_train = 160 if a.test == "heldout" else 240
        if n_rows and a.test == "heldout":  # the rest of the set is the test split
            n_train = min(n_train, (n_rows - n_val) // 2)
            test_n = n_rows - n_train - n_val
        over["data"].update(n_train=n_train, n_val=n_val, n_test=test_n or 100, filter=not a.no_filter)
        over["generate"] = {"max_new_tokens": 128}
        over["evaluate"] = {"cross_entropy": []}  # the KL is the cost measured here
    for key, v in (("n_train", a.n_train), ("n_val", a.n_val), ("n_test", a.n_test)):
        if v is not None:
            over["data"][key] = v
    if a.max_new_tokens is not None:
        over["generate"]["max_new_tokens"] = a.max_new_tokens
    if a.device:
        over["device"] = a.device
    if a.no_filter:
        over["data"]["filter"] = False
    if a.seed is not None:
        over["data"]["seed"] = a.seed
    if a.max_release is not None:
        over["select"]["keep_refusal_max_release"] = a.max_release

    from refusal import io
    from refusal.config import resolve
    from refusal.report import write_report
    from refusal.report.categories import category_plot, roles
    from refusal.runs.pipeline import Run

    methods = list(METHODS) if a.method == "both" else [a.method]
    summaries: dict[str, dict] = {}
    cats: dict[str, dict] = {}
    runs_made: dict[str, Run] = {}
    for m in methods:
        o = json.loads(json.dumps(over))  # a copy per method
        o["select"]["keep_refusal_method"] = m
        o["name"] = f"{over['name']}-{m}"
        run_dir = runs / o["name"]
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run: nothing resumed
        run = Run(resolve(None, o))
        summaries[m] = run.run()
        cats[m] = io.read_json(run.dir / "categories.json")
        runs_made[m] = run
        write_report(run.dir)
    first = summaries[methods[0]]
    role = roles(first)
    cols = columns(summaries)
    kl = {c: first["results"]["harmful"].get(c, {}).get("kl_harmless") for c in ("baseline", "ablation")}
    for m, summary in summaries.items():
        kl[m] = summary["results"]["harmful"].get("keep_refusal", {}).get("kl_harmless")
    gate = (summaries.get("conditional") or {}).get("keep_refusal") or {}
    routing = gate.get("routing") if "conditional" in summaries else None
    rows = table(cols, role, routing)
    title = (f"{Path(str(first['model'])).name}: refusal per category ({train_name} directions, "
             f"{'held-out ' + train_name if a.test == 'heldout' else 'JailbreakBench'} test)")
    category_plot(cols, role, kl={c: kl.get(c) for c in cols}, title=title, path=out.with_suffix(".png"),
                  routing=routing)
    import torch
    import transformers

    run0 = runs_made[methods[0]]
    cat0 = cats[methods[0]]
    method_info: dict[str, dict] = {}
    for m in methods:
        c = cats[m]
        info = {"norm_fraction": c.get("norm_fraction"),
                "cosine_kept_direction_selected": c.get("cosine_kept_direction_selected"),
                "kl_harmless": kl.get(m), "run_dir": str(runs_made[m].dir),
                "rates": {"overall": summaries[m]["results"]["harmful"]["keep_refusal"]["refusal"],
                          "by_category": cols.get(m, {})}}
        if m == "conditional":
            info["description"] = ("CAST-style gate (Lee et al. 2024): ridge regression on the residual stream "
                                   "averaged over the prompt's own tokens, cross-validated on the harmful train and "
                                   "val prompts (layer and penalty by out-of-fold AUC, threshold for at most "
                                   "select.keep_refusal_max_release of kept prompts released out of fold); the "
                                   "prompts it routes to release get the selected direction ablated at every layer, "
                                   "the others nothing")
            info["condition"] = {k: c.get("condition", {}).get(k) for k in
                                 ("layer", "pool", "penalty", "max_kept_release", "folds", "out_of_fold",
                                  "per_layer", "n", "out_of_fold_released_by_category")}
            info["routing"] = gate.get("routing")
            info["routing_overall"] = gate.get("routing_overall")
            info["routing_harmless"] = gate.get("routing_harmless")
        else:
            info["description"] = ("the released categories' count-weighted mean difference in means, made "
                                   "orthogonal (QR) to the span of the kept categories' directions, ablated at "
                                   "every layer for every prompt")
        method_info[m] = info
    result = {
        "command": "python -m benchmarks.keep_refusal " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name() if str(run0.device).startswith("cuda") else first["device"],
        "torch": torch.__version__, "transformers": transformers.__version__, "tiny_random_model": tiny,
        "model": first["model"], "dtype": first["dtype"], "selected": first["selected"],
        "methods": method_info, "method": a.method,
        "train": {"set": train_name, "source": harmful, "n_train_per_category": cat0["n_train"],
                  "uncategorised_train": cat0["uncategorised_train"], "filtered": bool(run0.cfg.data.filter)},
        "test": {"set": "held-out " + train_name if a.test == "heldout" else "jailbreakbench",
                 "mapping": JBB_TO_SR if a.test == "jailbreakbench" else None},
        "kept": cat0["kept"], "released": cat0["released"],
        "cosine_category_with_selected": cat0["cosine_with_selected"], "category_similarity": cat0["similarity"],
        "kl_harmless": kl, "max_new_tokens": first["max_new_tokens"],
        "rates": {c: {"overall": (summaries[c] if c in METHODS else first)["results"]["harmful"][
            "keep_refusal" if c in METHODS else c]["refusal"], "by_category": v} for c, v in cols.items()},
        "harmless_refusal": {c: m["refusal"] for c, m in first["results"].get("harmless", {}).items()},
        "table": rows, "stage_seconds": {m: s["stage_seconds"] for m, s in summaries.items()},
        "wall_s": round(time.perf_counter() - t0, 2),
        "run_dirs": {m: str(r.dir) for m, r in runs_made.items()}, "plot": str(out.with_suffix(".png")),
    }
    io.write_json(out, result)
    notes = []
    if "conditional" in method_info:
        ci = method_info["conditional"]["condition"]
        oof = ci["out_of_fold"] or {}
        notes.append(f"Gate (conditional): layer {ci['layer']} ({ci['pool']} pool, ridge penalty {ci['penalty']}); "
                     f"out of fold on the train and val prompts: AUC {oof.get('auc')}, released prompts released "
                     f"{oof.get('released_recall')}, kept prompts released {oof.get('kept_released')} (target at "
                     f"most {ci['max_kept_release']}); harmless test prompts routed to release: "
                     + (f"{gate['routing_harmless']['count']}/{gate['routing_harmless']['n']}"
                        if gate.get("routing_harmless") else "—") + ".")
    if "orthogonal" in method_info and method_info["orthogonal"]["norm_fraction"] is not None:
        notes.append(f"Orthogonal: the released direction keeps {method_info['orthogonal']['norm_fraction']:.1%} of "
                     "its norm outside the kept categories' span.")
    md = markdown(rows, list(cols), kl, f"Refusal rate per category, {result['device']}, {result['model']} "
                  f"(kept: {', '.join(cat0['kept'])}; methods: {', '.join(methods)})", notes)
    io.write_text(out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.md')}; run folders "
          + ", ".join(str(r.dir) for r in runs_made.values()))
    return result


if __name__ == "__main__":
    main()
