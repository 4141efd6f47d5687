"""The architecture matrix on CUDA, for the paths only a GPU takes: the static decoder with ``torch.compile`` and CUDA
graphs (``static_cache=True``), CUDA graphs of the eager step (``static_cache="graphs"``), the Triton decoding
attention and MLP kernels those pick where they apply, and the eager path with grouped attention, in bf16 and fp32,
each token for token against ``model.generate`` (greedy, one unpadded prompt at a time) on the tiny models of
``tests/archs.py``.

    python -m benchmarks.fidelity.arch_matrix --out benchmarks/results/arch-matrix-h100.json
    DRY=1 python -m benchmarks.fidelity.arch_matrix --out /tmp/dry.json   # CPU, three families, fp32, no compile

Each (family, dtype, path) row records: ``match`` (all prompts' tokens equal model.generate's), the prompts that
differ (bf16 may differ on near-ties: its own greedy choice at a rounding-level tie), what decoded (the decoder's
own description, e.g. ``static cache, compiled step, CUDA graphs, Triton decoding attention``), or the refusal /
error with its reason, and the seconds it took (setup included; these are tiny models, so the times show compile
and capture cost, not decode speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # tests' conftest turns Triton's interpreter on; not here

import torch  # noqa: E402

_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT / "tests"))

DRY_FAMILIES = ("llama", "gemma2", "gpt_oss")
COMPILE_FAMILIES = ("llama", "qwen3_moe", "gemma2", "gpt_oss", "deepseek_v3", "gemma3")
PATHS = ("eager", "graphs", "compiled")


def _tokenizer():
    import conftest  # the tests' in-memory ChatML tokenizer

    return conftest.tokenizer.__wrapped__() if hasattr(conftest.tokenizer, "__wrapped__") else \
        conftest.tokenizer._fixture_function()


def _reference(model, tok, prompts: list[str], n: int) -> list[str]:
    from refusal.generation.batched import greedy_config

    out = []
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]], device=model.device)
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=greedy_config(model, tok, n))
        out.append(tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def _noise_floor(model, tok, prompts, want, n: int) -> dict:
    """The model's own code against itself: ``model.generate`` with its other attention implementation (eager where
    it ran SDPA, SDPA where it ran eager) against the reference. Where these differ too (bf16 rounding on near-tied
    logits), a fast path's differences in the same cells are no evidence of a wrong computation."""
    old = model.config._attn_implementation
    other = "eager" if old != "eager" else "sdpa"
    t = time.perf_counter()
    try:
        model.set_attn_implementation(other)
        with torch.no_grad():
            got = _reference(model, tok, prompts, n)
    except Exception as exc:  # noqa: BLE001 -- a model with one implementation has no floor to show
        return {"status": "n/a", "reason": f"{type(exc).__name__}: {str(exc)[:200]}", "seconds": 0.0}
    finally:
        model.set_attn_implementation(old)
    differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    return {"status": "match" if not differ else "differs", "differ": differ, "decoder": f"model.generate, {other}",
            "seconds": round(time.perf_counter() - t, 2)}


def _static_deficit(model, tok, prompts, kind, n: int) -> dict:
    """The static decoder's own tokens for the batch, checked against one plain forward of the model over prompt +
    tokens (:func:`benchmarks.speed.profile_generate.greedy_deficit`): per token, the largest logit minus the chosen
    one's. Rounding on near ties gives deficits of a fraction of a logit; a wrong computation gives whole logits."""
    from benchmarks.speed.profile_generate import greedy_deficit
    from refusal.generation.batched import greedy_config, static_decoder
    from refusal.templates import tokenize

    b = tokenize(tok, prompts, model.device)
    eos = greedy_config(model, tok, n).eos_token_id
    eos_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=model.device)
    with torch.no_grad():
        tokens, _ = static_decoder(model, kind)(b.input_ids, b.attention_mask, n, eos_ids, tok.pad_token_id)
        return greedy_deficit(model, b.input_ids, b.attention_mask, tokens)


def _one(model, tok, prompts, want, path: str, n: int) -> dict:
    from refusal.errors import RefusalError
    from refusal.generation.batched import generate

    kind = {"eager": False, "graphs": "graphs", "compiled": True}[path]
    report: dict = {}
    t = time.perf_counter()
    try:
        got = generate(model, tok, prompts, max_new_tokens=n, batch_size=len(prompts), static_cache=kind,
                       report=report)
    except RefusalError as exc:
        return {"status": "refused", "reason": exc.problem, "seconds": round(time.perf_counter() - t, 2)}
    except Exception as exc:  # noqa: BLE001 -- recorded: the point of the matrix is to see every failure
        return {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
                "seconds": round(time.perf_counter() - t, 2)}
    differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    extra: dict = {}
    if differ and kind:  # a static path that differs: is it rounding on near ties, or a wrong computation?
        try:
            extra["greedy_check"] = _static_deficit(model, tok, prompts, kind, n)
        except Exception as exc:  # noqa: BLE001 -- recorded beside the row
            extra["greedy_check"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"status": "match" if not differ else "differs", "differ": differ, "decoder": report.get("decoder", ""),
            "attention": report.get("attention", ""), "seconds": round(time.perf_counter() - t, 2), **extra,
            **({"got": [got[i] for i in differ], "want": [want[i] for i in differ]} if differ else {})}


def run(families: list[str], dtypes: list[torch.dtype], paths: list[str], device: str, n_new: int,
        compile_families: tuple[str, ...]) -> dict:
    import archs

    from refusal import format_prompts
    from refusal.data import builtin
    from refusal.models.parts import find_parts

    tok = _tokenizer()
    instructions = [r["instruction"] for r in builtin("harmful")[:2]] + [r["instruction"] for r in
                                                                          builtin("harmless")[:2]]
    prompts = format_prompts(tok, instructions)
    rows = []
    for fam in families:
        for dtype in dtypes:
            model = archs.build(fam, len(tok)).to(device=device, dtype=dtype)
            row = {"family": fam, "dtype": str(dtype).replace("torch.", "")}
            try:
                find_parts(model)
            except Exception as exc:  # noqa: BLE001 -- a refused architecture is a row too
                rows.append({**row, "path": "all", "status": "refused", "reason": str(exc)[:300]})
                print(fam, row["dtype"], "refused", flush=True)
                continue
            with torch.no_grad():
                want = _reference(model, tok, prompts, n_new)
            floor = _noise_floor(model, tok, prompts, want, n_new)
            rows.append({**row, "path": "model's other attention", **floor})
            print(fam, row["dtype"], "model's other attention", floor["status"], flush=True)
            for path in paths:
                if path == "compiled" and fam not in compile_families:
                    continue
                torch._dynamo.reset()
                res = _one(model, tok, prompts, want, path, n_new)
                rows.append({**row, "path": path, **res})
                print(fam, row["dtype"], path, res["status"], res.get("decoder", res.get("reason", ""))[:120],
                      f"{res['seconds']} s", flush=True)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--families", default="", help="comma-separated (default: every family of tests/archs.py)")
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    import archs

    dry = os.environ.get("DRY") == "1"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on the GPU, or set DRY=1 for the CPU subset.")
    families = [f for f in args.families.split(",") if f] or (list(DRY_FAMILIES) if dry else list(archs.FAMILIES))
    dtypes = [torch.float32] if dry else [torch.bfloat16, torch.float32]
    paths = ["eager", "graphs"] if dry else list(PATHS)
    device = "cpu" if dry else "cuda"
    t0 = time.perf_counter()
    result = run(families, dtypes, paths, device, args.new_tokens, COMPILE_FAMILIES)
    import transformers

    result.update({
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (DRY=1)",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "seconds": round(time.perf_counter() - t0, 1), "new_tokens": args.new_tokens,
        "summary": {s: sum(r["status"] == s for r in result["rows"] if r["path"] != "model's other attention")
                    for s in ("match", "differs", "refused", "error")},
        # the model's own two attention implementations against each other, per dtype: the rounding floor
        "noise_floor": {f"{dt}: {s}": sum(r["status"] == s and r["dtype"] == dt for r in result["rows"]
                                          if r["path"] == "model's other attention")
                        for dt in ("bfloat16", "float32") for s in ("match", "differs", "n/a")},
    })
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, out)
    print(json.dumps(result["summary"]), f"{result['seconds']} s -> {out}")


if __name__ == "__main__":
    main()
