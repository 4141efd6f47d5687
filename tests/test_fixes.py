"""Regression tests for eight fixes: extraction after out-of-memory, judge normalisation, post-instruction check,
remembered batch sizes, bad GGUF files, atomic tensor writes, a light CLI import, the ``cache`` keyword."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import build_model

from refusal import extract, format_prompts, post_instruction_ids
from refusal.batching import Batching, in_batches
from refusal.data import builtin
from refusal.directions.diff_means import mean_activations
from refusal.errors import RefusalError
from refusal.evaluation.substring import is_refusal, judge
from refusal.models.parts import cache_kwarg, find_parts
from refusal.templates import check_prompts_end_with

HARMFUL = [r["instruction"] for r in builtin("harmful")[:6]]
HARMLESS = [r["instruction"] for r in builtin("harmless")[:6]]


@pytest.fixture(scope="module")
def llama(tokenizer):
    return build_model("llama", len(tokenizer))


# 1 -------------------------------------------------------------------------------------------------------------
def test_mean_activations_not_double_counted_after_out_of_memory(llama, tokenizer):
    prompts = format_prompts(tokenizer, HARMFUL + HARMLESS)
    n_pos = len(post_instruction_ids(tokenizer))
    want = mean_activations(llama, tokenizer, prompts, n_pos, batch_size=8, description="")
    state = {"raised": 0}

    def fail_once(_m, _args, _kwargs):  # layers 0 and 1 have run for this chunk when layer 2 runs out of memory
        if not state["raised"]:
            state["raised"] += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    h = find_parts(llama).layers[2].register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        got = mean_activations(llama, tokenizer, prompts, n_pos, batch_size=8, description="")
    finally:
        h.remove()
    assert state["raised"] == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# 2 -------------------------------------------------------------------------------------------------------------
def test_substring_judge_ignores_case_apostrophes_and_markdown():
    assert is_refusal("i cannot help with that.")
    assert is_refusal("AS AN AI, I won't.")
    assert is_refusal("I *cannot* do that")
    assert is_refusal("**I’m sorry**, but no.")
    assert is_refusal("I Can’t help with this")
    assert is_refusal("i'm sorry", phrases=["I’M SORRY"])
    assert is_refusal("I *won't* do it", phrases=["i won’t"])
    assert not is_refusal("Sure, here is a recipe for bread.")
    judged = judge([{"instruction": "x", "completion": "unfortunately, I CAN NOT comply"},
                    {"instruction": "y", "completion": "Here you go."}])
    assert [r["refused"] for r in judged] == [True, False]


# 3 -------------------------------------------------------------------------------------------------------------
class _Counting:
    """A tokenizer wrapper that counts calls, and optionally truncates like ``truncation=True, max_length=n``."""

    def __init__(self, tok, max_length: int | None = None):
        self.tok, self.max_length, self.calls = tok, max_length, 0

    def __call__(self, texts, **kwargs):
        self.calls += 1
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.tok(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_every_prompt_must_end_with_the_post_instruction_tokens(tokenizer, llama):
    post = post_instruction_ids(tokenizer)
    good = format_prompts(tokenizer, HARMFUL[:4])
    counting = _Counting(tokenizer)
    check_prompts_end_with(counting, good, post)
    assert counting.calls == 1  # one batched call for all prompts
    # an instruction that was never templated (or whose end was cut) names its index
    bad = good[:2] + [HARMFUL[2]] + good[3:]
    with pytest.raises(RefusalError, match=r"Prompt 2\b"):
        check_prompts_end_with(tokenizer, bad, post)
    with pytest.raises(RefusalError, match=r"Prompt 1\b"):
        check_prompts_end_with(tokenizer, [good[0], good[1][:-1], good[2]], post)
    # a tokenizer that truncates long prompts cuts the post-instruction tokens off
    longest = max(range(len(good)), key=lambda i: len(tokenizer(good[i], add_special_tokens=False)["input_ids"]))
    n = len(tokenizer(good[longest], add_special_tokens=False)["input_ids"])
    with pytest.raises(RefusalError, match=rf"Prompt {longest}\b") as exc:
        check_prompts_end_with(_Counting(tokenizer, max_length=n - 1), good, post)
    assert exc.value.fix
    # extract checks its prompts before running the model
    with pytest.raises(RefusalError, match=r"Harmless prompt 1\b"):
        extract(llama, tokenizer, good, format_prompts(tokenizer, HARMLESS[:1]) + HARMLESS[1:3], len(post))


# 4 -------------------------------------------------------------------------------------------------------------
def test_in_batches_remembers_the_halved_batch_size():
    seen: list[int] = []

    def fn(chunk):
        seen.append(len(chunk))
        if len(chunk) > 4:
            raise RuntimeError("CUDA out of memory (simulated)")

    items = list(range(20))
    batching = Batching()  # what the caller (a run) owns and passes down: no module state
    assert in_batches(fn, items, 16, "work", batching=batching) == 4
    assert seen == [16, 8, 4, 4, 4, 4, 4] and batching.sizes == {"work": 4}
    seen.clear()
    assert batching.run(fn, items, 16, "work") == 4  # starts at the remembered size: no failed attempt
    assert seen == [4] * 5
    seen.clear()
    assert in_batches(fn, items, 2, "work", batching=batching) == 2  # never above what was asked for
    assert seen == [2] * 10
    seen.clear()
    in_batches(fn, items, 16, "shown differently", key="work", batching=batching)  # an explicit key shares it
    assert max(seen) == 4
    seen.clear()
    in_batches(fn, items, 8, "other work", batching=batching)  # another key starts at its own size
    assert seen[0] == 8
    seen.clear()
    in_batches(fn, items, 16, "work")  # no Batching given: a fresh one, nothing remembered from the calls above
    assert seen[:3] == [16, 8, 4]
    seen.clear()
    Batching().run(fn, items, 16, "work")  # another owner's Batching does not see this one's sizes
    assert seen[0] == 16
    batching.forget()
    seen.clear()
    batching.run(fn, items, 16, "work")
    assert seen[0] == 16


def test_a_quiet_batching_draws_no_progress_bar(capsys):
    """Quietness belongs to the Batching its owner passes down (the chat's is quiet), not to the process."""
    Batching(quiet=True).run(lambda chunk: None, list(range(5)), 2, "Quiet work")
    assert "Quiet work" not in capsys.readouterr().err
    Batching().run(lambda chunk: None, list(range(5)), 2, "Shown work")
    assert "Shown work" in capsys.readouterr().err


# 5 -------------------------------------------------------------------------------------------------------------
def _write_gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).random((64, 16), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_garbage_and_truncated_gguf_files_give_a_refusal_error(tmp_path):
    from refusal.models.loading import ModelSource, load_model, resolve_source

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(RefusalError, match="not a valid, complete GGUF") as exc:
        resolve_source(str(garbage))
    assert "refusal models pull" in exc.value.fix
    stub = tmp_path / "stub.gguf"
    stub.write_bytes(b"GGUF\x03\x00")  # the magic, then nothing
    with pytest.raises(RefusalError, match="not a valid, complete GGUF"):
        resolve_source(str(stub))

    real = tmp_path / "real.gguf"
    _write_gguf(real)
    data = real.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) // 2])  # an interrupted download: the header is fine, the rest is missing
    src = resolve_source(str(cut))
    assert src.kind == "gguf"
    with pytest.raises(RefusalError, match="not a valid, complete GGUF") as exc:
        load_model(src, device="cpu")
    assert "refusal models pull" in exc.value.fix
    # the loader's own error is wrapped too, even for a source that skipped resolve_source's check
    with pytest.raises(RefusalError, match="not a valid, complete GGUF"):
        load_model(ModelSource(str(garbage), "gguf", str(garbage), "garbage"), device="cpu")


def test_cli_run_on_a_garbage_gguf_exits_with_a_message(tmp_path):
    from typer.testing import CliRunner

    from refusal.cli import app

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(2).bytes(1000))
    r = CliRunner().invoke(app, ["run", "--model", str(garbage), "--output", str(tmp_path / "runs")])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "GGUF" in r.output


# 6 -------------------------------------------------------------------------------------------------------------
def test_write_tensors_makes_folders_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    from refusal import io

    target = tmp_path / "new" / "deeper" / "t.safetensors"
    io.write_tensors(target, {"a": torch.arange(6.0).view(2, 3)[:, 1:]}, {"k": [1, 2]})  # non-contiguous too
    tensors, meta = io.read_tensors(target)
    torch.testing.assert_close(tensors["a"], torch.tensor([[1.0, 2.0], [4.0, 5.0]]))
    assert meta == {"k": [1, 2]}

    synced = []
    real_fsync = io.os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    io.write_tensors(target, {"a": torch.zeros(3)})
    assert synced  # written to disk before it replaces the target

    def boom(_fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(io.os, "fsync", boom)
    before = target.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        io.write_tensors(target, {"a": torch.ones(1000)})
    assert target.read_bytes() == before  # the old file, whole
    fresh = tmp_path / "other" / "u.safetensors"
    with pytest.raises(OSError, match="disk full"):
        io.write_tensors(fresh, {"a": torch.ones(1000)})
    assert not fresh.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.safetensors"]  # no temp file left
    assert list(fresh.parent.iterdir()) == []


# 7 -------------------------------------------------------------------------------------------------------------
def test_models_list_imports_neither_torch_nor_transformers():
    code = ("import sys; from typer.testing import CliRunner; from refusal.cli import app; "
            "r = CliRunner().invoke(app, ['models', 'list']); assert r.exit_code == 0, r.output; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


# 8 -------------------------------------------------------------------------------------------------------------
def test_no_past_key_values_deprecation_warning(tokenizer):
    import inspect

    from refusal.generation.static import StaticDecoder
    from refusal.scoring.engine import score_candidates
    from refusal.scoring.refusal import refusal_token_ids
    from refusal.templates import tokenize

    model = build_model("qwen2", len(tokenizer), n_layers=3)
    want = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert cache_kwarg(model) == want
    n_pos = len(post_instruction_ids(tokenizer))
    cands = extract(model, tokenizer, format_prompts(tokenizer, HARMFUL[:3]), format_prompts(tokenizer, HARMLESS[:3]),
                    n_pos)
    system = "Be brief."  # a shared prefix: its cache is built, then read by every bucket
    hv, bv = format_prompts(tokenizer, HARMFUL[:3], system), format_prompts(tokenizer, HARMLESS[:3], system)
    b = tokenize(tokenizer, hv, "cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        scores = score_candidates(model, tokenizer, cands, hv, bv, refusal_token_ids(tokenizer), min_prefix=1)
        tokens, _ = StaticDecoder(model, compile=False)(b.input_ids, b.attention_mask, 4,
                                                        torch.tensor([tokenizer.eos_token_id]),
                                                        tokenizer.pad_token_id)
    assert not scores.induce[:, 1:].isnan().any()
    assert tokens.shape == (3, 4)


def test_the_output_head_gets_the_last_position_contiguous(llama, tokenizer):
    """With ``logits_to_keep=1`` transformers hands the head a strided view of the last position, which cuBLAS
    multiplied 55x more slowly on an H200 (refusal.models.head): every path that asks for the last position's
    logits gives it a contiguous tensor, with the same logits and tokens."""
    from refusal.evaluation.judges.llm import generate_answers
    from refusal.generation.batched import generate
    from refusal.generation.session import ChatSession
    from refusal.generation.static import StaticDecoder
    from refusal.scoring.engine import last_logits
    from refusal.templates import tokenize

    seen = []
    head = llama.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    try:
        prompts = format_prompts(tokenizer, HARMFUL[:3])
        b = tokenize(tokenizer, prompts, "cpu")
        got = last_logits(llama, b.input_ids, b.attention_mask)
        want = llama(input_ids=b.input_ids, attention_mask=b.attention_mask,
                     position_ids=(b.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
        torch.testing.assert_close(got, want)
        texts = generate(llama, tokenizer, prompts, max_new_tokens=4, batch_size=3)  # model.generate
        eos = torch.tensor([], dtype=torch.long)
        StaticDecoder(llama, compile=False)(b.input_ids, b.attention_mask, 3, eos, 0)
        list(ChatSession(llama, tokenizer, {}, max_new_tokens=2).stream(prompts[0]))
        generate_answers(llama, tokenizer, prompts, max_new_tokens=2, batch_size=3)  # a judge model's answers
    finally:
        hook.remove()
    assert len(seen) >= 1 + 4 + 3 + 2 + 2 and all(seen), seen
    assert generate(llama, tokenizer, prompts, max_new_tokens=4, batch_size=3, static_cache=True) == texts
