"""Weight edits compared on the same prompts (the edited-models issue, part 3): plain orthogonalization against the
options the field moved to (heretic's defaults): the direction made orthogonal to the harmless mean first,
norm-preserving rows, and a kernel of edit weights over depth.

    python -m benchmarks.quality.edit_options RUN_DIR [--out FILE.json] [--split test|val]

For each option, the run's selected direction is baked into the weights (restored afterwards) and the harmful and
harmless prompts of the run's split are scored at the first generated position: refusals (refusal score > 0; the
count heretic's first-token view gives) on harmful prompts, and KL(baseline || edited) on harmless prompts. Hook
ablation is the reference (plain orthogonalization equals it).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def kernel(n_layers: int, peak: int, width: float) -> list[float]:
    """A Gaussian bump of edit weights over depth, 1 at ``peak``."""
    return [math.exp(-0.5 * ((i - peak) / width) ** 2) for i in range(n_layers)]


def main() -> None:
    from refusal import io
    from refusal.directions.diff_means import Candidates
    from refusal.interventions import apply
    from refusal.interventions.hooks import ablation
    from refusal.interventions.weights import orthogonalized
    from refusal.layout import layout
    from refusal.models.parts import find_parts, model_device
    from refusal.runs.pipeline import Run
    from refusal.scoring.engine import kl_div, layout_logits
    from refusal.scoring.refusal import refusal_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run = Run.open(a.run_dir)
    model, tok = run.model, run.tokenizer
    splits = io.read_json(run.dir / "splits.json")
    d = run.folder.selected_direction()
    cands = Candidates.load(run.dir / "candidates.safetensors")
    harmless_mean = cands.harmless_mean[cands.positions.index(d.pos), d.layer]
    n_layers = find_parts(model).n_layers
    dev = model_device(model)
    rids = torch.tensor(run.refusal_ids(), device=dev)
    lay_h = layout(tok, run.prompts(splits["harmful"][a.split]), dev)
    lay_b = layout(tok, run.prompts(splits["harmless"][a.split]), dev)

    def measure():
        h, b = layout_logits(model, lay_h), layout_logits(model, lay_b)
        return refusal_score(h, rids), torch.log_softmax(b.float(), -1)

    _, base_b = measure()
    options = {
        "hooks (reference)": None,
        "plain": {},
        "orthogonal to harmless mean": {"orthogonal_to_harmless": harmless_mean},
        "norm-preserving": {"norm_preserving": True},
        "norm-preserving + orthogonal to harmless": {"norm_preserving": True, "orthogonal_to_harmless": harmless_mean},
        f"depth kernel (peak {d.layer}, width {n_layers / 4:.0f})": {"layer_weights": kernel(n_layers, d.layer,
                                                                                            n_layers / 4)},
    }
    rows = []
    for name, opts in options.items():
        t = time.perf_counter()
        ctx = apply(model, [ablation(d)]) if opts is None else orthogonalized(model, d, **opts)
        with ctx:
            s, logp = measure()
        kl = kl_div(base_b, logp)
        rows.append({"option": name, "refusals": int((s > 0).sum()), "n_harmful": len(s),
                     "mean_refusal_score": round(float(s.mean()), 4), "kl_mean": round(float(kl.mean()), 5),
                     "n_harmless": len(kl), "seconds": round(time.perf_counter() - t, 2)})
        print(f"{name:48s} refusals {rows[-1]['refusals']:3d}/{len(s)}  KL {rows[-1]['kl_mean']:.4f}")
    out = {"run": str(run.dir), "model": run.cfg.model, "device": run.device_name(), "split": a.split,
           "direction": {"pos": d.pos, "layer": d.layer}, "options": rows}
    path = Path(a.out) if a.out else run.dir / "edit_options.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
