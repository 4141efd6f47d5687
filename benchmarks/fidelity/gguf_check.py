"""An edited GGUF against hook ablation on the same model (the edited-models issue, part 1).

    refusal abliterate RUN_DIR --gguf --out /tmp/abl.gguf          # the run's model came as a GGUF (catalog)
    python -m benchmarks.fidelity.gguf_check RUN_DIR /tmp/abl.gguf [--n 16] [--out FILE.json]

Loads the original GGUF and the edited one with transformers (dequantized), and compares on ``--n`` harmful and
``--n`` harmless test prompts of the run: the last-position logits of the edited GGUF against the original under
hook ablation of the run's direction (the edit is exact in real arithmetic; what differs is the edited tensors'
storage type), and each against the original without ablation for scale; the refusal score on harmful prompts of
each; and the file sizes. If llama-cpp-python is installed, llama.cpp also loads the edited file and answers the
harmful prompt with the highest refusal score greedily (and the original, for comparison).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from refusal import io
    from refusal.interventions import apply
    from refusal.interventions.hooks import ablation
    from refusal.layout import layout
    from refusal.models import catalog
    from refusal.models.loading import load_model
    from refusal.runs.pipeline import Run
    from refusal.scoring.engine import layout_logits
    from refusal.scoring.refusal import refusal_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("edited")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run = Run.open(a.run_dir)
    src = run.inputs.source
    if src.kind not in ("gguf", "catalog"):
        raise SystemExit(f"{run.cfg.model} is not a GGUF model; use benchmarks.fidelity.export_check for a folder.")
    source = Path(src.path) if src.kind == "gguf" else catalog.pull(src.path)
    splits = io.read_json(run.dir / "splits.json")
    d = run.folder.selected_direction()
    harmful = [r["instruction"] for r in splits["harmful"]["test"][: a.n]]
    harmless = [r["instruction"] for r in splits["harmless"]["test"][: a.n]]
    model, tok = run.model, run.tokenizer
    rids = torch.tensor(run.refusal_ids())
    prompts = run.prompts([{"instruction": p} for p in harmful + harmless])
    lay = layout(tok, prompts, "cpu")
    t = time.perf_counter()
    with torch.no_grad():
        base = layout_logits(model, lay).float()
        with apply(model, [ablation(d)]):
            hooks = layout_logits(model, lay).float()
    del model
    run._model = None
    edited, _ = load_model(str(a.edited), device="cpu", dtype=run.dtype)
    with torch.no_grad():
        edit = layout_logits(edited, lay).float()
    n = len(harmful)

    def rel(x, y):
        return float((x - y).norm() / y.norm())

    out = {"run": str(run.dir), "source_gguf": str(source), "edited_gguf": str(a.edited),
           "source_bytes": source.stat().st_size, "edited_bytes": Path(a.edited).stat().st_size,
           "n_prompts": len(prompts), "device": "cpu", "dtype": run.dtype,
           "direction": {"pos": d.pos, "layer": d.layer},
           "max_abs_logit_diff_edited_vs_hooks": float((edit - hooks).abs().max()),
           "rel_logit_diff_edited_vs_hooks": rel(edit, hooks),
           "max_abs_logit_diff_original_vs_hooks": float((base - hooks).abs().max()),
           "rel_logit_diff_original_vs_hooks": rel(base, hooks),
           "argmax_agreement_edited_vs_hooks": float((edit.argmax(-1) == hooks.argmax(-1)).float().mean()),
           "harmful_refusal_score_mean": {"original": float(refusal_score(base[:n], rids).mean()),
                                          "hooks": float(refusal_score(hooks[:n], rids).mean()),
                                          "edited": float(refusal_score(edit[:n], rids).mean())},
           "seconds": round(time.perf_counter() - t, 1)}
    try:
        from llama_cpp import Llama
    except ImportError:
        out["llama_cpp"] = "not installed"
    else:
        worst = int(refusal_score(base[:n], rids).argmax())  # the harmful prompt the original refuses most surely
        msgs = [{"role": "user", "content": harmful[worst]}]
        answers = {}
        for name, path in (("original", source), ("edited", Path(a.edited))):
            llm = Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0)
            r = llm.create_chat_completion(messages=msgs, max_tokens=48, temperature=0.0)
            answers[name] = r["choices"][0]["message"]["content"]
            del llm
        out["llama_cpp"] = {"prompt": harmful[worst], "answers": answers}
    text = json.dumps(out, indent=2, ensure_ascii=False)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
