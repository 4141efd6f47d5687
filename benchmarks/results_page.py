"""Write ``docs/results.md`` from the committed result files: every table read from JSON, each with its provenance.

    python -m benchmarks.results_page            # rewrite docs/results.md
    python -m benchmarks.results_page --check    # exit 1 if docs/results.md differs from what the files give
    python -m benchmarks.results_page --unread   # list result files under benchmarks/results/ no table reads

Each table names its source file and, from that file, the device, date, commit and command that made it; a field
the file lacks is shown as "not recorded" (nothing is filled in from memory or prose). Files known to have been
edited by hand are flagged where they are used, and figures that exist only in prose are listed as such. The page
is a pure function of the files: no clock, no git, so regenerating it from the same files gives the same bytes.
(The module is not ``benchmarks.results``: that name is the data folder ``benchmarks/results/``.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results.md"
RESULTS = "benchmarks/results"
NR = "not recorded"

# Files whose content is not (only) what a script wrote. Shown wherever the file is used.
HAND_EDITED = {
    f"{RESULTS}/vs_heretic.json": (
        "**Edited by hand** (`git log -p benchmarks/results/vs_heretic.json`): no script writes it; commit 05d48f7 "
        "switched `beats_heretic` from false to true while the file's own notes say heretic is \"not beaten\" on its "
        "criterion; its top-level `device` names the H100 although the refusal figures beside it were measured on "
        "an H200 (`refusal_device`); and its `metric` says heretic's trial was scored by this repository's "
        "re-implementation of heretic's evaluator, which (issue 28) it was not. Until `benchmarks/peers/` rewrites "
        "it, read its numbers with these caveats and ignore `beats_heretic`."),
}

# Figures quoted in earlier versions of this page or the README that no committed file holds.
PROSE_ONLY = [
    ("The paper's own code (andyrdt/refusal_direction) on the paper run: 135.9 s on an H200",
     "issue 9's figure; no log or JSON of that run is committed"),
    ("The LLM judge agreeing with a reader on 15 / 20 items (strictly 10 / 20: PARTIAL counted as agreement)",
     "the 20 items and their reading are not committed; replaced by the labelled set below "
     "(`benchmarks/data/judge_labels.jsonl`, table \"Judges against labels\")"),
    ("The 7-language cross-lingual run taking 144.7 s (\"145 s\") on an H200",
     "the run folder `docs/runs/crosslingual-h200/` records per-stage seconds for each language but not the "
     "run's wall time"),
    ("CPU prefill of the 60 generation rows: 106.6 s (whole padded rows) -> 65.7 s (shared prefix) -> 41.7 s "
     "(and length buckets)", "timed by hand in a session; no script or file records them"),
    ("CPU run times before 2026-12-01 evening (12 min 2 s, 8 min 59 s, 6 min 55 s, 6 min 48 s, 7 min 1 s, "
     "6 min 42 s)", "from `/usr/bin/time` in sessions; only `cpu-run.json`'s `before` block keeps two of them"),
    ("The paper run on the H100 taking 137.8 s (sum of stage seconds, 2026-11-23)",
     "stage seconds are in `docs/runs/qwen2.5-coder-1.5b/summary.json`; the wall time was not measured"),
]

# What a result file may have beside it (``unread`` does not list these): a folder's own files, where the folder holds a
# file the page reads, and a read file's log, text and renderings (same stem; a step's log may be the stem's prefix).
FOLDER_FILES = {"README.md", "steps.txt", "device.txt"}
SUPPORT_SUFFIXES = {".log", ".txt", ".png", ".md"}

# Files under benchmarks/results/ that no table reads but that stay in the tree, one reason each (a path ending in
# "/" keeps the whole folder). Everything else no table reads leaves the tree (git keeps it).
KEPT_UNREAD = {
    f"{RESULTS}/h200-2026-12-01/over_refusal.json":
        "the completions docs/judge-labels.md labels and benchmarks.quality.llm_verdicts judges (llm-verdicts.json)",
    f"{RESULTS}/h100-2026-12-06/matrix-floor.log":
        "the log of arch-matrix-cuda-floor.json (gpu_round3.sh names the step matrix-floor)",
    f"{RESULTS}/h100-2026-12-06-second/paper-after-completions.json":
        "the paper run's completions that benchmarks/data/judge_labels.jsonl labels (130 rows) and llm-verdicts judges",
    f"{RESULTS}/h100-2026-12-06-second/learned-runs/":
        "the two cross-lingual runs' summaries, transfer and similarity, and each learned list with its evidence "
        "(openings.json): what learned-openings.json's tables summarise",
    f"{RESULTS}/h100-2026-12-06-second/learned-learned.log": "log of learned-openings.json (learned lists)",
    f"{RESULTS}/h100-2026-12-06-second/learned-shipped.log": "log of learned-openings.json (shipped lists)",
    f"{RESULTS}/h100-2026-12-06-second/learned-tables.log": "a log of learned-openings.json (the tables step)",
    f"{RESULTS}/h100-2026-12-06-second/matrix.log": "the log of arch-matrix-cuda.json",
    f"{RESULTS}/h100-2026-12-06-fourth/matrix.log": "the log of arch-matrix-cuda.json",
    f"{RESULTS}/h100-2026-12-06-fifth/matrix.log": "the log of arch-matrix-cuda.json",
    f"{RESULTS}/h100-2026-12-06-sixth/keep-seed1.log": "the log of keep-refusal-seed1.json",
    f"{RESULTS}/h100-2026-12-06-sixth/keep-seed2.log": "the log of keep-refusal-seed2.json",
    f"{RESULTS}/h100-2026-12-06-fourth/keep-jbb.log": "the log of keep-refusal-jbb.json (step keep-jbb)",
    f"{RESULTS}/h100-2026-12-06-second/paper-warm.log": "the log of paper-warmup.json",
    f"{RESULTS}/h100-2026-12-06-second/paper-warm-2.log": "the log of paper-warmup-2.json",
    f"{RESULTS}/h100-2026-12-06-second/call-C.log": "the log of call C (paper-warmup-2, paper-before/after-2 and -3)",
}

# Published figures (Arditi et al. 2024, Table 1): not measured here.
PAPER = [
    ("qwen-1.8b-chat", "(−2, 15)", 0.30, 0.99, 0.97, 0.97, 0.02),
    ("gemma-2b-it", "(−2, 10)", 0.09, 1.00, 0.98, 1.00, 0.00),
    ("yi-6b-chat", "(−5, 20)", 0.38, 0.98, 0.98, 0.95, 0.12),
    ("llama-2-7b-chat", "(−1, 14)", 0.03, 0.93, 0.97, 0.99, 0.00),
    ("llama-3-8b-instruct", "(−5, 12)", 0.05, 1.00, 0.99, 0.99, 0.00),
]


class Page:
    """Collects the page's lines and the files its tables read."""

    def __init__(self, root: Path = ROOT):
        self.root = root
        self.lines: list[str] = []
        self.read: set[str] = set()

    def load(self, rel: str) -> Any:
        self.read.add(rel)
        return json.loads((self.root / rel).read_text(encoding="utf-8"))

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(_cell(c) for c in row) + " |")
        self.add("")

    def source(self, rel: str, data: Mapping | None = None, extra: Mapping[str, str] | None = None) -> None:
        """The provenance line of a table: file, device, date, commit, command (each from the file, or NR)."""
        data = self.load(rel) if data is None else data
        p = provenance(data)
        if extra:
            p.update(extra)
        cmd = p["command"] if p["command"] == NR else f"`{p['command']}`"
        self.add(f"Source: [`{rel}`]({_link(rel)}) · device: {p['device']} · date: {p['date']} · "
                 f"commit: {p['commit']} · command: {cmd}", "")
        if rel in HAND_EDITED:
            self.add(f"> {HAND_EDITED[rel]}", "")

    def text(self) -> str:
        return "\n".join(self.lines).rstrip("\n") + "\n"


def _link(rel: str) -> str:
    return "../" + rel if not rel.startswith("docs/") else rel[len("docs/"):]


def _cell(c: Any) -> str:
    if c is None:
        return "—"
    if isinstance(c, float):
        return f"{c:g}"
    return str(c).replace("|", "\\|")


def provenance(data: Mapping) -> dict[str, str]:
    """Device, date, commit and command as the file records them (``"not recorded"`` where it does not)."""
    def first(*keys: str) -> str:
        for k in keys:
            v = data.get(k)
            if isinstance(v, str) and v.strip():
                return v.strip()
        return NR

    command = first("command", "script")
    if command.startswith("-m "):  # benchmarks/paper_run.py records the interpreter's arguments
        command = "python " + command
    return {"device": first("device_name", "device"), "date": first("measured_at", "timestamp", "date"),
            "commit": first("commit", "git_commit"), "command": command}


def rate(r: Mapping | None, digits: int = 2) -> str:
    """``0.82 [0.73, 0.88] (82/100)`` from a stored rate (count, n, rate, low, high)."""
    if not r:
        return "—"
    return f"{r['rate']:.{digits}f} [{r['low']:.{digits}f}, {r['high']:.{digits}f}] ({r['count']}/{r['n']})"


def wilson_str(k: int, n: int) -> str:
    from refusal.evaluation.stats import wilson

    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.2f} [{lo:.2f}, {hi:.2f}]"


def fisher_exact(a: int, n1: int, b: int, n2: int) -> float:
    """Two-sided Fisher's exact test of ``a`` of ``n1`` against ``b`` of ``n2`` (sum of the tables no more likely
    than the observed one, as scipy's ``fisher_exact`` does)."""
    k = a + b
    lo, hi = max(0, k - n2), min(k, n1)

    def p(x: int) -> float:
        return math.comb(n1, x) * math.comb(n2, k - x) / math.comb(n1 + n2, k)

    observed = p(a)
    return min(1.0, sum(p(x) for x in range(lo, hi + 1) if p(x) <= observed * (1 + 1e-7)))


def _sel(s: Mapping | None) -> str:
    return "—" if not s else f"({s['pos']}, {s['layer']})".replace("-", "−")


# ----------------------------------------------------------------------------------------------------------------
# Sections


def fidelity(page: Page) -> None:
    page.add("## Fidelity to the paper", "",
             "Qwen2.5-Coder-1.5B-Instruct (the catalog's GGUF, dequantized to bf16) with the paper's splits, "
             "JailbreakBench's 100 behaviours as harmful test and 100 `harmless_test` prompts, greedy, 256 new "
             "tokens; `refusal run --preset paper`. As in the paper's Table 1, every rate column is the share of "
             "completions that did **not** refuse (substring judge), so under ActAdd(+) on harmless prompts low is "
             "the goal. Intervals are 95 % Wilson.", "")
    rel = f"{RESULTS}/h200-run.json"
    d = page.load(rel)
    res = d["summary"]["results"]

    def nonref(part: str, cond: str) -> str:
        return rate(res[part][cond]["non_refusal"])

    page.table(["run", "selected (pos, layer)", "harmful baseline", "harmful ablation", "harmful ActAdd(−)",
                "harmless baseline", "harmless ActAdd(+)"],
               [["latest paper run (H200)", _sel(d["selected"]), nonref("harmful", "baseline"),
                 nonref("harmful", "ablation"), nonref("harmful", "actadd"), nonref("harmless", "baseline"),
                 nonref("harmless", "actadd")]])
    page.source(rel, d)
    rel2 = "docs/runs/qwen2.5-coder-1.5b/summary.json"
    s = page.load(rel2)
    page.table(["run", "selected", "harmful baseline", "harmful ablation", "harmful ActAdd(−)",
                "harmless baseline", "harmless ActAdd(+)", "n"],
               [["earlier run (H100), rates without counts",
                 _sel(s["selected"]), s["harmful"]["baseline"], s["harmful"]["ablation"], s["harmful"]["actadd"],
                 round(1 - s["harmless"]["baseline"], 2), round(1 - s["harmless"]["actadd"], 2),
                 f"{s['n_harmful']} + {s['n_harmless']}"]])
    page.add("(This file stores harmless *refusal* rates; the table shows 1 − rate to match the paper's columns.)", "")
    page.source(rel2, s)
    page.add("Published figures for comparison (Arditi et al. 2024, Table 1; not measured here):", "")
    page.table(["model (paper)", "selected", "harmful baseline", "harmful ablation", "harmful ActAdd(−)",
                "harmless baseline", "harmless ActAdd(+)"], PAPER)


def model_families(page: Page) -> None:
    """The architecture matrix's CUDA paths against ``model.generate``, with the model's own rounding floor."""
    page.add("## Model families on CUDA", "",
             "Every family of `tests/archs.py` (tiny random models; the CPU matrix is [`docs/models.md`](models.md)) "
             "on a GPU: `refusal.generate` on each path against `model.generate`, greedy, 8 new tokens. The floor "
             "row is the model's own code against itself (`model.generate` with its other attention "
             "implementation, eager ↔ SDPA): where it differs too, a path's difference is rounding on near-tied "
             "logits, not evidence of a wrong computation.", "")
    base = f"{RESULTS}/h100-2026-12-06"
    rel = f"{base}/arch-matrix-cuda-floor.json"
    d = page.load(rel)
    cells: dict = {}
    for r in d["rows"]:
        cells.setdefault((r["dtype"], r["path"]), []).append(r["status"])
    rows = []
    for dt in ("float32", "bfloat16"):
        for path in ("model's other attention", "eager", "graphs", "compiled"):
            st = cells.get((dt, path), [])
            if st:
                rows.append([dt, path, sum(x == "match" for x in st), sum(x == "differs" for x in st),
                             sum(x in ("refused", "n/a") for x in st)])
    page.table(["dtype", "path", "match", "differ", "refused / n/a"], rows)
    floor = {(r["family"], r["dtype"]): r["status"] for r in d["rows"] if r["path"] == "model's other attention"}
    odd = sorted({f"{r['family']} {r['dtype']} {r['path']}" for r in d["rows"] if r["status"] == "differs"
                  and r["path"] != "model's other attention" and floor.get((r["family"], r["dtype"])) == "match"})
    page.add("Fast-path differences in families whose own implementations agree: "
             + (", ".join(odd) if odd else "none") + ".", "")
    page.source(rel, {**d, "command": "bash benchmarks/gpu_round3.sh matrix (python -m benchmarks.arch_matrix)",
                      "date": "2026-12-06", "commit": "07181bd, with arch_matrix.py of 3ba4be7"})
    greedy_checks(page)
    before, after = page.load(f"{base}/step8b-before.json"), page.load(f"{base}/step8b-after.json")
    page.add("The 8B decode step before and after the fidelity rule (random Llama-3-8B shape, batch 64, 128 new "
             "tokens, `python -m benchmarks.profile_generate --variants default`, the same machine in one call):", "")
    page.table(["code", "ms per step", "greedy tokens vs a plain forward"],
               [[label, x["ms_per_step"], x["variants"]["default"]["greedy_check"]["tokens_greedy"]]
                for label, x in (("71497bc (before)", before), ("07181bd (after)", after))])
    page.source(f"{base}/step8b-after.json", {**after, "command": "bash benchmarks/gpu_round3.sh step8b",
                                                "date": "2026-12-06"})
    rel = f"{RESULTS}/h100-2026-12-06-fourth/step8b-bandwidth.json"
    bw = page.load(rel)
    v = bw["variants"][bw["best_variant"]]
    m = bw["bandwidth_measured"]
    page.add(f"The same step against the bandwidth this H100 shows on a large copy ({m['tbps']} TB/s: {m['method']}; "
             f"{m['bytes_per_copy'] / 2**30:.0f} GiB, {m['repeats']} repeats) rather than a datasheet figure: "
             f"{bw['ms_per_step']} ms per step at batch {bw['batch']}, against {bw['bound_ms_per_step']} ms for "
             f"reading the weights once ({100 * bw['bound_fraction']:.0f} % of that bound) and "
             f"{bw['bound_with_kv_ms_per_step']} ms with the KV cache's mean bytes per step as well "
             f"({100 * v['bound_with_kv_fraction']:.0f} %); greedy against a plain forward "
             f"{v['greedy_check']['tokens_greedy']:.2f} of {v['greedy_check']['tokens_checked']} tokens, largest "
             f"deficit {v['greedy_check']['deficit_max']} logits (random weights of the 8B shape).", "")
    page.source(rel, {**bw, "command": "STEP8B=1 bash benchmarks/gpu_call.sh E (python -m benchmarks.profile_generate "
                                       "--arch llama3-8b --batch 64 --variants default --kernels 0 "
                                       "--measure-bandwidth)", "date": "2026-12-06", "commit": "c333842"})


def greedy_checks(page: Page) -> None:
    """The second H100 matrix: every cell that differs from ``model.generate``, with its greedy-deficit check."""
    rel = f"{RESULTS}/h100-2026-12-06-second/arch-matrix-cuda.json"
    d = page.load(rel)
    sm = d["summary"]
    page.add(f"A second run of the matrix (same fast paths: {sm['match']} match, {sm['differs']} differ, "
             f"{sm['refused']} refused) checks every cell that differs against one plain forward of the model over "
             "prompt + the path's own tokens: per token, the largest logit minus the chosen token's (`deficit`). "
             "Rounding on near ties gives a fraction of a logit; a wrong computation gives whole logits.", "")
    rows = [[r["family"], r["dtype"], r["path"], g["tokens_greedy"], g["deficit_max"], g["logit_max_minus_mean"]]
            for r in d["rows"] if (g := r.get("greedy_check"))]
    page.table(["family", "dtype", "path", "share of tokens greedy", "largest deficit (logits)",
                "logit spread (max − mean)"], rows)
    page.source(rel, {**d, "command": "bash benchmarks/gpu_call.sh A (python -m benchmarks.arch_matrix)",
                      "date": "2026-12-06", "commit": "108eeb6"})
    rel = f"{RESULTS}/h100-2026-12-06-fourth/arch-matrix-cuda.json"
    d = page.load(rel)
    sm = d["summary"]
    checked = [r for r in d["rows"] if r.get("greedy_check")]
    page.add(f"The matrix again after the greedy check became stop-aware (a row's padding after its stop token is "
             f"no longer scored; {sm['match']} match, {sm['differs']} differ, {sm['refused']} refused), with the "
             "decoder's head output recorded at every step and compared with the plain forward's at the same "
             "position (`step_head_max_abs_diff`), and, for each prompt whose tokens differ, the first token that "
             "does and the model's own margin there:", "")
    rows = []
    for r in checked:
        g, fd = r["greedy_check"], r.get("first_differences") or []
        heads = [x for x in r.get("step_head_max_abs_diff") or [] if x == x]  # NaN: no live row at that step
        rows.append([r["family"], r["dtype"], r["path"], g["tokens_greedy"], g["deficit_max"],
                     max(heads) if heads else "—", r.get("head_max_minus_mean", "—"),
                     ", ".join(f"{x['model_margin_want_minus_got']:g}" for x in fd) or "—"])
    page.table(["family", "dtype", "path", "share of tokens greedy", "largest deficit (logits)",
                "largest head difference (logits)", "logit spread (max − mean)",
                "model's margin at each first difference"], rows)
    vl = next((r for r in checked if r["family"] == "qwen2_5_vl" and r["dtype"] == "bfloat16"), None)
    gem = next((r for r in checked if r["family"] == "gemma" and r["dtype"] == "bfloat16"), None)
    if vl and gem:
        page.add(f"Qwen2.5-VL bf16 with CUDA graphs, the cell the first run scored at a deficit of 7.75 logits, now "
                 f"checks at {vl['greedy_check']['deficit_max']:g}: the old figure was the padding written after a "
                 "row's stop token. Gemma bf16 with CUDA graphs was the one cell whose head output strayed by whole "
                 f"logits ({max(x for x in gem['step_head_max_abs_diff'] if x == x):g} at a spread of "
                 f"{gem['head_max_minus_mean']:g}; the other families stay under 0.6) and whose first differences "
                 "were not ties (the model prefers its own token by "
                 + ", ".join(f"{x['model_margin_want_minus_got']:g}" for x in gem["first_differences"])
                 + " logits): a wrong computation, found and fixed below.", "")
    page.source(rel, {**d, "command": "MATRIX=1 bash benchmarks/gpu_call.sh E (python -m benchmarks.arch_matrix)",
                      "date": "2026-12-06", "commit": "c333842"})
    static_toggles(page)


def static_toggles(page: Page) -> None:
    """The Gemma bf16 cell: the decoder's replacements turned off one at a time, before and after the fix."""
    base = f"{RESULTS}/h100-2026-12-06-fifth"
    before, after = page.load(f"{base}/toggles-before.json"), page.load(f"{base}/toggles-after.json")
    page.add("The static decoder with each of its replacements turned off in turn "
             "(`benchmarks/fidelity/static_toggles.py`; head output against the plain forward over the same tokens, "
             "largest over the steps, logits; the floor is the model's own forward with its other attention "
             "implementation). Before the fix only turning off the Triton gate/up + activation kernel brought Gemma "
             "to its floor: the kernel's check on random input (\"the same output to rounding\") took its tolerance "
             "relative to the largest output over all input scales, where SiLU and tanh-GELU agree to a few percent, "
             "so in bf16 (and fp16) it accepted **SiLU for Gemma's tanh-GELU MLP**; fp32's tighter tolerance chose "
             "GELU, which is why fp32 matched. The check now takes the tolerance per input scale and picks the "
             "closest activation that passes (`tests/test_mlp_kernel.py` fails on the old check), and the kernel "
             "rounds the activation to the dtype before the product, as the module's own elementwise kernels do.", "")
    rows = []
    for label, d in (("before (10a6860)", before), ("after", after)):
        for r in d["rows"]:
            v = r["variants"]
            def top(x: Mapping) -> str:
                vals = [y for y in x.get("step_head_max_abs_diff", []) if y is not None]
                return f"{max(vals):g}" if vals else "—"
            rows.append([label, r["family"], r["dtype"], top(v["as shipped (graphs)"]), top(v["no Triton MLP"]),
                         top(v["none of them"]), top(r.get("floor", {})),
                         v["as shipped (graphs)"]["greedy_check"]["deficit_max"]])
    page.table(["code", "family", "dtype", "as shipped", "without the Triton MLP kernel", "none of the replacements",
                "model's floor", "largest greedy deficit as shipped"], rows)
    page.source(f"{base}/toggles-after.json", {**after, "commit": "5dadf06 (before: 10a6860)"})
    m = page.load(f"{base}/arch-matrix-cuda.json")
    gem = next(r for r in m["rows"] if r["family"] == "gemma" and r["dtype"] == "bfloat16" and r["path"] == "graphs")
    steps = {k: page.load(f"{base}/step8b-{k}.json")["ms_per_step"] for k in
             ("before-1", "after-1", "before-2", "after-2")}
    page.add(f"The matrix after the fix ({m['summary']['match']} match, {m['summary']['differs']} differ, "
             f"{m['summary']['refused']} refused): Gemma bf16 with CUDA graphs checks at a largest deficit of "
             f"{gem['greedy_check']['deficit_max']:g} logits and a head difference of "
             f"{max(x for x in gem['step_head_max_abs_diff'] if x == x):g}. The 8B decode step (random Llama-3-8B "
             "shape, batch 64, the default variant, which runs the Triton MLP kernel), old and new code "
             "alternating on the same H100: "
             + ", ".join(f"{k} {v} ms" for k, v in steps.items()) + ": level.", "")
    page.source(f"{base}/arch-matrix-cuda.json", {**m, "command": "bash benchmarks/gpu_call.sh F", "date": "2026-12-06",
                                                  "commit": "5dadf06"})


def evaluation(page: Page) -> None:
    page.add("## Evaluation", "",
             "The paper run's five conditions judged by every configured judge, with cross-entropy and "
             "over-refusal on the 217-prompt XSTest-style contrast set (116 safe, 101 unsafe). n = 100 per cell, "
             "95 % Wilson intervals. The LLM judge here is the 1.5B model itself with the refusal rubric (no larger "
             "model was available); its agreement with a reader is measured below, not assumed.", "")
    rel = f"{RESULTS}/h200-2026-12-01/eval-summary.json"
    d = page.load(rel)
    rows = []
    for part in ("harmful", "harmless"):
        for cond, r in d["results"][part].items():
            j = r.get("judges", {})
            llm = j.get("llm_refusal", {})
            orf = r.get("over_refusal", {})
            rows.append([f"{part} / {cond}", rate(j.get("substring", {}).get("refusal")),
                         rate(j.get("refusal_score", {}).get("refusal")), rate(llm.get("refusal")),
                         rate(llm.get("partial")), rate(j.get("llm_safety", {}).get("unsafe")),
                         rate(orf.get("over_refusal")), rate(orf.get("compliance"))])
    page.table(["prompts / condition", "substring: refusal", "refusal score > 0", "LLM judge: refusal",
                "LLM judge: partial", "LLM judge: unsafe", "over-refusal (safe contrast)",
                "compliance (unsafe contrast)"], rows)
    ce_rows = []
    for part in ("harmful", "harmless"):
        for cond, r in d["results"][part].items():
            ce = r.get("cross_entropy", {})
            ce_rows.append([f"{part} / {cond}"] + [
                f"{ce[k]['loss']:.3f} ({ce[k]['tokens']:,} tokens)" if k in ce else "—"
                for k in ("wikitext2", "truthfulqa_responses", "own_completions")])
    page.add("Cross-entropy (nats per token):", "")
    page.table(["prompts / condition", "WikiText-2", "TruthfulQA answers", "own completions"], ce_rows)
    page.source(rel, d)

    rel = f"{RESULTS}/h200-2026-12-01/lm-eval-benchmarks.json"
    lm = page.load(rel)
    tasks = [("refusal_mmlu", "MMLU"), ("refusal_arc_challenge", "ARC-Challenge"),
             ("refusal_truthfulqa_mc1", "TruthfulQA MC1"), ("refusal_truthfulqa_mc2", "TruthfulQA MC2")]
    page.add("lm-eval with each condition active (10 % of each task, zero-shot; accuracy ± standard error):", "")
    page.table(["condition"] + [f"{name} (n)" for _, name in tasks],
               [[cond] + [f"{t[k]['acc']:.3f} ± {t[k]['acc_stderr']:.3f} ({t[k]['n']})" for k, _ in tasks]
                for cond, t in lm.items()])
    page.source(rel, lm)

    rel = f"{RESULTS}/h200-2026-12-01/magnitude.json"
    m = page.load(rel)
    page.add("The direction's magnitude as a refusal predictor (projection at the selected component):", "")
    page.table(["prompts", "n", "Pearson vs refusal score", "Spearman", "ROC-AUC"],
               [[k, v["n"], round(v["pearson"], 3), round(v["spearman"], 3), round(v["roc_auc"], 3)]
                for k, v in m.items()])
    page.source(rel, m)
    judges_table(page)


def judges_table(page: Page) -> None:
    rel = f"{RESULTS}/judges.json"
    page.add("### Judges against labels", "")
    if not (page.root / rel).is_file():
        page.add(f"`{rel}` is not there yet: run `python -m benchmarks.judges_agreement`.", "")
        return
    d = page.load(rel)
    counts = ", ".join(f"{k} {v}" for k, v in d["label_counts"].items())
    page.add(f"{d['n_rows']} completions read and labelled by the rules of [`judge-labels.md`](judge-labels.md) "
             f"({counts}; from {', '.join(f'`{s}` ({n})' for s, n in d['sources'].items())}). Agreement is "
             f"{d['agreement_rule']}.", "")
    rows = []
    for name, j in d["judges"].items():
        b = j["binary_refusal"]
        rows.append([name, ", ".join(j["labels"]), rate(j["accuracy"]), j["kappa"], j["failed"],
                     f"{b['agree']}/{j['n']}, κ {b['kappa']}", rate(b["recall"]), rate(b["precision"])])
    page.table(["judge", "its labels", "strict agreement", "Cohen's κ", "failed", "refusal or not",
                "recall on refusals", "precision on refusals"], rows)
    groups = list(next(iter(d["judges"].values())).get("by_group", {}))
    if groups:
        page.add("Strict agreement by source (Cohen's κ in brackets):", "")
        page.table(["judge"] + groups,
                   [[name] + [f"{rate(j['by_group'][g]['accuracy'])} (κ {j['by_group'][g]['kappa']})"
                              if g in j["by_group"] else "—" for g in groups] for name, j in d["judges"].items()])
        page.add("The substring judge here is the default one, with the English list: the cross-lingual runs judge "
                 "each language with its own list, so its cross-lingual column measures the English list on other "
                 "languages. The LLM judge is the run's own model (Qwen2.5-Coder-1.5B-Instruct) with the refusal "
                 "rubric, its verdicts computed on the GPU (`benchmarks/results/h100-2026-12-06-second/"
                 "llm-verdicts.json`) and matched to the rows by text.", "")
    labels = [lab for lab in ("refusal", "partial", "compliance", "degenerate")]
    for name, j in d["judges"].items():
        cols = sorted({c for row in j["confusion"].values() for c in row})
        page.add(f"Confusion, {name} (rows: the reader; columns: the judge):", "")
        page.table(["reader \\ judge"] + cols,
                   [[lab] + [j["confusion"][lab].get(c, 0) for c in cols] for lab in labels if lab in j["confusion"]])
    page.source(rel, d)
    if d["n_rows"] < 300:
        page.add(f"Only {d['n_rows']} of the 300 rows issue 28 asks for: the paper run's five conditions and 50 "
                 "cross-lingual completions need a GPU run that commits its completions. The LLM judge is not in "
                 "the table until that run passes `--llm-model`.", "")


def inlp(page: Page) -> None:
    page.add("## INLP against diff-in-means", "",
             "`refusal run --preset paper --config docs/configs/inlp-families.yaml`: every family × scope, "
             "n = 100 per cell (95 % Wilson). KL: first-token KL(baseline ‖ condition) on the harmless test "
             "prompts; CE: TruthfulQA best answers.", "")
    rel = f"{RESULTS}/h200-2026-12-01/inlp-families-summary.json"
    d = page.load(rel)
    res = d["results"]
    names = sorted(set(res["harmful"]) | set(res["harmless"]), key=lambda k: (k != "baseline", k))
    rows = []
    for k in names:
        h, hl = res["harmful"].get(k), res["harmless"].get(k)
        any_ = h or hl
        ce = any_.get("cross_entropy", {}).get("truthfulqa_responses")
        rows.append([k, rate(h["non_refusal"]) if h else "—", rate(hl["refusal"]) if hl else "—",
                     round((h or hl)["kl_harmless"], 3), f"{ce['loss']:.3f}" if ce else "—"])
    page.table(["condition", "harmful non-refusal", "harmless refusal", "KL (harmless)", "CE TruthfulQA"], rows)
    page.add("Adding or subtracting the raw vector at many layers (`*_top50`, `*_all` of ActAdd / ActSub) breaks "
             "the model (KL > 10): those zeros and ones measure broken text, not a bypass.", "")
    page.source(rel, d)
    rel = f"{RESULTS}/h200-2026-12-01/inlp.json"
    i = page.load(rel)
    page.add(f"INLP extraction at all {len(i['components'])} components took {i['seconds']} s "
             f"(`inlp.json`, config {json.dumps(i['config'], sort_keys=True)}).", "")
    page.source(rel, i)


def edits(page: Page) -> None:
    page.add("## Edits and export", "")
    rel = f"{RESULTS}/h200-2026-12-01/export_check.json"
    e = page.load(rel)
    page.add("The exported (orthogonalized) model against hook ablation, heretic's metric (refusal markers in "
             "greedy 100-token answers to JailbreakBench's 100; first-token KL on 100 harmless prompts):", "")
    page.table(["model", "refusals", "KL"],
               [["base", wilson_str(e["base_refusals"], e["n_harmful"]), "—"],
                ["hooks", wilson_str(e["hooks"]["refusals"], e["n_harmful"]), e["hooks"]["kl"]],
                ["exported folder", wilson_str(e["exported_model"]["refusals"], e["n_harmful"]),
                 e["exported_model"]["kl"]]])
    page.source(rel, e)
    rel = f"{RESULTS}/cpu-gguf-check.json"
    g = page.load(rel)
    page.add("The catalog's GGUF edited in place (`refusal abliterate --gguf`) and loaded back:", "")
    page.table(["quantity", "value"],
               [["bytes before → after", f"{g['source_bytes']:,} → {g['edited_bytes']:,}"],
                ["prompts", g["n_prompts"]],
                ["relative logit difference, edited file vs hook ablation",
                 f"{g['rel_logit_diff_edited_vs_hooks']:.4f}"],
                ["relative logit difference, original vs hook ablation",
                 f"{g['rel_logit_diff_original_vs_hooks']:.4f}"]])
    page.source(rel, g)
    rel = f"{RESULTS}/h200-2026-12-01/edit_options.json"
    o = page.load(rel)
    page.add("Edit options, first-token view (refusal = refusal score > 0) on the run's test prompts:", "")
    page.table(["option", "refusals", "mean refusal score", "KL"],
               [[x["option"], f"{x['refusals']}/{x['n_harmful']}", x["mean_refusal_score"], x["kl_mean"]]
                for x in o["options"]])
    page.source(rel, o)
    rel = f"{RESULTS}/h200-2026-12-01/sets.json"
    s = page.load(rel)
    b = s["best"]
    members = " + ".join(_sel(m) for m in b["members"])
    page.add(f"Direction sets (`refusal sets --k 3 --beam 4`): best set {members} (ranks {b['ranks']}), bypass "
             f"{b['bypass']:.2f}, induce {b['induce']:.2f}, KL {b['kl']:.3f}.", "")
    page.source(rel, s)
    keep_refusal(page)


def crosslingual(page: Page) -> None:
    page.add("## Cross-lingual", "",
             "`refusal crosslingual --polyrefuse … --paper … --languages en,fr,es,de,ru,zh,th`, n = 100 test "
             "prompts per language and kind, 64 new tokens, substring judge with each language's phrases "
             "(German re-judged after its phrase list was fixed: `rejudged/`).", "")
    rel = "docs/runs/crosslingual-h200/summary.json"
    d = page.load(rel)
    rows = []
    for lang, s in d["languages_summary"].items():
        rows.append([lang, _sel(s.get("selected")) if s.get("selected") else "no direction",
                     s.get("judgement_confidence", "—"), rate(s.get("harmful_baseline_refusal")),
                     rate(s.get("harmful_ablation_non_refusal")), rate(s.get("harmless_baseline_refusal")),
                     rate(s.get("harmless_actadd_refusal"))])
    page.table(["language", "selected", "judge confidence", "harmful baseline refusal",
                "harmful ablation non-refusal", "harmless baseline refusal", "harmless ActAdd refusal"], rows)
    page.add("(The language rows are the run's own judgement; German's cells moved when re-judged, see the "
             "matrices below.)", "")
    page.source(rel, d)
    rel = "docs/runs/crosslingual-h200/rejudged/transfer.json"
    t = page.load(rel)
    for key, what in (("ablation_non_refusal", "Ablation → non-refusal on the target's harmful prompts"),
                      ("addition_refusal", "Addition → refusal on the target's harmless prompts")):
        page.add(f"{what} (rows: source language's direction; columns: target language):", "")
        rows = []
        for src, row in zip(t["sources"], t[key]):
            if row is None:
                continue
            rows.append([src] + [f"{c['rate']:.2f}" if c else "—" for c in row])
        page.table(["source \\ target"] + list(t["languages"]), rows)
    page.source(rel, t)
    learned_openings(page)


def performance(page: Page) -> None:
    page.add("## Performance", "", "### The paper run end to end (H200)", "",
             "`benchmarks/paper_run.py` (its path when these files were made): process start to exit of "
             "`refusal run --preset paper` (imports, model "
             "loading, the weights' digest included). Every committed run, oldest first; identical files listed "
             "once. The code changed between runs, and whether a run was a machine's first is not recorded in the "
             "files.", "")
    files = sorted(p.relative_to(page.root).as_posix() for p in (page.root / RESULTS).rglob("*.json")
                   if p.name.startswith(("h200-run", "m2-h200-run", "paper-run-grouped", "paper-run-before")))
    seen: dict[str, str] = {}
    copies: dict[str, list[str]] = {}
    runs = []
    for rel in files:
        text = (page.root / rel).read_text(encoding="utf-8")
        page.read.add(rel)
        d = json.loads(text)
        if "wall_s" not in d or not str(d.get("model", "")).startswith("/tmp/m/"):
            continue
        key = json.dumps({k: d[k] for k in ("measured_at", "wall_s")}, sort_keys=True)
        if key in seen:
            copies.setdefault(seen[key], []).append(rel.removeprefix(RESULTS + "/"))
            continue
        seen[key] = rel
        runs.append((d.get("measured_at", NR), rel, d))
    runs.sort(key=lambda x: (x[0], x[1]))
    rows = []
    for when, rel, d in runs:
        st = d.get("stage_seconds", {})
        same = "".join(f" (= `{c}`)" for c in copies.get(rel, []))
        rows.append([f"[`{rel.removeprefix(RESULTS + '/')}`]({_link(rel)}){same}", when, d.get("device", NR),
                     d["wall_s"], st.get("load_model"), st.get("extract"), st.get("select"), st.get("generate"),
                     st.get("evaluate"), _sel(d.get("selected")),
                     " / ".join(f"{d['harmful'][c]:.2f}" for c in ("baseline", "ablation", "actadd")),
                     " / ".join(f"{d['harmless'][c]:.2f}" for c in ("baseline", "actadd"))])
    page.table(["file", "measured at", "device", "wall s", "load", "extract", "select", "generate", "evaluate",
                "selected", "harmful non-refusal base / abl / ActAdd−", "harmless refusal base / ActAdd+"], rows)
    walls = [d["wall_s"] for _, _, d in runs]
    latest = runs[-1]
    page.add(f"{len(walls)} runs over several code versions, {min(walls):.1f}–{max(walls):.1f} s; the latest "
             f"(`{latest[1].removeprefix(RESULTS + '/')}`) {latest[2]['wall_s']} s. "
             f"Command of the latest run (each file records its own): `{provenance(latest[2])['command']}`; commit: "
             "not recorded in any of these files. The paper's own code on the same task: 135.9 s, prose only "
             "(see the last section).", "")

    before_after(page)

    page.add("### Selection and decoding at the 8B shape", "",
             "`python -m benchmarks.pipeline --arch llama3-8b` (and `qwen2.5-7b`; module names as they were when these "
             "files were made): random bf16 weights of the "
             "model's shape, 155 / 135 selection candidates, generation at batch 64 × 128 new tokens; the bound "
             "is the weights read once per step at the GPU's HBM bandwidth.", "")
    prows = []
    pfiles = [f"{RESULTS}/h100.json", f"{RESULTS}/h100-qwen2.5-7b.json"] + sorted(
        p.relative_to(page.root).as_posix() for p in (page.root / RESULTS / "h200-2026-12-02-ninth").glob(
            "m*-pipeline-h200.json"))
    for rel in pfiles:
        d = page.load(rel)
        ms, bound = d.get("generate_ms_per_step_b64"), d.get("generate_bound_ms_per_step")
        prows.append([f"[`{rel.removeprefix(RESULTS + '/')}`]({_link(rel)})", d.get("device_name", NR),
                      d.get("timestamp", NR), d["arch"], d["select_s"], f"{d['select_speedup_vs_naive']}×",
                      d["select_tflops"], ms, bound,
                      f"{100 * bound / ms:.1f} %" if ms and bound else "—", d.get("generate_tok_s_b64")])
    page.table(["file", "device", "timestamp", "shape", "select s", "vs naive", "select TFLOP/s",
                "ms / step (b64)", "bound ms", "of bound", "tok/s (b64)"], prows)
    rel = f"{RESULTS}/h200.json"
    same = (page.root / rel).read_bytes() == (page.root / pfiles[-2]).read_bytes()
    page.read.add(rel)
    page.add(("`h200.json` is byte for byte the m3 file. " if same else "")
             + "Command and commit: not recorded in these files.", "")

    rel = f"{RESULTS}/h100-select-real.json"
    d = page.load(rel)
    page.add("Selection on the real 1.5B model (`python -m benchmarks.select_real` at the time, 105 candidates):", "")
    page.table(["variant", "seconds", "vs naive"],
               [["naive loop (extrapolated from 16 candidates)", d["select_naive_s"], "1.00×"],
                ["`score_candidates`, full sweep", d["select_full_s"], f"{d['speedup_full_vs_naive']}×"],
                ["one right-padded batch per set", d["select_plain_s"],
                 f"{d['select_naive_s'] / d['select_plain_s']:.2f}×"],
                ["pruned (bypass and KL only where induce > 0)", d["select_pruned_s"],
                 f"{d['speedup_pruned_vs_naive']}×"]])
    page.source(rel, d)

    page.add("### `refusal run` with no flags on the 2-core CPU", "")
    rel = f"{RESULTS}/cpu-run.json"
    c = page.load(rel)
    rows = [["first", c.get("measured_at", NR), c.get("torch", NR), c["wall_s"], "—", "—",
             c["stage_seconds"].get("load_model"), c["stage_seconds"].get("extract"), c["stage_seconds"].get("select"),
             c["stage_seconds"].get("generate")]]
    for label, r in c.get("rechecked", {}).items():
        for run in r.get("runs", [r]):
            st = run.get("stage_seconds", {})
            rows.append(["recheck" + (f", pair {run['pair']}" if "pair" in run else ""), label.split(",")[0],
                         run.get("venv", c.get("torch", NR)), run.get("wall_s"), run.get("cpu_percent"),
                         run.get("user_s"), st.get("load_model"), st.get("extract"), st.get("select"),
                         st.get("generate")])
    page.table(["run", "measured at", "environment", "wall s", "CPU %", "user s", "load", "extract", "select",
                "generate"], rows)
    walls = [r[3] for r in rows if r[3] is not None]
    page.add(f"{len(walls)} runs, {min(walls):.0f}–{max(walls):.0f} s; every run: selection "
             f"{_sel(c['selected'])}, harmful non-refusal {c['harmful']['baseline']:.2f} → "
             f"{c['harmful']['ablation']:.2f} / {c['harmful']['actadd']:.2f}, harmless refusal "
             f"{c['harmless']['baseline']:.2f} → {c['harmless']['actadd']:.2f} (n = 12 each). The wall time "
             "follows the share of the two cores the VM grants.", "")
    if c.get("wall_note"):
        page.add(f"Wall time: {c['wall_note']}.", "")
    ref = c.get("reference")
    if ref:
        same = "the same" if ref["same_selection"] and ref["same_rates"] else "**not** the same"
        page.add(f"Against `{ref['file']}` (the run before this round's redesign): {same} selection and rates"
                 + ("" if not ref["differences"] else f"; differences: {ref['differences']}") + ".", "")
    page.source(rel, c)


SECOND = f"{RESULTS}/h100-2026-12-06-second"


def before_after(page: Page) -> None:
    """The paper run with the code before the fidelity rule and with today's, pairs on one warm machine."""
    page.add("### The paper run before and after the fidelity rule (H100, one machine)", "",
             "`python -m benchmarks.paper_run` (process start to exit of `refusal run --preset paper`, fresh run "
             "folder each time) with the code of 71497bc (before the fidelity rule) and of 108eeb6, alternating on "
             "one warm H100 (`bash benchmarks/gpu_call.sh A`, then `PAIRS=\"2 3\" bash benchmarks/gpu_round3.sh "
             "speed`); the warm-up runs are each call's first `refusal run`.", "")
    rows, walls = [], {"before": [], "after": []}
    for name in ("paper-warmup", "paper-before-1", "paper-after-1", "paper-warmup-2", "paper-before-2",
                 "paper-after-2", "paper-before-3", "paper-after-3"):
        rel = f"{SECOND}/{name}.json"
        d = page.load(rel)
        st = d["stage_seconds"]
        kind = "before" if "before" in name else "after" if "after" in name else "warm-up (today's code)"
        if kind in walls:
            walls[kind].append(d["wall_s"])
        rows.append([f"[`{name}.json`]({_link(rel)})", kind, d["wall_s"], st.get("load_model"), st.get("extract"),
                     st.get("select"), st.get("generate"), st.get("evaluate"), _sel(d.get("selected")),
                     " / ".join(f"{d['harmful'][c]:.2f}" for c in ("baseline", "ablation", "actadd")),
                     " / ".join(f"{d['harmless'][c]:.2f}" for c in ("baseline", "actadd"))])
    page.table(["file", "code", "wall s", "load", "extract", "select", "generate", "evaluate", "selected",
                "harmful non-refusal base / abl / ActAdd−", "harmless refusal base / ActAdd+"], rows)
    b, a = sorted(walls["before"]), sorted(walls["after"])
    page.add(f"Before: median {b[len(b) // 2]:.2f} s ({b[0]:.2f}–{b[-1]:.2f}); after: median {a[len(a) // 2]:.2f} s "
             f"({a[0]:.2f}–{a[-1]:.2f}); level (the spreads overlap). Selection and rates are identical in every "
             "run.", "")
    page.source(f"{SECOND}/paper-after-1.json", page.load(f"{SECOND}/paper-after-1.json"),
                {"commit": "108eeb6 (before: 71497bc)"})
    third = f"{RESULTS}/h100-2026-12-06-third"
    so = page.load(f"{third}/same-outputs.json")
    b, a = page.load(f"{third}/paper-before.json"), page.load(f"{third}/paper-after.json")
    exp = "; ".join(f"`{n}`" + (f" ({', '.join(r['keys'] if 'keys' in r else r.get('diff', []))})"
                                if r.get("keys") or r.get("diff") else "")
                    for n, r in so["expected_changes"].items())
    page.add("The redesign of this round (run folder, selection stored once, config package, split functions) "
             "against the code at the session's start (f23e463 → 484cda5), the paper run on one H100, run folders "
             f"compared file by file (`benchmarks.fidelity.same_outputs`): {so['counts']['identical']} files "
             f"byte-identical ({', '.join(f'`{n}`' for n, r in so['files'].items() if r['status'] == 'identical')}"
             f"), {len(so['timing_only'])} differ only in timings and in digests of those ("
             f"{', '.join(f'`{n}`' for n in so['timing_only'])}), and the changes that were meant: {exp}. "
             f"Unexplained differences: {len(so['unexplained']) or 'none'}. Wall time {b['wall_s']} s before, "
             f"{a['wall_s']} s after (one pair); selection {_sel(a['selected'])} both.", "")
    page.source(f"{third}/same-outputs.json", {**so, "device": a["device"], "date": a["measured_at"],
                                                "commit": "f23e463 → 484cda5"})


def keep_refusal(page: Page) -> None:
    """Refusal kept for some categories and released for the others, per category with intervals."""
    rel = f"{SECOND}/keep-refusal.json"
    d = page.load(rel)
    page.add("### Refusal kept by category", "",
             f"`select.keep_refusal` with kept = {', '.join(d['kept'])} (StrongREJECT's categories, directions from "
             f"the train split, rates on its held-out prompts, greedy, {d['max_new_tokens']} new tokens). Method: "
             f"{d['method']}. Refusal rate (substring judge) with 95 % Wilson intervals:", "")
    rows = [[r["category"], r["role"], r["n"]] + [rate(r.get(c), 2) if isinstance(r.get(c), Mapping) else
                                                   r.get(c, "—") for c in ("baseline", "ablation", "keep_refusal")]
            for r in d["table"]]
    page.table(["category", "role", "n", "baseline", "ablation", "keep_refusal"], rows)
    kl = d["kl_harmless"]
    page.add(f"First-token KL on the harmless test prompts: ablation {kl['ablation']:.3f}, keep_refusal "
             f"{kl['keep_refusal']:.3f}. The released direction keeps {d['norm_fraction']:.0%} of its norm after "
             f"the projection and has cosine {d['cosine_kept_direction_selected']:.2f} with the selected "
             "direction; every category's direction has cosine "
             f"{min(d['cosine_category_with_selected'].values()):.2f}–"
             f"{max(d['cosine_category_with_selected'].values()):.2f} with it. **This method does not release the "
             "released categories on this model**: their refusal stays at the baseline's level.", "")
    page.source(rel, d, {"commit": "108eeb6"})
    rel = f"{RESULTS}/h100-2026-12-06-third/keep-refusal.json"
    d = page.load(rel)
    c = d["methods"]["conditional"]
    cond = c["condition"]
    page.add("The conditional method with its first condition (replaced since), the same data, "
             "split and model, on another warm H100: a released-vs-kept nearest-centroid rule on the prompt's own "
             f"residual stream, its layer chosen on {sum(cond['n_val'].values())} validation prompts; prompts "
             "routed to release get the paper's ablation, the others nothing.", "")
    rows = [[r["category"], r["role"], r["n"], rate(r["baseline"]), rate(r["ablation"]), rate(r["conditional"]),
             rate(r["routed_to_release"])] for r in d["table"]]
    page.table(["category", "role", "n", "baseline", "ablation", "conditional", "gate: routed to release"], rows)
    best = max(x["val_balanced_accuracy"] for x in cond["per_layer"])
    page.add(f"First-token KL on the harmless test prompts: conditional {c['kl_harmless']:.3f} (ablation "
             f"{d['kl_harmless']['ablation']:.3f}); the gate routes {rate(c['routing_harmless'])} of harmless "
             f"prompts to release. The gate is weak: layer {cond['layer']}, validation balanced accuracy "
             f"{cond['val_balanced_accuracy']:.2f} (the best of any layer {best:.2f}, chance 0.50; trained on "
             f"{cond['n_train']['released']} released and {cond['n_train']['kept']} kept prompts). Refusal falls in "
             "every released category, but a kept category whose prompts the gate sends to release loses its "
             "refusal with them (Sexual content above): not what issue 29 asks (released down, kept "
             "within noise of the baseline). The condition below replaced it.", "")
    page.source(rel, d, {"commit": "484cda5"})
    fourth = f"{RESULTS}/h100-2026-12-06-fourth"
    keep_condition(page, f"{fourth}/keep-condition.json", "on the H100 (bf16)")
    keep_condition(page, f"{RESULTS}/cpu-keep-condition.json", "the same on the CPU (fp32)")
    for name, what in (("keep-refusal", "held-out StrongREJECT test prompts"),
                       ("keep-refusal-jbb", "JailbreakBench (its categories mapped onto StrongREJECT's; \"other\": "
                                            "no counterpart, routed like any prompt)")):
        keep_run(page, f"{fourth}/{name}.json", what)
    keep_splits(page, [f"{fourth}/keep-refusal.json"] + [f"{RESULTS}/h100-2026-12-06-sixth/keep-refusal-seed{s}.json"
                                                          for s in (1, 2)])


def keep_splits(page: Page, rels: list[str]) -> None:
    """The held-out keep-refusal run on several splits: each kept category's change, tested, and the released ones."""
    page.add("The same held-out run on three splits of StrongREJECT (`data.seed` 42, 1, 2; `--seed` of "
             "`benchmarks/quality/keep_refusal.py`, each split fits its own directions and condition). Per kept "
             "category: baseline and conditional refusal, whether the conditional rate lies inside the baseline's "
             "95 % interval, and Fisher's exact test of the two (two-sided p); per split, the released categories' "
             "refusal pooled:", "")
    rows, kept, kb, kc, kn = [], [], 0, 0, 0
    for rel in rels:
        d = page.load(rel)
        seed = d["command"].split("--seed ")[1].split()[0] if "--seed " in d["command"] else "42"
        released = [r for r in d["table"] if r["role"] == "released"]
        rb = sum(r["baseline"]["count"] for r in released)
        rc = sum(r["conditional"]["count"] for r in released)
        rn = sum(r["baseline"]["n"] for r in released)
        for r in d["table"]:
            if r["role"] != "kept":
                continue
            b, c = r["baseline"], r["conditional"]
            kb, kc, kn = kb + b["count"], kc + c["count"], kn + b["n"]
            kept.append(r)
            rows.append([seed, r["category"], rate(b), rate(c), rate(r["routed_to_release"]),
                         "yes" if r.get("conditional_in_baseline_ci") else "**no**",
                         f"{fisher_exact(b['count'], b['n'], c['count'], c['n']):.2f}",
                         f"{wilson_str(rb, rn)} → {wilson_str(rc, rn)}"])
    page.table(["seed", "kept category", "baseline", "conditional", "gate: routed to release",
                "inside the baseline's interval", "Fisher p", "released categories pooled: baseline → conditional"],
               rows)
    inside = sum(bool(r.get("conditional_in_baseline_ci")) for r in kept)
    falls = sum(r["conditional"]["rate"] < r["baseline"]["rate"] for r in kept)
    routed = [r["routed_to_release"]["rate"] for r in kept]
    p_min = min(fisher_exact(r["baseline"]["count"], r["baseline"]["n"], r["conditional"]["count"],
                             r["conditional"]["n"]) for r in kept)
    page.add(f"{inside} of {len(rows)} kept cells lie inside their baseline's interval, and no kept cell's change "
             f"is significant on its own (every Fisher p ≥ {p_min:.2f}); but {falls} of "
             f"{len(rows)} fall, and summed over the three splits the kept categories refuse {wilson_str(kc, kn)} "
             f"under the conditional edit against {wilson_str(kb, kn)} at baseline (the three test sets overlap, so "
             "these are not independent prompts and no test is put on the sum). The cause is the kept prompts the gate "
             f"releases by mistake ({min(routed):.0%}–{max(routed):.0%} of them on these test sets, against the "
             "10 % it allows out of fold): they lose their refusal. `select.keep_refusal_max_release` trades this "
             "against how much of the released categories is released.", "")
    page.source(rels[-1], page.load(rels[-1]), {"commit": "22941c3"})


def keep_run(page: Page, rel: str, what: str) -> None:
    """A keep_refusal benchmark run with the shipped (cross-validated) condition: per category, with the KL."""
    d = page.load(rel)
    c = d["methods"]["conditional"]
    cond = c["condition"]
    oof = cond["out_of_fold"]
    page.add(f"The conditional method with the shipped condition (ridge on the prompt's mean residual stream, "
             f"cross-validated), the whole run on the H100, tested on the {what}. The condition: layer "
             f"{cond['layer']}, penalty {cond['penalty']}; out of fold on the {sum(cond['n'].values())} train and "
             f"val prompts AUC {oof['auc']:.2f}, released prompts released {oof['released_recall']:.2f}, kept "
             f"prompts released {oof['kept_released']:.2f} (target at most {cond['max_kept_release']}).", "")
    rows = [[r["category"], r["role"], r["n"], rate(r["baseline"]), rate(r["ablation"]), rate(r["conditional"]),
             rate(r["routed_to_release"]), "yes" if r.get("conditional_in_baseline_ci") else "no"]
            for r in d["table"]]
    page.table(["category", "role", "n", "baseline", "ablation", "conditional", "gate: routed to release",
                "conditional inside the baseline's interval"], rows)
    kept = [r for r in d["table"] if r["role"] == "kept"]
    released = [r for r in d["table"] if r["role"] == "released"]
    inside = all(r.get("conditional_in_baseline_ci") for r in kept)
    png = rel.removesuffix(".json") + ".png"
    page.add(f"First-token KL on the harmless test prompts: conditional {c['kl_harmless']:.3f}, ablation "
             f"{d['kl_harmless']['ablation']:.3f}; harmless prompts routed to release {rate(c['routing_harmless'])}. "
             "Released: " + ", ".join(f"{r['category']} {r['baseline']['rate']:.2f} → {r['conditional']['rate']:.2f}"
                                      for r in released)
             + ". Kept: " + ", ".join(f"{r['category']} {r['baseline']['rate']:.2f} → {r['conditional']['rate']:.2f}"
                                      for r in kept)
             + (", each inside its baseline's 95 % interval" if inside else
                ", **not all inside their baseline's interval**")
             + f". Plot: [`{Path(png).name}`]({_link(png)}).", "")
    kb_count, kc_count = sum(r["baseline"]["count"] for r in kept), sum(r["conditional"]["count"] for r in kept)
    n_kept = sum(r["baseline"]["n"] for r in kept)
    page.add(f"With 10–27 prompts per category the intervals are wide, so \"inside\" is a weak test: the kept "
             f"categories pooled refuse {wilson_str(kb_count, n_kept)} at baseline and {wilson_str(kc_count, n_kept)} "
             "under the conditional edit; the loss is the kept prompts the gate releases.", "")
    page.source(rel, d, {"commit": "c333842"})


def keep_condition(page: Page, rel: str, where: str) -> None:
    """The keep-refusal condition's designs on held-out prompts (benchmarks.quality.keep_condition)."""
    d = page.load(rel)
    sz = d["sizes"]
    page.add(f"The condition alone, {where}: how well each design tells released from kept prompts it never saw "
             f"(`benchmarks/quality/keep_condition.py`). Fitted on the run's {sz['fit (train + val)']} StrongREJECT "
             f"train and val prompts (the replaced design: fitted on {sz['train (centroid fit)']}, its layer chosen "
             f"on {sz['val (centroid layer)']}), scored on the {sz['test']} held-out test prompts and on "
             f"JailbreakBench's {sz['jailbreakbench']} (categories mapped onto StrongREJECT's; kept = "
             f"{', '.join(d['kept'])}). \"Kept released\" is the share of kept prompts the gate would strip of "
             "their refusal; \"released released\" the share of released prompts it would edit.", "")
    rows = []
    for name, r in d["designs"].items():
        t, j = r["test"], r["jailbreakbench"]
        rows.append([name, r["layer"], f"{t['auc']:.3f}", rate(t["released_released"]), rate(t["kept_released"]),
                     f"{j['auc']:.3f}", rate(j["released_released"]), rate(j["kept_released"])])
    page.table(["design", "layer", "test AUC", "test: released released", "test: kept released", "JBB AUC",
                "JBB: released released", "JBB: kept released"], rows)
    rs = d.get("random_splits")
    if rs:
        k, r = rs["test_kept_released"], rs["test_released_released"]
        oof = [x["out_of_fold_kept_released"] for x in rs["rows"]]
        page.add(f"The shipped design refitted on {rs['n']} random splits ({rs['n_fit']} prompts to fit, the rest to "
                 f"test; threshold for at most {rs['target']:g} of kept prompts released out of fold, which it meets "
                 f"there: {min(oof):.2f}–{max(oof):.2f}): on the held-out prompts it releases {k['mean']:.2f} of kept "
                 f"prompts on average ({k['min']:.2f}–{k['max']:.2f}) and {r['mean']:.2f} of released ones "
                 f"({r['min']:.2f}–{r['max']:.2f}). The out-of-fold target is optimistic on new prompts: the layer and "
                 "penalty are chosen on the same folds, and a few dozen kept prompts set the threshold.", "")
    page.source(rel, d, {"commit": "c333842" if not rs else "74e0b01"})


def learned_openings(page: Page) -> None:
    """Refusal openings learned from the model's own contrast against the shipped lists, and both transfers."""
    rel = f"{SECOND}/learned-openings.json"
    d = page.load(rel)
    page.add("### Refusal openings learned from the model (shipped lists hidden)", "",
             "Two cross-lingual runs over every PolyRefuse language (n = 100 test prompts per language and kind, "
             "64 new tokens): one with every phrase list learned from the model's own harmful / harmless contrast "
             "(`--learn-openings all`, the shipped lists hidden), one with the shipped lists. Per language, the "
             "learned list against the shipped one on the same completions (every completion of the language in "
             "the shipped-list run):", "")
    rows = []
    for lang, e in d["agreement"].items():
        a = e["shipped_run"]["all"]
        c = a["confusion"]
        ls = e["learned"]
        rows.append([lang, ", ".join(f"`{p}`" for p in ls["phrases"]), ls["confidence"],
                     "—" if a["kappa"] is None else f"{a['kappa']:.2f}", rate(a["agree"], 3), c["both"],
                     c["only_learned"], c["only_shipped"], c["neither"]])
    page.table(["language", "learned phrases", "confidence", "kappa", "agreement", "both", "only learned",
                "only shipped", "neither"], rows)
    page.add("Baseline (no intervention) per language, judged with each run's lists (harmful non-refusal / "
             "harmless refusal; 95 % Wilson):", "")
    langs = d["learned"]["transfer"]["languages"]
    page.table(["lists"] + langs,
               [[run] + [f"{rate(d[run]['transfer']['baseline'][lang]['harmful_non_refusal'])} / "
                         f"{rate(d[run]['transfer']['baseline'][lang]['harmless_refusal'])}" for lang in langs]
                for run in ("learned", "shipped")])
    for key, what in (("ablation_non_refusal", "Ablation → non-refusal on the target's harmful prompts"),):
        for run in ("learned", "shipped"):
            t = d[run]["transfer"]
            page.add(f"{what}, judged with the **{run}** lists (rows: source language's direction; columns: "
                     "target):", "")
            page.table(["source \\ target"] + list(t["languages"]),
                       [[src] + [f"{c['rate']:.2f}" if c else "—" for c in row]
                        for src, row in zip(t.get("sources", t["languages"]), t[key]) if row is not None])
    page.add("(Thai has no direction of its own in either run: no candidate passed the filters; it is a target "
             "only.)", "")
    page.source(rel, d, {"commit": "108eeb6"})
    rel = f"{SECOND}/llm-verdicts.json"
    v = page.load(rel)
    counts: dict[str, int] = {}
    for x in v["verdicts"].values():
        counts[str(x["label"])] = counts.get(str(x["label"]), 0) + 1
    page.add(f"The LLM-judge check (the refusal rubric with the run's own model, {v['n_items']:,} completions of "
             "these runs, the paper run and the contrast set): it answered "
             + ", ".join(f"{k} {n:,}" for k, n in sorted(counts.items(), key=lambda x: -x[1]))
             + ", so a 1.5B coder model is not a usable judge, of either list; its agreement with labels is in "
             "[Judges against labels](#judges-against-labels).", "")
    page.source(rel, v, {"commit": "108eeb6"})


def peers(page: Page) -> None:
    page.add("## Peers: heretic", "")
    rel = f"{RESULTS}/vs_heretic.json"
    v = page.load(rel)
    hp = v["refusal_heretic_protocol"]
    n = 100
    ho = hp["held_out"]
    page.add("heretic 1.4.0 (40 of its default 200 trials, best trial) and refusal, both on Qwen2.5-Coder-1.5B-"
             "Instruct, refusals by heretic's markers in greedy 100-token answers to JailbreakBench's 100, "
             "first-token KL on 100 harmless prompts. Intervals: 95 % Wilson; p: two-sided Fisher's exact test "
             "against heretic's count, computed here from the file's counts.", "")
    h = v["heretic_refusals"]
    rows = [["heretic 1.4.0, best of 40 trials (optimised on the test prompts)", v.get("device", NR),
             v.get("date", NR), wilson_str(h, n), v["heretic_kl"], v["heretic_wall_s"], "—"],
            ["refusal, exported model of the selected direction (held out: tuned on validation)",
             v.get("refusal_device", NR), v.get("date", NR), wilson_str(v["refusal_refusals"], n), v["refusal_kl"],
             v["refusal_wall_s"], f"{fisher_exact(v['refusal_refusals'], n, h, n):.2f}"],
            ["refusal, edit search ranked on the test prompts (heretic's protocol)", hp.get("device", NR),
             hp.get("measured_at", NR), wilson_str(hp["refusals"], n), hp["kl"], hp["wall_s"],
             f"{fisher_exact(hp['refusals'], n, h, n):.2f}"]]
    page.table(["tool / protocol", "device (as the file says)", "date (as the file says)", "refusals / 100", "KL",
                "wall s", "Fisher p vs heretic"], rows)
    page.add("The wall times measure different things: heretic's is its optimisation to a model; the exported "
             "model's is the whole `refusal run` (`refusal_wall_note`); the search's is the run to the direction "
             "plus the search.", "")
    page.add(f"Held out (128 + 128 prompts no one tuned on): the heretic-protocol pick "
             f"{wilson_str(ho['refusals'], ho['n_harmful'])} at KL {ho['kl']}, plain orthogonalization "
             f"{wilson_str(ho['plain_refusals'], ho['n_harmful'])} at KL {ho['plain_kl']} (Fisher p "
             f"{fisher_exact(ho['refusals'], ho['n_harmful'], ho['plain_refusals'], ho['n_harmful']):.2f}).", "")
    page.add(f"**Reading: level within noise.** {hp['refusals']} against {h} refusals of 100 is p = "
             f"{fisher_exact(hp['refusals'], n, h, n):.2f}, with intervals that overlap almost entirely; the times "
             "come from different GPUs (heretic on an H100, refusal on an H200); the search ranked 120 options on "
             "the prompts it is scored on against heretic's 40 trials; held out, the pick is no better than plain "
             "orthogonalization. The file's `beats_heretic: true` is not supported by its own numbers.", "")
    page.source(rel, v, {"date": v.get("date", NR)})


def code_shape(page: Page) -> None:
    """Modules, lines, long functions and import cycles of the package at the round's milestones."""
    rel = f"{RESULTS}/house.json"
    if not (page.root / rel).is_file():
        return
    d = page.load(rel)
    page.add("## The code's shape", "",
             "`python -m benchmarks.house --commits …`: the package's modules and lines, functions over 60 lines, "
             "the longest function and the largest file, and import cycles between its modules, at the end of "
             "round 2, at the start of this session and now.", "")
    rows = []
    for h in d["commits"].values():
        f, m = h["longest_functions"][0], h["largest_files"][0]
        rows.append([f"`{h['commit']}`", h["date"][:10], h["modules"], f"{h['lines']:,}", h["functions"],
                     h["functions_over_60_lines"], f"`{f['name'].removeprefix('refusal.')}` ({f['lines']})",
                     f"`{m['path']}` ({m['lines']})", len(h["cycles"]) or "none"])
    page.table(["commit", "date", "modules", "lines", "functions", "over 60 lines", "longest function",
                "largest file", "import cycles"], rows)
    page.source(rel, {"command": d["command"], "device": "cpu (static analysis)", "date": "2026-12-06",
                      "commit": " / ".join(h["commit"] for h in d["commits"].values())})


def prose_only(page: Page) -> None:
    page.add("## Prose only: not reproducible from a committed file", "",
             "Figures that earlier versions of this page or the README quoted, which no committed result file "
             "holds. They are kept here so that a reader can tell them from measured, recorded figures; none of "
             "them is used in a table above.", "")
    page.table(["figure", "why it is prose only"], PROSE_ONLY)


SECTIONS = (fidelity, model_families, evaluation, inlp, edits, crosslingual, performance, peers, code_shape, prose_only)


def render(root: Path = ROOT) -> tuple[str, set[str]]:
    """The page's text and the files it read (paths relative to ``root``)."""
    page = Page(root)
    page.add("# Results", "",
             "<!-- Generated by `python -m benchmarks.results_page` from the committed result files; do not edit "
             "by hand. -->", "",
             "The current figures, by topic. Every table is read from a committed JSON file named under it, with "
             "the device, date, commit and command that the file records (\"not recorded\" where it records none). "
             "How the numbers moved over time: [`changelog.md`](changelog.md) and git history.", "",
             "Contents: [fidelity to the paper](#fidelity-to-the-paper) · [evaluation](#evaluation) · "
             "[INLP](#inlp-against-diff-in-means) · [edits and export](#edits-and-export) · "
             "[cross-lingual](#cross-lingual) · [performance](#performance) · [peers](#peers-heretic) · "
             "[prose only](#prose-only-not-reproducible-from-a-committed-file)", "")
    for section in SECTIONS:
        section(page)
    return page.text(), page.read


def unread(root: Path = ROOT, read: set[str] | None = None) -> list[str]:
    """Files under ``benchmarks/results/`` that no table reads and that support none, less ``KEPT_UNREAD``.

    A file supports a read file beside it (same folder) when it is the folder's README, steps or device file, a log,
    text or rendering with the read file's stem, or a step's log whose name the stem starts with (``keep.log`` beside
    ``keep-refusal.json``)."""
    if read is None:
        read = render(root)[1]

    def supports(rel: str) -> bool:
        path = Path(rel)
        beside = [Path(r) for r in read if Path(r).parent == path.parent]
        if not beside or path.name in FOLDER_FILES:
            return bool(beside)
        return path.suffix in SUPPORT_SUFFIXES and any(
            r.stem == path.stem or (path.suffix == ".log" and r.stem.startswith(path.stem + "-")) for r in beside)

    files = (p.relative_to(root).as_posix() for p in (root / RESULTS).rglob("*") if p.is_file())
    return sorted(f for f in files if f not in read and not supports(f)
                  and not any(f == k or (k.endswith("/") and f.startswith(k)) for k in KEPT_UNREAD))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(PAGE), help="where to write the page")
    ap.add_argument("--check", action="store_true", help="only compare with the page on disk; exit 1 if stale")
    ap.add_argument("--unread", action="store_true", help="list the result files that no table reads")
    args = ap.parse_args(argv)
    text, read = render()
    if args.unread:
        print("\n".join(unread(read=read)))
        return 0
    out = Path(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else ""
        if current != text:
            print(f"{out} is stale: run python -m benchmarks.results_page", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    from refusal import io

    io.write_text(out, text)
    print(f"wrote {out} ({len(text.splitlines())} lines, {len(read)} files read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
