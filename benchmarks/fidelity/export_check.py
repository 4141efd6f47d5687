"""An exported (abliterated) Hugging Face folder against hook ablation on the same prompts (the edited-models issue,
part 1).

    refusal abliterate RUN_DIR --out /tmp/abl
    python -m benchmarks.fidelity.export_check RUN_DIR /tmp/abl [--out FILE.json]

Scores the run's model with the selected direction ablated by hooks, and the exported folder loaded with plain
``AutoModelForCausalLM.from_pretrained``, by heretic's metric (``heretic/heretic_metric.py``: refusals in greedy
100-token answers to JailbreakBench's 100 behaviours, first-token KL against the unedited model on the first 100
harmless_test prompts), and compares their first-token log-probabilities directly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM

    from benchmarks.peers import heretic_metric as hm
    from refusal.interventions import apply
    from refusal.interventions.hooks import ablation
    from refusal.runs.pipeline import Run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("exported")
    ap.add_argument("--harmful-test", default=".data/refusal_direction/processed/jailbreakbench.json")
    ap.add_argument("--harmless-test", default=".data/refusal_direction/splits/harmless_test.json")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--n", type=int, default=100, help="test prompts of each kind (heretic: 100)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run = Run.open(a.run_dir)
    model, tok = run.model, hm.prepare_tokenizer(run.tokenizer)
    d = run.folder.selected_direction()
    harmful = [r["instruction"] for r in json.loads(Path(a.harmful_test).read_text())][: a.n]
    harmless = [r["instruction"] for r in json.loads(Path(a.harmless_test).read_text())][: a.n]
    kw = {"batch_size": a.batch_size}

    def score(m):
        lp = hm.first_token_logprobs(m, tok, harmless, **kw)
        resp = hm.responses(m, tok, harmful, **kw)
        return lp, sum(map(hm.is_refusal, resp)), resp

    t = time.perf_counter()
    base_lp, base_ref, _ = score(model)
    with apply(model, [ablation(d)]):
        hook_lp, hook_ref, hook_resp = score(model)
    t_hooks = time.perf_counter() - t
    dev = next(model.parameters()).device
    del model
    run._model = None
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    t = time.perf_counter()
    exported = AutoModelForCausalLM.from_pretrained(a.exported, dtype=torch.bfloat16).to(dev).eval()
    load_s = time.perf_counter() - t
    exp_lp, exp_ref, exp_resp = score(exported)
    same = sum(x == y for x, y in zip(hook_resp, exp_resp))
    out = {"run": str(run.dir), "exported": a.exported, "device": run.device_name(), "direction": {"pos": d.pos,
           "layer": d.layer}, "n_harmful": len(harmful), "n_harmless": len(harmless),
           "base_refusals": base_ref,
           "hooks": {"refusals": hook_ref, "kl": round(hm.kl_batchmean(hook_lp, base_lp), 5)},
           "exported_model": {"refusals": exp_ref, "kl": round(hm.kl_batchmean(exp_lp, base_lp), 5)},
           "max_abs_first_token_logprob_diff": float((exp_lp - hook_lp).abs().max()),
           "kl_hooks_vs_exported": round(hm.kl_batchmean(exp_lp, hook_lp), 6),
           "identical_answers": same, "exported_load_s": round(load_s, 1), "hooks_scoring_s": round(t_hooks, 1)}
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
