"""Which part of the static decoder moves a family's output head away from the model's own forward: the decoder with
each of its replacements turned off in turn (fused projections, the Triton decoding attention, the Triton gate/up +
activation kernel, the one-kernel RMS norms, CUDA graphs), against the model's own rounding floor (its plain forward
with its other attention implementation, eager ↔ SDPA, over the same tokens).

For every variant: the decoder's head output at every step (recorded as in the architecture matrix, the prefill is
step 0) against one plain forward of the model over prompt + the variant's own tokens at the same positions; the
largest absolute difference over the live rows per step, and the greedy check
(:func:`benchmarks.speed.profile_generate.greedy_deficit`).

    python -m benchmarks.fidelity.static_toggles --families gemma,llama --out static-toggles.json   # on a GPU
    python -m benchmarks.fidelity.static_toggles --families gemma --device cpu --dtypes float32 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # archs.py, conftest.py

VARIANTS: dict[str, dict[str, Any]] = {
    "as shipped (graphs)": {},
    "no fused projections": {"fuse": False},
    "no Triton attention": {"attention_kernel": False},
    "no Triton MLP": {"mlp_kernel": False},
    "no fused norms": {"norms": False},
    "no CUDA graphs": {"graphs": False},
    "none of them": {"fuse": False, "attention_kernel": False, "mlp_kernel": False, "norms": False, "graphs": False},
}


def _decode(model, b, n, eos_ids, pad_id, opts: dict[str, Any]):
    import refusal.generation.static as static
    from benchmarks.fidelity.arch_matrix import _HeadRecorder
    from refusal.models.parts import model_device

    cuda = model_device(model).type == "cuda"
    kw = {"graphs": cuda and opts.get("graphs", True), "fuse": opts.get("fuse", cuda)}
    for k in ("attention_kernel", "mlp_kernel"):
        if k in opts:
            kw[k] = opts[k]
    dec = static.StaticDecoder(model, compile=False, **kw)
    head = model.get_output_embeddings()
    rec = _HeadRecorder(head, n, b.input_ids.shape[0], head.weight.shape[0], model.device)
    original = static.fused_norms
    if opts.get("norms", True) is False:
        static.fused_norms = lambda m: nullcontext(0)  # type: ignore[assignment]
    try:
        with rec:
            tokens, _ = dec(b.input_ids, b.attention_mask, n, eos_ids, pad_id)
    finally:
        static.fused_norms = original
    return tokens, rec.steps(), dec


def _step_diff(steps: torch.Tensor, ref: torch.Tensor, live: torch.Tensor) -> list:
    from benchmarks.fidelity.arch_matrix import _round

    diff = (steps - ref).abs().amax(-1).masked_fill(~live, float("nan"))
    return _round(torch.stack([c[~c.isnan()].max() if (~c.isnan()).any() else c.new_tensor(float("nan"))
                               for c in diff.T]).tolist())


def _other_attention(model) -> str | None:
    cur = getattr(model.config, "_attn_implementation", None)
    other = {"sdpa": "eager", "eager": "sdpa"}.get(cur or "")
    if other is None:
        return None
    try:
        model.set_attn_implementation(other)
    except (AttributeError, ValueError):
        model.config._attn_implementation = other
    return cur


def run_family(fam: str, dtype: torch.dtype, device: str, n: int) -> dict[str, Any]:
    import archs

    from benchmarks.fidelity.arch_matrix import _eos_ids, _head_outputs, _tokenizer
    from benchmarks.speed.profile_generate import greedy_deficit, live_tokens
    from refusal import format_prompts
    from refusal.data import builtin
    from refusal.templates import tokenize

    tok = _tokenizer()
    prompts = format_prompts(tok, [r["instruction"] for r in builtin("harmful")[:2]]
                             + [r["instruction"] for r in builtin("harmless")[:2]])
    torch.manual_seed(0)
    model = archs.build(fam, len(tok)).to(device=device, dtype=dtype).eval()
    b = tokenize(tok, prompts, model.device)
    eos_ids = _eos_ids(model, tok, n)
    out: dict[str, Any] = {"family": fam, "dtype": str(dtype).replace("torch.", ""), "variants": {}}
    with torch.no_grad():
        for name, opts in VARIANTS.items():
            t = time.perf_counter()
            try:
                tokens, steps, dec = _decode(model, b, n, eos_ids, tok.pad_token_id, opts)
            except Exception as exc:  # noqa: BLE001 -- a variant that cannot run here is a row too
                out["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                continue
            ref = _head_outputs(model, b.input_ids, b.attention_mask, tokens)
            live = live_tokens(tokens, eos_ids)
            out["variants"][name] = {
                "decoder": dec.describe() if hasattr(dec, "describe") else "",
                "step_head_max_abs_diff": _step_diff(steps, ref, live),
                "greedy_check": greedy_deficit(model, b.input_ids, b.attention_mask, tokens, eos_ids),
                "seconds": round(time.perf_counter() - t, 2)}
            if name == "as shipped (graphs)":
                was = _other_attention(model)
                if was is not None:
                    other = _head_outputs(model, b.input_ids, b.attention_mask, tokens)
                    out["floor"] = {"attention": f"{was} -> {model.config._attn_implementation}",
                                    "step_head_max_abs_diff": _step_diff(other, ref, live)}
                    _other_attention(model)
        if any("error" not in v for v in out["variants"].values()):
            out["head_max_minus_mean"] = round((ref.amax(-1) - ref.mean(-1))[live].mean().item(), 3)
    for name, v in out["variants"].items():
        d = [x for x in v.get("step_head_max_abs_diff", []) if x is not None]
        print(f"{fam:10s} {out['dtype']:9s} {name:22s} " + (f"head diff max {max(d):.4f} (prefill {d[0]:.4f})  "
                                                          f"greedy {v['greedy_check']['tokens_greedy']}"
                                                          if d else v.get("error", "")), flush=True)
    if "floor" in out:
        d = [x for x in out["floor"]["step_head_max_abs_diff"] if x is not None]
        print(f"{fam:10s} {out['dtype']:9s} {'floor (other attention)':22s} head diff max {max(d):.4f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", default="gemma,llama")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=8)
    a = ap.parse_args(argv)
    rows = [run_family(f, getattr(torch, dt), a.device, a.new_tokens)
            for f in a.families.split(",") for dt in a.dtypes.split(",")]
    res = {"command": "python -m benchmarks.fidelity.static_toggles " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
