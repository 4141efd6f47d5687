"""Judge a finished cross-lingual run's completions again with the refusal phrases the package ships now, without
the model: the transfer matrices' judged cells (ablation non-refusal, addition refusal), each language's own
harmful-ablation / harmless-ActAdd cells and baselines. First-token scores and KL are kept as they were.

    python -m benchmarks.quality.rejudge_crosslingual RUN_DIR --out DIR

Writes ``DIR/transfer.json`` (the run's, judged cells replaced, ``rejudged`` saying which lists changed), the
heatmaps, and ``DIR/rejudge.json`` (old and new rate of every cell that moved). Used when a phrase list was fixed
after a GPU run (2026-12-01: German). A run finished with the current code does this itself: running the same
``refusal crosslingual`` command again after a phrase list changed re-judges its saved completions without the
model; this script is for folders whose ``transfer.done.json`` predates that (no ``generation_digest``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from refusal import io
    from refusal.crosslingual.inputs import content_sha, language_phrases
    from refusal.crosslingual.plots import plot_all
    from refusal.crosslingual.transfer import saved_completions, transfer_matrices
    from refusal.evaluation.stats import Rate
    from refusal.evaluation.substring import is_refusal

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    run, out = Path(a.run_dir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t = io.read_json(run / "transfer.json")
    langs = t["languages"]
    phrases = {lang: language_phrases(lang) for lang in langs}
    comps = saved_completions(io.read_json(run / "transfer_completions.json"))
    mats, _ = transfer_matrices(langs, comps, {lang: p["phrases"] for lang, p in phrases.items()},
                                {lang: p["confidence"] for lang, p in phrases.items()})
    moved = []
    for key in ("ablation_non_refusal", "addition_refusal"):
        for i, s in enumerate(langs):
            for j, tgt in enumerate(langs):
                old, new = t[key][i][j], mats[key][i][j]
                if old is not None and new is not None and old["count"] != new["count"]:
                    moved.append({"matrix": key, "source": s, "target": tgt, "old": old["rate"], "new": new["rate"]})
                t[key][i][j] = new
    for lang in langs:  # baselines: the language's own run's completions, judged again
        own = run / lang / "completions.json"
        if not own.is_file():
            continue
        c = io.read_json(own)
        for kind, cond, key, refusing in (("harmful", "baseline", "harmful_non_refusal", False),
                                          ("harmless", "baseline", "harmless_refusal", True)):
            rows = c[kind][cond]
            k = sum(is_refusal(r["completion"], phrases[lang]["phrases"]) == refusing for r in rows)
            old = t["baseline"][lang][key]
            new = {**Rate.of(k, len(rows)).to_json(), "judgement_confidence": phrases[lang]["confidence"]}
            if old["count"] != new["count"]:
                moved.append({"matrix": f"baseline {key}", "source": None, "target": lang, "old": old["rate"],
                              "new": new["rate"]})
            t["baseline"][lang][key] = new
    t["rejudged"] = {"phrases_sha": {lang: content_sha(p["phrases"]) for lang, p in phrases.items()},
                     "note": "judged cells recomputed from transfer_completions.json with the shipped phrase lists "
                             "(benchmarks/quality/rejudge_crosslingual.py); scores and KL unchanged"}
    io.write_json(out / "transfer.json", t)
    io.write_json(out / "rejudge.json", {"run": str(run), "moved": moved})
    plot_all(out, t, io.read_json(run / "similarity.json"))
    print(json.dumps(moved, indent=1))


if __name__ == "__main__":
    main()
