"""How well refusal openings learned from a model's own contrast (refusal.evaluation.learned) stand in for the shipped
phrase lists: for each language that ships a list, a list is learned with the shipped one hidden, and the two lists'
verdicts are compared on the same completions (Cohen's kappa, confusion counts, Wilson intervals).

From saved completions (no model):

    python -m benchmarks.quality.learned_openings --completions DIR --out result.json

``DIR`` is a finished cross-lingual run (``<lang>/completions.json``; the learning rows are
``<lang>/openings_completions.json`` where the run learned, else the harmful and harmless baselines, and the
verdicts are compared on every completion of the language: its own run's and the transfer's), or a folder of
``<lang>.json`` files ``{"harmful": [{"instruction", "completion", "refusal_score"?}], "harmless": [...]}``
(learned on the even rows, compared on the odd ones). Saved refusal scores check the phrases unless
``--no-scores``; first-token distributions are not saved, so no tokens are learned here.

A finished run packed small enough to commit, and the agreement recomputed from the pack (as a test does):

    python -m benchmarks.quality.learned_openings --pack /tmp/runs/learned-openings-learned --out PACK.json.gz
    python -m benchmarks.quality.learned_openings --completions PACK.json.gz --out result.json

With the model (two cross-lingual runs over every language of a PolyRefuse-style folder, one with every list learned
and the shipped lists hidden, one with the shipped lists; then the agreement table and both transfer matrices):

    python -m benchmarks.quality.learned_openings --crosslingual --model /tmp/m/hf --polyrefuse .data/polyrefuse \\
        --paper .data/refusal_direction --runs /tmp/runs --out $OUT/learned_openings.json [--only learned|shipped]

Both runs resume: ``--only shipped`` then ``--only learned`` fit two calls of 10 minutes; a last call without
``--only`` finds both finished, loads no model, and writes the comparison. A language without a harmless test file
(PolyRefuse's Chinese) draws its harmless prompts from its train and val files. ``DRY=1`` (or ``--dry``) checks the
plumbing on the CPU in minutes: a tiny random Qwen2 built in memory, 4/2/2 prompts per split, 4 new tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SHIPPED = ("en", "fr", "es", "de", "ru", "zh", "th")


# ---- comparing two lists on the same completions ---------------------------------------------------------------

def compare(learned, shipped_phrases: list[str], groups: dict[str, list[str]]) -> dict:
    """Agreement of the learned list's verdicts with the shipped list's on each group of completions, and on all."""
    from refusal.evaluation.learned import hidden_list_agreement

    out = {name: hidden_list_agreement(learned, shipped_phrases, texts) for name, texts in groups.items() if texts}
    everything = [t for texts in groups.values() for t in texts]
    out["all"] = hidden_list_agreement(learned, shipped_phrases, everything)
    return out


def _listing(learned) -> dict:
    return {"phrases": learned.phrases, "refusal_openings": learned.refusal_openings, "mode": learned.mode,
            "source": learned.source, "confidence": learned.confidence, "agreement_with_refusal_score":
            learned.agreement, "n_harmful": learned.n_harmful, "n_harmless": learned.n_harmless,
            "notes": learned.notes}


def _run_texts(folder: Path, lang: str) -> dict[str, list[str]]:
    """Every completion of ``lang`` in a finished cross-lingual run: its own run's (by kind and condition) and the
    transfer's with ``lang`` as the target."""
    from refusal import io

    groups: dict[str, list[str]] = {}
    own = folder / lang / "completions.json"
    if own.is_file():
        for kind, conds in io.read_json(own).items():
            for cond, recs in conds.items():
                groups[f"{kind}/{cond}"] = [r["completion"] for r in recs]
    tc = folder / "transfer_completions.json"
    if tc.is_file():
        groups["transfer"] = [r["completion"] for pair, kinds in io.read_json(tc).items()
                              if pair.split(">")[1] == lang and pair.split(">")[0] not in ("", lang)
                              for rows in kinds.values() for r in rows]
    return groups


def evaluate_folder(folder: Path, languages: list[str] | None = None, use_scores: bool = True) -> dict:
    """The agreement table from saved completions (see the module): a run folder, a folder of ``<lang>.json``
    files, or a pack written by :func:`pack_run` (``.json.gz``)."""
    if folder.is_file():
        return evaluate_pack(folder, languages, use_scores)
    from refusal import io

    out = {}
    for lang in languages or SHIPPED:
        run_dir = folder / lang
        if (run_dir / "completions.json").is_file():
            c = io.read_json(run_dir / "completions.json")
            oc = run_dir / "openings_completions.json"
            src = io.read_json(oc) if oc.is_file() else {k: c[k]["baseline"] for k in ("harmful", "harmless")}
            groups = _run_texts(folder, lang)
        elif (folder / f"{lang}.json").is_file():
            rows = io.read_json(folder / f"{lang}.json")
            src = {k: rows[k][0::2] for k in ("harmful", "harmless")}
            groups = {f"{k}/held-out": [r["completion"] for r in rows[k][1::2]] for k in ("harmful", "harmless")}
        else:
            continue
        out[lang] = _evaluate(lang, src, groups, use_scores)
    return out


def _evaluate(lang: str, src: dict, groups: dict[str, list[str]], use_scores: bool) -> dict:
    """Learn ``lang``'s list from the learning rows ``src`` (the shipped list hidden) and compare its verdicts with
    the shipped list's on ``groups``."""
    from refusal.evaluation.learned import learn_openings
    from refusal.translate import refusal_phrases

    h, b = src["harmful"], src["harmless"]
    scores = use_scores and all(r.get("refusal_score") is not None for r in h + b)
    learned = learn_openings([r["instruction"] for r in h], [r["completion"] for r in h],
                             [r["instruction"] for r in b], [r["completion"] for r in b], language=lang,
                             harmful_scores=[r["refusal_score"] for r in h] if scores else None,
                             harmless_scores=[r["refusal_score"] for r in b] if scores else None)
    return {"learned": _listing(learned), "scores_used": bool(scores),
            "agreement": compare(learned, refusal_phrases(lang)["phrases"], groups)}


def pack_run(folder: Path, out: Path, languages: list[str] | None = None) -> dict:
    """A finished cross-lingual run's learning rows and own completions per language (the transfer's left out), as
    one gzipped JSON file small enough to commit: what :func:`evaluate_pack` (and a test) relearns from."""
    import gzip

    from refusal import io

    langs: dict[str, dict] = {}
    for lang in languages or SHIPPED:
        run_dir = folder / lang
        own, oc = run_dir / "completions.json", run_dir / "openings_completions.json"
        if own.is_file():  # its own run's completions
            c = io.read_json(own)
            learning = io.read_json(oc) if oc.is_file() else {k: c[k]["baseline"] for k in ("harmful", "harmless")}
            groups = {f"{kind}/{cond}": [r["completion"] for r in recs]
                      for kind, conds in c.items() for cond, recs in conds.items()}
        elif oc.is_file():  # no direction of its own: a target only, judged on the transfer's completions
            learning, groups = io.read_json(oc), _run_texts(folder, lang)
        else:
            continue
        langs[lang] = {"learning": {k: [{f: r[f] for f in ("instruction", "completion", "refusal_score") if f in r}
                                        for r in v] for k, v in learning.items()},
                       "groups": groups}
    data = {"source": str(folder), "languages": langs}
    out.write_bytes(gzip.compress(json.dumps(data, ensure_ascii=False, sort_keys=True).encode(), mtime=0))
    return data


def evaluate_pack(path: Path, languages: list[str] | None = None, use_scores: bool = True) -> dict:
    import gzip

    data = json.loads(gzip.decompress(path.read_bytes()))
    return {lang: _evaluate(lang, e["learning"], e["groups"], use_scores)
            for lang, e in data["languages"].items() if not languages or lang in languages}


# ---- the cross-lingual runs ------------------------------------------------------------------------------------

def tiny_model(folder: Path) -> Path:
    """A tiny random Qwen2 with a byte-level BPE tokenizer and a ChatML template, saved as a HF folder (DRY)."""
    from benchmarks.tiny import save_tiny_qwen2
    from refusal.data import builtin

    if (folder / "config.json").is_file():
        return folder
    return save_tiny_qwen2(folder, [r["instruction"] for k in ("harmful", "harmless") for r in builtin(k)])


def _missing_harmless_tests(poly: Path, runs: Path, languages: list[str]) -> dict[str, str]:
    """Languages whose folder has no harmless test file (PolyRefuse's zh): their harmless prompts drawn from their
    train and val files instead, as one file (``--files lang:harmless=...``)."""
    files = {}
    for lang in languages:
        if lang == "en" or (poly / f"harmless_test_{lang}.json").is_file():
            continue
        rows = [r for s in ("train", "val") for r in json.loads((poly / f"harmless_{s}_{lang}.json").read_text())]
        path = runs / f"harmless_{lang}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
        files[f"{lang}:harmless"] = str(path)
    return files


def run_crosslingual(a) -> dict:
    from refusal import io
    from refusal.config import resolve
    from refusal.crosslingual.runs import Crosslingual

    runs = Path(a.runs)
    poly = Path(a.polyrefuse)
    langs = sorted({p.stem.rsplit("_", 1)[1] for p in poly.glob("harmful_test_*.json")
                    if "back_translated" not in p.stem})
    if a.paper:
        langs = sorted(set(langs) | {"en"})
    model = a.model
    overrides = {"model": model, "preset": "paper", "data": {"n_test": 100}, "generate": {"max_new_tokens": 64}}
    if a.dry:
        model = str(tiny_model(runs / "tiny-qwen2"))
        overrides = {"model": model, "preset": "paper", "device": "cpu",
                     "data": {"n_train": 4, "n_val": 2, "n_test": 2, "filter": False},
                     "select": {"kl_threshold": 1e9, "induce_threshold": -1e9}, "generate": {"max_new_tokens": 4}}
    cfg = resolve(None, overrides)
    files = _missing_harmless_tests(poly, runs, langs)
    out = {}
    for name, mode in (("shipped", "never"), ("learned", "all")):
        if a.only and a.only != name:
            continue
        t0 = time.perf_counter()
        res = Crosslingual(cfg, langs, polyrefuse=poly, paper=a.paper, files=files or None,
                           out_dir=runs / f"learned-openings-{name}", learn_openings=mode).run()
        out[name] = {"dir": str(res.out_dir), "seconds": round(time.perf_counter() - t0, 1),
                     "transfer": {k: io.read_json(res.out_dir / "transfer.json")[k]
                                  for k in ("languages", "ablation_non_refusal", "addition_refusal", "baseline")},
                     "languages_summary": io.read_json(res.out_dir / "summary.json")["languages_summary"],
                     "warnings": res.warnings}
    if "learned" in out:
        out["agreement"] = crosslingual_agreement(Path(out["learned"]["dir"]),
                                                  Path(out["shipped"]["dir"]) if "shipped" in out else None,
                                                  [x for x in langs if x in SHIPPED])
    return out


def crosslingual_agreement(learned_dir: Path, shipped_dir: Path | None, languages: list[str]) -> dict:
    """Per language: the learned list (read from the learned run) against the shipped list, on the learned run's
    learning rows (in sample), its test and transfer completions, and the shipped run's completions."""
    from refusal.evaluation.learned import LearnedOpenings
    from refusal.translate import refusal_phrases

    out = {}
    for lang in languages:
        path = learned_dir / lang / "openings.json"
        if not path.is_file():
            continue
        learned = LearnedOpenings.load(path)
        shipped = refusal_phrases(lang)["phrases"]
        from refusal import io

        oc = io.read_json(learned_dir / lang / "openings_completions.json")
        learning = {f"learning/{k}": [r["completion"] for r in oc[k]] for k in ("harmful", "harmless")}
        entry = {"learned": _listing(learned),
                 "learning_rows": compare(learned, shipped, learning),
                 "learned_run": compare(learned, shipped, _run_texts(learned_dir, lang))}
        if shipped_dir is not None:
            entry["shipped_run"] = compare(learned, shipped, _run_texts(shipped_dir, lang))
        out[lang] = entry
    return out


def table(agreement: dict, where: str) -> str:
    """A Markdown table: per language, the learned list against the shipped one on ``where``'s completions."""
    lines = ["| language | source | phrases | kappa | agree [95 % CI] | both | only learned | only shipped | neither |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lang, e in agreement.items():
        a = e.get(where, {}).get("all")
        if not a:
            continue
        c = a["confusion"]
        k = "-" if a["kappa"] is None else f"{a['kappa']:.2f}"
        g = a["agree"]
        lines.append(f"| {lang} | {e['learned']['source']} | {len(e['learned']['phrases'])} | {k} | "
                     f"{g['rate']:.3f} [{g['low']:.3f}, {g['high']:.3f}] | {c['both']} | {c['only_learned']} | "
                     f"{c['only_shipped']} | {c['neither']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--completions", help="a finished cross-lingual run, or a folder of <lang>.json completions")
    ap.add_argument("--languages", help="comma-separated (default: en,fr,es,de,ru,zh,th)")
    ap.add_argument("--no-scores", action="store_true", help="do not check phrases against saved refusal scores")
    ap.add_argument("--crosslingual", action="store_true", help="run the two cross-lingual runs (needs the model)")
    ap.add_argument("--model", help="HF folder of the model (--crosslingual)")
    ap.add_argument("--polyrefuse", default=".data/polyrefuse")
    ap.add_argument("--paper", default=".data/refusal_direction")
    ap.add_argument("--runs", default="/tmp/runs")
    ap.add_argument("--only", choices=("learned", "shipped"))
    ap.add_argument("--pack", help="write a finished run's learning rows and completions to OUT (.json.gz) and stop")
    ap.add_argument("--dry", action="store_true", default=bool(os.environ.get("DRY")))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.pack:
        data = pack_run(Path(a.pack), Path(a.out), a.languages.split(",") if a.languages else None)
        print(f"packed {', '.join(data['languages'])} from {a.pack} into {a.out}")
        return
    import torch

    started = time.perf_counter()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"command": " ".join(["python -m benchmarks.learned_openings"] + [shlex.quote(x) for x in sys.argv[1:]]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
              "dry": bool(a.dry), "torch": torch.__version__}
    if a.crosslingual:
        if not a.model and not a.dry:
            ap.error("--crosslingual needs --model (or DRY=1)")
        result.update(run_crosslingual(a))
        where = "shipped_run" if "shipped" in result else "learned_run"
    elif a.completions:
        langs = a.languages.split(",") if a.languages else None
        result["agreement"] = evaluate_folder(Path(a.completions), langs, not a.no_scores)
        where = None
    else:
        ap.error("give --completions DIR or --crosslingual")
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False), "utf-8")
    if "agreement" in result:
        for w in dict.fromkeys([where, "learned_run", "learning_rows"] if where else []):
            print(f"\nLearned vs shipped lists on the {w.replace('_', ' ')}'s completions\n"
                  + table(result["agreement"], w))
        if not where:
            print(json.dumps({lang: e["agreement"]["all"] for lang, e in result["agreement"].items()}, indent=1))
    print(f"\n{out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
