"""The architecture matrix: every stage of the pipeline on a tiny random model of every decoder family
(``tests/archs.py``), each against a plain reference.

* ``extract``: diff-in-means against the model's own hidden states (decoder layer inputs), one unpadded prompt at a
  time;
* ``score``: ``score_candidates`` (many candidates per pass, shared prefix, buckets, last-position logits) against
  each candidate scored alone with plain unpadded forwards;
* ``generate`` / ``generate_static``: ``refusal.generate`` (eager, with and without the split prefill; then the static
  decoder, which on a CPU decodes from a static cache with no compile) token for token against ``model.generate``,
  greedy, one unpadded prompt at a time;
* ``ablation``: hook ablation against orthogonalized weights;
* ``export_hf``: the exported Hugging Face folder, reloaded, against hook ablation (and, for multimodal wrappers, the
  vision tower byte-identical);
* ``adapter``: the PEFT LoRA adapter of the same edit, loaded with ``PeftModel.from_pretrained`` on the saved base,
  against hook ablation (so against the merged export), with its size beside the merged model's;
* ``export_gguf``: the exported GGUF reloaded by transformers against hook ablation, or a clear error naming the
  architecture;
* ``chat``: a :class:`~refusal.generation.session.ChatSession` against ``generate``, without and with an ablation.

Every (family, stage) cell records its outcome (pass, xfail with the reason, refused with the reason, fail with the
assertion) and the code path it took; at the end of the session the matrix is written as JSON under pytest's
temporary folder, and with ``REFUSAL_WRITE_MODELS_DOC=1`` also rendered into ``docs/models.md``
(:mod:`benchmarks.models_doc`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import archs  # noqa: E402

from refusal import extract, format_prompts, orthogonalized, post_instruction_ids  # noqa: E402
from refusal.data import builtin  # noqa: E402
from refusal.directions.base import Direction  # noqa: E402
from refusal.directions.diff_means import Candidates  # noqa: E402
from refusal.errors import RefusalError  # noqa: E402
from refusal.generation.batched import generate, greedy_config  # noqa: E402
from refusal.interventions import Plan, ablation, addition, apply  # noqa: E402
from refusal.models.norms import fused_norms  # noqa: E402
from refusal.models.parts import find_parts  # noqa: E402
from refusal.scoring.engine import kl_div, score_candidates  # noqa: E402
from refusal.scoring.refusal import refusal_score, refusal_token_ids  # noqa: E402

FAMILIES = list(archs.FAMILIES)
STAGES = ("extract", "score", "generate", "generate_static", "ablation", "export_hf", "adapter", "export_gguf", "chat")
HARMFUL = [r["instruction"] for r in builtin("harmful")[:3]]
HARMLESS = [r["instruction"] for r in builtin("harmless")[:3]]
NEW_TOKENS = 5
# (family, stage) cells known to fail today, with why: a mismatch there is an expected failure (xfail), and a cell
# that passes is recorded as passing. Empty since the grouped attention keeps gpt-oss's sinks and Gemma-2's softcap
# on the model's own attention (commit 7a41523); before it both generate cells failed here.
KNOWN: dict[tuple[str, str], str] = {}


# ---- the matrix record --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    """(family, stage) -> {status, path, reason}; written as JSON (and docs/models.md on request) at the end."""
    cells: dict[tuple[str, str], dict] = {}
    t0 = time.perf_counter()
    yield cells
    if not cells:
        return
    result = {
        "transformers": __import__("transformers").__version__, "torch": torch.__version__,
        "python": platform.python_version(), "device": "cpu", "dtype": "float32",
        "seconds": round(time.perf_counter() - t0, 1), "stages": list(STAGES),
        "families": {name: {"class": f.model, "config": f.config, "features": f.features, "multimodal": f.multimodal}
                     for name, f in archs.FAMILIES.items()},
        "missing": archs.MISSING,
        "cells": [{"family": fam, "stage": stage, **cell} for (fam, stage), cell in sorted(cells.items())],
    }
    out = tmp_path_factory.getbasetemp() / "architecture-matrix.json"
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    if os.environ.get("REFUSAL_WRITE_MODELS_DOC") == "1":
        from benchmarks.models_doc import write_doc

        root = Path(__file__).resolve().parent.parent
        write_doc(result, root / "docs" / "models.md", root / "docs" / "models.json")


@contextmanager
def cell(matrix, family: str, stage: str):
    """Record the outcome of one (family, stage) cell: whatever the block sets in the yielded dict (``path``,
    ``status``, ``reason``), or the exception that ended it."""
    entry = {"status": "pass", "path": "", "reason": ""}
    matrix[(family, stage)] = entry
    try:
        yield entry
    except RefusalError as exc:
        entry.update(status="refused", reason=exc.problem)
        raise
    except BaseException as exc:  # noqa: BLE001 -- recorded, then re-raised
        kind = type(exc).__name__
        if kind == "XFailed":
            entry.update(status="xfail", reason=str(exc))
        elif kind == "Skipped":
            entry.update(status="skipped", reason=str(exc))
        else:
            entry.update(status="fail", reason=f"{kind}: {str(exc).strip().splitlines()[0][:400] if str(exc) else ''}")
        raise


def _known(family: str, stage: str, exc: AssertionError):
    reason = KNOWN.get((family, stage))
    if reason is None:
        raise exc
    pytest.xfail(f"{reason} ({str(exc).splitlines()[0][:200]})")


# ---- models, built once per family ----------------------------------------------------------------------------------


class Zoo:
    """Each family's model (built on first use) and what earlier stages found (candidates)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.models: dict[str, torch.nn.Module] = {}
        self.cands: dict[str, Candidates] = {}

    def model(self, family: str):
        if family not in self.models:
            self.models[family] = archs.build(family, len(self.tok))
        return self.models[family]

    def refusal(self, family: str) -> RefusalError | None:
        """Why the package refuses this family (from its layer structure), or None."""
        try:
            find_parts(self.model(family))
        except RefusalError as exc:
            return exc
        return None

    def candidates(self, family: str) -> Candidates:
        if family not in self.cands:
            tok = self.tok
            self.cands[family] = extract(self.model(family), tok, format_prompts(tok, HARMFUL),
                                         format_prompts(tok, HARMLESS), len(post_instruction_ids(tok)), batch_size=2)
        return self.cands[family]

    def direction(self, family: str) -> Direction:
        """A direction the model really has: the diff-in-means at the last position of a middle layer."""
        c = self.candidates(family)
        return c.direction(-1, c.n_layers // 2)


@pytest.fixture(scope="module")
def zoo(tokenizer):
    return Zoo(tokenizer)


@contextmanager
def stage_of(zoo, matrix, family: str, stage: str):
    """A cell whose model the package refuses records the refusal (the stage's own entry point must raise it)."""
    with cell(matrix, family, stage) as entry:
        yield entry, zoo.refusal(family)


def _refused(entry: dict, exc: RefusalError) -> None:
    entry.update(status="refused", reason=exc.problem, path="refused before any work")


def _ids(tok, prompt: str) -> torch.Tensor:
    return torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def _plain_last_logits(model, tok, prompt: str) -> torch.Tensor:
    return model(input_ids=_ids(tok, prompt), use_cache=False).logits[0, -1].float()


@torch.no_grad()
def _plain_generate(model, tok, prompt: str, n: int = NEW_TOKENS) -> str:
    ids = _ids(tok, prompt)
    seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         generation_config=greedy_config(model, tok, n))
    return tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    atol = rtol * max(1.0, float(b.detach().abs().max()))
    err = float((a - b).detach().abs().max())
    assert err <= atol, f"{what}: max difference {err:.3g} > {atol:.3g}"


@contextmanager
def _attention_seen(model, into: set):
    """Record the attention implementation the model's attention modules run under (the config they read)."""
    handles = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and type(m).__name__.endswith("Attention") and hasattr(cfg, "_attn_implementation"):
            handles.append(m.register_forward_pre_hook(lambda mod, a, c=cfg: into.add(c._attn_implementation)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _attention_path(model, seen: set) -> str:
    from refusal.generation.attention import grouped_attention_misfit

    if seen == {"refusal_gqa"}:
        return "fast path (grouped attention)"
    if "refusal_gqa" in seen:
        return f"mixed ({', '.join(sorted(seen))})"
    why = grouped_attention_misfit(model)
    return f"model's own attention ({', '.join(sorted(seen)) or '?'})" + (f": {why}" if why else "")


# ---- the stages ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_extract(family, zoo, matrix, tokenizer):
    with stage_of(zoo, matrix, family, "extract") as (entry, refused):
        model, tok = zoo.model(family), tokenizer
        hp, bp = format_prompts(tok, HARMFUL), format_prompts(tok, HARMLESS)
        n_pos = len(post_instruction_ids(tok))
        if refused is not None:
            with pytest.raises(RefusalError):
                extract(model, tok, hp, bp, n_pos)
            return _refused(entry, refused)
        with fused_norms(model) as n_fused:
            pass
        cands = zoo.candidates(family)
        n_layers = cands.n_layers

        @torch.no_grad()
        def means(prompts):
            rows = []
            for p in prompts:
                hs = model(input_ids=_ids(tok, p), output_hidden_states=True, use_cache=False).hidden_states
                rows.append(torch.stack([hs[i][0, -n_pos:] for i in range(n_layers)], 1))
            return torch.stack(rows).mean(0)

        want_h, want_b = means(hp), means(bp)
        _close(cands.harmful_mean, want_h, "harmful means")
        _close(cands.harmless_mean, want_b, "harmless means")
        assert float(cands.diffs[:, 1:].norm()) > 0  # the test can fail: the prompts differ
        entry["path"] = "fast path (shared prefix, length buckets" + (f", {n_fused} fused RMS norms)" if n_fused
                                                                       else "; the model's own norms)")


@pytest.mark.parametrize("family", FAMILIES)
def test_score(family, zoo, matrix, tokenizer):
    with stage_of(zoo, matrix, family, "score") as (entry, refused):
        model, tok = zoo.model(family), tokenizer
        if refused is not None:
            d = model.get_input_embeddings().weight.shape[1]
            fake = Candidates(torch.ones(1, 2, d), torch.zeros(1, 2, d), [-1])
            with pytest.raises(RefusalError):
                score_candidates(model, tok, fake, format_prompts(tok, HARMFUL[:1]), format_prompts(tok, HARMLESS[:1]),
                                 refusal_token_ids(tok))
            return _refused(entry, refused)
        full = zoo.candidates(family)
        c = Candidates(full.harmful_mean[-2:], full.harmless_mean[-2:], full.positions[-2:])
        hv, bv = format_prompts(tok, HARMFUL[:2]), format_prompts(tok, HARMLESS[:2])
        rids = refusal_token_ids(tok)
        got = score_candidates(model, tok, c, hv, bv, rids, batch_size=64, min_prefix=1)
        r = torch.tensor(rids)
        base = [torch.log_softmax(_plain_last_logits(model, tok, p), -1) for p in bv]
        checked = 0
        for pi, pos in enumerate(c.positions):
            for layer in range(c.n_layers):
                if float(c.diffs[pi, layer].norm()) <= 1e-6 * float(c.diffs.norm(dim=-1).max()):
                    assert torch.isnan(got.bypass[pi, layer])
                    continue
                d = c.direction(pos, layer)
                with apply(model, [ablation(d)]):
                    bypass = torch.stack([refusal_score(_plain_last_logits(model, tok, p), r) for p in hv]).mean()
                    kl = torch.stack([kl_div(b, torch.log_softmax(_plain_last_logits(model, tok, p), -1))
                                      for b, p in zip(base, bv)]).mean()
                with apply(model, [addition(d, 1.0)]):
                    induce = torch.stack([refusal_score(_plain_last_logits(model, tok, p), r) for p in bv]).mean()
                where = f"candidate (pos {pos}, layer {layer})"
                _close(got.bypass[pi, layer], bypass, f"bypass of {where}", 1e-3)
                _close(got.induce[pi, layer], induce, f"induce of {where}", 1e-3)
                assert abs(float(got.kl[pi, layer]) - float(kl)) <= 1e-3 * max(1.0, float(kl)), \
                    f"KL of {where}: {float(got.kl[pi, layer]):.4g} vs {float(kl):.4g}"
                checked += 1
        assert checked > 0
        entry["path"] = "fast path (candidates batched per row, shared prefix, last-position logits)"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate(family, zoo, matrix, tokenizer):
    with stage_of(zoo, matrix, family, "generate") as (entry, refused):
        model, tok = zoo.model(family), tokenizer
        prompts = format_prompts(tok, HARMFUL[:2] + HARMLESS[:1])
        if refused is not None:
            with pytest.raises(RefusalError):
                generate(model, tok, prompts, max_new_tokens=NEW_TOKENS)
            return _refused(entry, refused)
        want = [_plain_generate(model, tok, p) for p in prompts]
        assert any(want)
        seen: set = set()
        try:
            for split in (True, False):
                with _attention_seen(model, seen):
                    got = generate(model, tok, prompts, max_new_tokens=NEW_TOKENS, batch_size=3, split_prefill=split)
                assert got == want, f"split_prefill={split}: {got} != model.generate's {want}"
        except AssertionError as exc:
            entry["path"] = _attention_path(model, seen)
            _known(family, "generate", exc)
        entry["path"] = _attention_path(model, seen) + "; split prefill and whole padded rows"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_static(family, zoo, matrix, tokenizer):
    """The static decoder as a CPU runs it (static cache, no compile, no graphs): same tokens, or a clear refusal."""
    with stage_of(zoo, matrix, family, "generate_static") as (entry, refused):
        model, tok = zoo.model(family), tokenizer
        prompts = format_prompts(tok, HARMFUL[:2] + HARMLESS[:1])
        if refused is not None:
            with pytest.raises(RefusalError):
                generate(model, tok, prompts, max_new_tokens=NEW_TOKENS, static_cache="graphs")
            return _refused(entry, refused)
        want = [_plain_generate(model, tok, p) for p in prompts]
        report: dict = {}
        try:
            got = generate(model, tok, prompts, max_new_tokens=NEW_TOKENS, batch_size=3, static_cache="graphs",
                           report=report)
        except RefusalError as exc:
            entry.update(status="refused", reason=exc.problem, path="model.generate (a run falls back to it)")
            return
        entry["path"] = str(report.get("decoder", "static decoder"))
        try:
            assert got == want, f"static decoder: {got} != model.generate's {want}"
        except AssertionError as exc:
            _known(family, "generate_static", exc)


@torch.no_grad()
def _hook_logits(model, tok, prompts, d):
    with apply(model, [ablation(d)]):
        return torch.cat([model(input_ids=_ids(tok, p), use_cache=False).logits[0].float() for p in prompts])


@torch.no_grad()
def _logits(model, tok, prompts):
    return torch.cat([model(input_ids=_ids(tok, p), use_cache=False).logits[0].float() for p in prompts])


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation(family, zoo, matrix, tokenizer):
    with stage_of(zoo, matrix, family, "ablation") as (entry, refused):
        model, tok = zoo.model(family), tokenizer
        if refused is not None:
            with pytest.raises(RefusalError):
                with orthogonalized(model, torch.randn(model.get_input_embeddings().weight.shape[1])):
                    pass
            return _refused(entry, refused)
        prompts = format_prompts(tok, HARMFUL[:2])
        d = zoo.direction(family)
        base = _logits(model, tok, prompts)
        hooked = _hook_logits(model, tok, prompts, d)
        assert float((hooked - base).abs().max()) > 1e-3  # the test can fail: the ablation changes the logits
        with orthogonalized(model, d):
            ortho = _logits(model, tok, prompts)
        _close(ortho, hooked, "orthogonalized weights vs hook ablation")
        _close(_logits(model, tok, prompts), base, "weights restored", 1e-6)
        entry["path"] = "hooks at layer inputs and attention/MLP outputs; weights of every residual writer"


def _model_class_reload(model, path):
    return type(model).from_pretrained(path, dtype=torch.float32).eval()


def _vision_keys(names) -> list[str]:
    return [k for k in names if any(s in k for s in ("vision", "visual", "multi_modal_projector"))]


@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf(family, zoo, matrix, tokenizer, tmp_path):
    from safetensors import safe_open

    from refusal.export.hf import export_hf

    with stage_of(zoo, matrix, family, "export_hf") as (entry, refused):
        model, tok = zoo.model(family), tokenizer
        if refused is not None:
            with pytest.raises(RefusalError):
                export_hf(model, tok, torch.randn(model.get_input_embeddings().weight.shape[1]), tmp_path / "x")
            return _refused(entry, refused)
        prompts = format_prompts(tok, HARMFUL[:2])
        d = zoo.direction(family)
        hooked = _hook_logits(model, tok, prompts, d)
        out = export_hf(model, tok, d, tmp_path / "abliterated")
        reloaded = _model_class_reload(model, out)
        _close(_logits(reloaded, tok, prompts), hooked, "exported folder reloaded vs hook ablation")
        entry["path"] = "weights edited, saved with save_pretrained"
        if archs.FAMILIES[family].multimodal:
            model.save_pretrained(tmp_path / "original")

            def tensors(folder):
                out = {}
                for f in sorted(Path(folder).glob("*.safetensors")):
                    with safe_open(str(f), "pt") as st:
                        out.update({k: st.get_tensor(k) for k in st.keys()})
                return out

            before, after = tensors(tmp_path / "original"), tensors(out)
            vision = _vision_keys(before)
            assert vision and set(vision) <= set(after)
            for k in vision:
                a, b = before[k], after[k]
                assert a.dtype == b.dtype and a.shape == b.shape and bytes(a.numpy().data) == bytes(b.numpy().data), \
                    f"vision tensor {k} changed"
            assert any(not torch.equal(before[k], after[k]) for k in before if k not in vision)  # the text changed
            entry["path"] += f"; vision tower ({len(vision)} tensors) byte-identical"


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter(family, zoo, matrix, tokenizer, tmp_path):
    from refusal.export.adapter import export_adapter
    from refusal.models.writers import residual_writers

    with stage_of(zoo, matrix, family, "adapter") as (entry, refused):
        model, tok = zoo.model(family), tokenizer
        if refused is not None:
            with pytest.raises(RefusalError):
                export_adapter(model, torch.randn(model.get_input_embeddings().weight.shape[1]), tmp_path / "x")
            return _refused(entry, refused)
        peft = pytest.importorskip("peft")
        prompts = format_prompts(tok, HARMFUL[:2])
        d = zoo.direction(family)
        hooked = _hook_logits(model, tok, prompts, d)
        try:
            out = export_adapter(model, d, tmp_path / "adapter")
        except RefusalError as exc:  # a bias along the direction (gpt-oss's o_proj): LoRA cannot hold b − B̂ᵀB̂b
            biased = [w.name for w in residual_writers(model) if w.bias is not None and w.bias.abs().max() > 0]
            assert exc.problem.startswith("The bias of ") and biased, exc.problem
            return _refused(entry, exc)
        model.save_pretrained(tmp_path / "base")
        base = _model_class_reload(model, tmp_path / "base")
        with_adapter = peft.PeftModel.from_pretrained(base, out).eval()
        _close(_logits(with_adapter, tok, prompts), hooked, "base + adapter vs hook ablation")
        size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
        merged = sum(p.numel() * p.element_size() for p in model.parameters())
        entry["path"] = (f"PEFT LoRA, rank {json.loads((Path(out) / 'adapter_config.json').read_text())['r']}: "
                         f"{size / 1e3:.0f} kB against {merged / 1e6:.2f} MB of weights ({size / merged:.1%})")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_gguf(family, zoo, matrix, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from refusal.export.gguf import export_gguf

    with stage_of(zoo, matrix, family, "export_gguf") as (entry, refused):
        model, tok = zoo.model(family), tokenizer
        d = zoo.direction(family) if refused is None else torch.randn(model.get_input_embeddings().weight.shape[1])
        path = tmp_path / "abliterated.gguf"
        try:
            export_gguf(model, tok, d, path, dtype="f32")
        except RefusalError as exc:
            mt = model.config.model_type
            assert mt in exc.problem or refused is not None, f"the error does not name '{mt}': {exc.problem}"
            assert not path.exists()
            entry.update(status="refused", reason=exc.problem, path="clear error before writing")
            return
        assert refused is None, "a refused architecture was written"
        prompts = format_prompts(tok, HARMFUL[:2])
        hooked = _hook_logits(model, tok, prompts, d)
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        _close(_logits(back, tok, prompts), hooked, "GGUF reloaded by transformers vs hook ablation", 1e-3)
        entry["path"] = "GGUF written from the Hugging Face weights (f32)"


@pytest.mark.parametrize("family", FAMILIES)
def test_chat(family, zoo, matrix, tokenizer, monkeypatch):
    from refusal.generation.session import ChatSession

    with stage_of(zoo, matrix, family, "chat") as (entry, refused):
        model, tok = zoo.model(family), tokenizer
        d = Direction(torch.randn(model.get_input_embeddings().weight.shape[1]), 1, -1)
        if refused is not None:
            with pytest.raises(RefusalError):
                ChatSession(model, tok, {"0": d})
            return _refused(entry, refused)
        d = zoo.direction(family)
        chat = ChatSession(model, tok, {"0": d}, max_new_tokens=NEW_TOKENS)
        prompt = chat.prompt([{"role": "user", "content": HARMFUL[0]}])
        # the stream holds back a trailing partial UTF-8 character: compare the tokens it decoded
        decoded: list[list[int]] = [[]]
        real_decode = tok.decode

        def spy(*args, **kwargs):
            decoded.append(list(args[0] if args else kwargs["token_ids"]))
            return real_decode(*args, **kwargs)

        monkeypatch.setattr(tok, "decode", spy)

        def streamed(interventions=None) -> str:
            decoded.append([])
            for _ in chat.stream(prompt, interventions):
                pass
            return real_decode(decoded[-1], skip_special_tokens=True).strip()

        want = _plain_generate(model, tok, prompt)
        assert streamed() == want, "chat stream vs model.generate"
        chat.ablate("0")
        got = streamed(chat.interventions)
        want = generate(model, tok, [prompt], max_new_tokens=NEW_TOKENS, plan=Plan.rows(model, [chat.interventions]))
        assert got == want[0], "chat stream under ablation vs generate with the same plan"
        entry["path"] = "model's own forward with its dynamic cache, hooks around each step"


# ---- refusals and multimodal wrappers --------------------------------------------------------------------------------


def test_matrix_covers_the_issue_families():
    """Every family the matrix promises is built (none silently dropped because a name changed)."""
    assert not archs.MISSING, f"the installed transformers lacks {archs.MISSING}"
    assert len(FAMILIES) >= 23


def test_hybrid_with_a_block_beside_attention_is_refused_by_name(tokenizer, tmp_path):
    """A layer with a block other than attention and MLP that writes the residual stream (Falcon-H1's Mamba mixer)
    would keep the direction after ablation: refused when the model is loaded, naming the block."""
    from refusal.models.loading import load_model

    model = archs.build("falcon_h1", len(tokenizer))
    with pytest.raises(RefusalError, match="'mamba'"):
        find_parts(model)
    model.save_pretrained(tmp_path / "falcon")
    tokenizer.save_pretrained(tmp_path / "falcon")
    with pytest.raises(RefusalError, match="FalconH1Mixer"):
        load_model(str(tmp_path / "falcon"), device="cpu")


@pytest.mark.parametrize("family", [f for f in FAMILIES if archs.FAMILIES[f].multimodal])
def test_multimodal_wrapper_parts_are_the_language_model(family, zoo, tokenizer, tmp_path):
    """Layers, embedding and head of a ``...ForConditionalGeneration`` are its language model's; it loads through
    ``load_model`` like a causal LM, with its chat template."""
    from refusal.models.loading import load_model

    model = zoo.model(family)
    parts = find_parts(model)
    lm = model.model.language_model
    assert parts.layers is lm.layers and parts.embed is lm.embed_tokens
    assert parts.hidden_size == model.config.get_text_config().hidden_size
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    loaded, tok = load_model(str(tmp_path / family), device="cpu", dtype="float32")
    assert type(loaded) is type(model) and tok.chat_template
    prompts = format_prompts(tok, HARMFUL[:1])
    _close(_logits(loaded, tok, prompts), _logits(model, tokenizer, prompts), "reloaded wrapper")
