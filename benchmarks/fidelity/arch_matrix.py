"""The architecture matrix on CUDA, for the paths only a GPU takes: the static decoder with ``torch.compile`` and CUDA
graphs (``static_cache=True``), CUDA graphs of the eager step (``static_cache="graphs"``), the Triton decoding
attention and MLP kernels those pick where they apply, and the eager path with grouped attention, in bf16 and fp32,
each token for token against ``model.generate`` (greedy, one unpadded prompt at a time) on the tiny models of
``tests/archs.py``.

    python -m benchmarks.fidelity.arch_matrix --out benchmarks/results/arch-matrix-h100.json
    DRY=1 python -m benchmarks.fidelity.arch_matrix --out /tmp/dry.json   # CPU, three families, fp32, no compile
    DRY=1 python -m benchmarks.fidelity.arch_matrix --out /tmp/q.json --families qwen2_5_vl --dtypes bfloat16

Each (family, dtype, path) row records: ``match`` (all prompts' tokens equal model.generate's), the prompts that
differ (bf16 may differ on near-ties: its own greedy choice at a rounding-level tie), what decoded (the decoder's
own description, e.g. ``static cache, compiled step, CUDA graphs, Triton decoding attention``), or the refusal /
error with its reason, and the seconds it took (setup included; these are tiny models, so the times show compile
and capture cost, not decode speed). ``differ`` lists prompt indices, not token positions. A static path's row (every
``graphs`` row, and a ``compiled`` row that differs) also carries the per-token evidence of :func:`_static_check`: the
greedy check of its tokens and of ``model.generate``'s own, the head's largest difference from a plain forward at
every step, and, per differing prompt, the first differing token with the model's own margin between the two.
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


def _reference(model, tok, prompts: list[str], n: int) -> tuple[list[str], list[list[int]]]:
    """``model.generate``'s greedy completions, one unpadded prompt at a time: the texts and the new token ids."""
    from refusal.generation.batched import greedy_config

    out, ids_out = [], []
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]], device=model.device)
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=greedy_config(model, tok, n))
        out.append(tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip())
        ids_out.append(seq[0, ids.shape[1]:].tolist())
    return out, ids_out


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
            got, _ = _reference(model, tok, prompts, n)
    except Exception as exc:  # noqa: BLE001 -- a model with one implementation has no floor to show
        return {"status": "n/a", "reason": f"{type(exc).__name__}: {str(exc)[:200]}", "seconds": 0.0}
    finally:
        model.set_attn_implementation(old)
    differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    return {"status": "match" if not differ else "differs", "differ": differ, "decoder": f"model.generate, {other}",
            "seconds": round(time.perf_counter() - t, 2)}


def _eos_ids(model, tok, n: int) -> torch.Tensor:
    from refusal.generation.batched import greedy_config

    eos = greedy_config(model, tok, n).eos_token_id
    return torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=model.device,
                        dtype=torch.long)


class _HeadRecorder:
    """A forward hook on the output head that copies each call's last-position output ``(batch, vocab)`` into a
    device buffer at a device-side counter: plain tensor ops, so it is compiled into a compiled step and captured into
    a CUDA graph like the rest of the step, and every replay records its own step (the prefill is call 0)."""

    def __init__(self, head: torch.nn.Module, n: int, rows: int, vocab: int, device):
        self.head, self.n = head, n
        self.buf = torch.full((n + 1, rows, vocab), float("nan"), device=device)  # row n: overflow, never read
        self.count = torch.zeros(1, dtype=torch.long, device=device)
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module, args, out):
        self.buf.index_copy_(0, self.count.clamp(max=self.n), out[:, -1].float()[None])
        self.count.add_(1)

    def __enter__(self):
        self.handle = self.head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()

    def steps(self) -> torch.Tensor:
        """The recorded head outputs as ``(batch, n, vocab)`` (NaN at a step that did not run)."""
        return self.buf[: self.n].transpose(0, 1)


def _head_outputs(model, input_ids, attention_mask, tokens) -> torch.Tensor:
    """The output head's outputs ``(batch, n, vocab)`` of one plain forward over prompt + ``tokens`` (teacher-forced,
    the positions of :func:`~benchmarks.speed.profile_generate.greedy_deficit`) at the positions that chose them."""
    n = tokens.shape[1]
    ids = torch.cat([input_ids, tokens[:, :-1]], 1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(tokens.shape[0], n - 1)], 1)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    seen: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.float()))
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=n)
    finally:
        handle.remove()
    return seen[0][:, -n:]


def _round(xs) -> list:
    return [None if x != x else round(float(x), 4) for x in xs]  # (x != x: NaN, a step with no live row)


def _static_check(model, tok, prompts, kind, n: int, want_ids: list[list[int]], got_texts: list[str]) -> dict:
    """What settles whether a static path's tokens differ from ``model.generate``'s by rounding on near ties or by a
    wrong computation, from one more call of the static decoder (the batch as the matrix decodes it, left-padded)
    with its output head recorded at every step (a hook compiled and captured with the step):

    - ``greedy_check``: its tokens against one plain forward of the model over prompt + tokens
      (:func:`benchmarks.speed.profile_generate.greedy_deficit`; a row's padding after its stop token not counted);
    - ``reference_check``: the same check of ``model.generate``'s own tokens, one unpadded prompt at a time: a valid
      check gives ~0 there, so whole-logit deficits above are the decoder's;
    - ``step_head_max_abs_diff``: per step, over the rows still live, the largest difference between the decoder's
      head output and that plain forward's at the same position (bf16 rounding: a few hundredths to tenths of a
      logit, as the model's own two attention implementations differ; a wrong computation: whole logits), beside
      ``head_max_minus_mean`` for scale;
    - ``first_differences``: per prompt whose tokens differ from ``model.generate``'s, the first token that does,
      and the margin by which the model's own unpadded forward over prompt + the tokens before it prefers
      ``model.generate``'s token to the decoder's (a near tie: a fraction of a logit) and its top-1 minus top-2;
    - ``tokens_as_run``: whether this call decoded the texts the matrix's run did (the hook changes no math)."""
    from benchmarks.speed.profile_generate import greedy_deficit, live_tokens
    from refusal.generation.batched import static_decoder
    from refusal.templates import tokenize

    b = tokenize(tok, prompts, model.device)
    eos_ids = _eos_ids(model, tok, n)
    head = model.get_output_embeddings()
    out: dict = {}
    with torch.no_grad():
        rec = _HeadRecorder(head, n, b.input_ids.shape[0], head.weight.shape[0], model.device)
        with rec:
            tokens, _ = static_decoder(model, kind)(b.input_ids, b.attention_mask, n, eos_ids, tok.pad_token_id)
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in tokens.tolist()]
        out["tokens_as_run"] = texts == got_texts
        out["greedy_check"] = greedy_deficit(model, b.input_ids, b.attention_mask, tokens, eos_ids)
        checks = []
        for p, want in zip(prompts, want_ids):
            ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]], device=model.device)
            w = torch.tensor([want + [tok.pad_token_id] * (n - len(want))], device=model.device)
            checks.append(greedy_deficit(model, ids, torch.ones_like(ids), w, eos_ids))
        total = sum(c["tokens_checked"] for c in checks)
        out["reference_check"] = {
            "tokens_checked": total,
            "tokens_greedy": round(sum(c["tokens_greedy"] * c["tokens_checked"] for c in checks) / total, 4),
            "deficit_max": max(c["deficit_max"] for c in checks)}
        ref = _head_outputs(model, b.input_ids, b.attention_mask, tokens)
        live = live_tokens(tokens, eos_ids)
        diff = (rec.steps() - ref).abs().amax(-1).masked_fill(~live, float("nan"))  # (batch, n)
        out["step_head_max_abs_diff"] = _round(torch.stack([c[~c.isnan()].max() if (~c.isnan()).any()
                                                            else c.new_tensor(float("nan")) for c in diff.T]).tolist())
        out["head_max_minus_mean"] = round((ref.amax(-1) - ref.mean(-1))[live].mean().item(), 3)
        out["first_differences"] = _first_differences(model, tok, prompts, want_ids, tokens, rec.steps())
    return out


def _first_differences(model, tok, prompts, want_ids, tokens, steps) -> list[dict]:
    rows = []
    for i, (p, want) in enumerate(zip(prompts, want_ids)):
        got = tokens[i].tolist()
        k = next((j for j, (a, c) in enumerate(zip(want, got)) if a != c), None)
        if k is None:
            continue
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"] + want[:k]], device=model.device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits[0, -1].float()
        top = logits.topk(2).values
        s = steps[i, k]
        rows.append({"prompt": i, "token": k, "want": want[k], "got": got[k],
                     "model_margin_want_minus_got": round((logits[want[k]] - logits[got[k]]).item(), 4),
                     "model_top1_minus_top2": round((top[0] - top[1]).item(), 4),
                     "decoder_head_margin_got_minus_want": round((s[got[k]] - s[want[k]]).item(), 4)})
    return rows


def _one(model, tok, prompts, want, want_ids, path: str, n: int) -> dict:
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
    if kind and (differ or kind == "graphs"):  # a static path: rounding on near ties, or a wrong computation?
        try:
            extra.update(_static_check(model, tok, prompts, kind, n, want_ids, got))
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
                want, want_ids = _reference(model, tok, prompts, n_new)
            floor = _noise_floor(model, tok, prompts, want, n_new)
            rows.append({**row, "path": "model's other attention", **floor})
            print(fam, row["dtype"], "model's other attention", floor["status"], flush=True)
            for path in paths:
                if path == "compiled" and fam not in compile_families:
                    continue
                torch._dynamo.reset()
                res = _one(model, tok, prompts, want, want_ids, path, n_new)
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
    ap.add_argument("--dtypes", default="",
                    help="comma-separated, of bfloat16, float32 (default: both; DRY=1: float32)")
    args = ap.parse_args(argv)
    import archs

    dry = os.environ.get("DRY") == "1"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on the GPU, or set DRY=1 for the CPU subset.")
    families = [f for f in args.families.split(",") if f] or (list(DRY_FAMILIES) if dry else list(archs.FAMILIES))
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d] or \
        ([torch.float32] if dry else [torch.bfloat16, torch.float32])
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
