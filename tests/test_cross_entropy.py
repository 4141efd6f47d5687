"""Cross-entropy and perplexity: batched results equal a hand computation with torch's cross_entropy."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model

from refusal.errors import RefusalError
from refusal.evaluation.cross_entropy import cross_entropy, evaluate, prepare
from refusal.interventions.hooks import ablate
from refusal.templates import format_prompts

TEXT = ("The quick brown fox jumps over the lazy dog. Write a poem about the sea and the sky. "
        "Explain how photosynthesis works in plants. Give three tips for staying healthy. ") * 6

PAIRS = [
    {"instruction": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"instruction": "Give three tips for staying healthy.", "response": "Eat well, sleep enough and exercise."},
    {"instruction": "Write a haiku.", "response": "Sea and sky meet here"},
]


def _nll(model, ids: list[int], start: int) -> tuple[float, int]:
    """Summed NLL of tokens ids[start:] given what precedes them, one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return F.cross_entropy(logits[start - 1:-1], torch.tensor(ids[start:]), reduction="sum").item(), len(ids) - start


class _NoForward(torch.nn.Module):
    """A model that must not be run: errors in the data have to come first."""

    def forward(self, *a, **k):
        raise AssertionError("the model ran before the data was checked")


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "wiki.test.raw"
    p.write_text(TEXT, "utf-8")
    return p


def test_text_matches_hand_computation(model, tokenizer, text_file):
    res = cross_entropy(model, tokenizer, text_file, seq_len=16, max_tokens=100, batch_size=3)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:100]
    nll = n = 0
    for i in range(0, 100, 16):  # no BOS token: the first token of each sequence is context only
        a, b = _nll(model, ids[i:i + 16], 1)
        nll, n = nll + a, n + b
    assert res["tokens"] == n == 100 - 7
    assert res["sequences"] == 7
    assert res["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # the batch size changes nothing (right padding is masked out of the loss)
    assert cross_entropy(model, tokenizer, text_file, seq_len=16, max_tokens=100, batch_size=1)["loss"] == \
        pytest.approx(res["loss"], rel=1e-5)


def test_text_with_bos_scores_every_text_token(tokenizer, text_file):
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = "<|im_start|>"
    model = build_model("llama", len(tok), n_layers=2)
    res = cross_entropy(model, tok, str(text_file), mode="text", seq_len=11, max_tokens=50, batch_size=4)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:50]
    nll = 0.0
    for i in range(0, 50, 10):
        nll += _nll(model, [tok.bos_token_id] + ids[i:i + 10], 1)[0]
    assert (res["tokens"], res["sequences"]) == (50, 5)
    assert res["loss"] == pytest.approx(nll / 50, rel=1e-5)


def test_response_only_masking(model, tokenizer):
    res = cross_entropy(model, tokenizer, PAIRS, batch_size=2)
    prompts = format_prompts(tokenizer, [p["instruction"] for p in PAIRS])
    nll = n = 0
    for prompt, pair in zip(prompts, PAIRS):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(pair["response"], add_special_tokens=False)["input_ids"]
        a, b = _nll(model, p + r, len(p))
        nll, n = nll + a, n + b
    assert res["tokens"] == n == sum(len(tokenizer(p["response"], add_special_tokens=False)["input_ids"])
                                     for p in PAIRS)
    assert res["sequences"] == 3
    assert res["loss"] == pytest.approx(nll / n, rel=1e-5)
    # only response tokens count: a different prompt changes the loss but not the token count
    other = [{**p, "instruction": "Say something."} for p in PAIRS]
    res2 = cross_entropy(model, tokenizer, other, batch_size=2)
    assert res2["tokens"] == res["tokens"] and res2["loss"] != pytest.approx(res["loss"], rel=1e-6)


def test_own_completions_and_token_budget(tokenizer):
    model = build_model("qwen2", len(tokenizer), n_layers=2)
    recs = [{"instruction": p["instruction"], "completion": p["response"], "refusal_score": 0.1} for p in PAIRS]
    full = cross_entropy(model, tokenizer, recs, mode="completion")
    assert full == cross_entropy(model, tokenizer, [{"instruction": p["instruction"], "response": p["response"]}
                                                    for p in PAIRS])
    seqs = prepare(tokenizer, recs, mode="completion", max_tokens=10)
    assert seqs.tokens == 10
    with pytest.raises(RefusalError, match="fewer than the 1000"):
        prepare(tokenizer, recs, mode="completion", max_tokens=1000)
    assert prepare(tokenizer, recs, mode="completion", max_tokens=1000, allow_fewer=True).tokens == full["tokens"]
    # seq_len cuts long pairs: fewer response tokens, never a prompt token scored
    short = prepare(tokenizer, recs, mode="completion", seq_len=40)
    assert short.tokens < full["tokens"] and all(len(s) <= 40 for s in short.ids)


def test_truthfulqa_csv_and_column_mapping(tmp_path, tokenizer):
    p = tmp_path / "TruthfulQA.csv"
    with p.open("w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark, as the real file has
        w = csv.writer(f)
        w.writerow(["Question", "Type", "Category", "Best Answer", "Correct Answers", "Source"])
        for pair in PAIRS:
            w.writerow([pair["instruction"], "Adversarial", "Misc", pair["response"], "a; b", "https://x"])
    model = build_model("llama", len(tokenizer), n_layers=2)
    auto = cross_entropy(model, tokenizer, p)
    mapped = cross_entropy(model, tokenizer, str(p), mode="response",
                           columns={"instruction": "Question", "response": "Best Answer"})
    assert auto == mapped == cross_entropy(model, tokenizer, PAIRS)
    with pytest.raises(RefusalError) as e:  # a mapped column that is not there, before any forward
        cross_entropy(_NoForward(), tokenizer, p, columns={"response": "Answer"})
    assert "Best Answer" in str(e.value) and "Question" in str(e.value)


def test_json_and_jsonl_sources(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer), n_layers=2)
    (tmp_path / "a.json").write_text(json.dumps({"data": PAIRS}), "utf-8")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in PAIRS), "utf-8")
    ref = cross_entropy(model, tokenizer, PAIRS)
    assert cross_entropy(model, tokenizer, tmp_path / "a.json") == ref
    assert cross_entropy(model, tokenizer, tmp_path / "a.jsonl") == ref


def test_errors_come_before_model_work(tmp_path, tokenizer, text_file, monkeypatch):
    m = _NoForward()
    with pytest.raises(RefusalError, match="fewer than the 100000 asked for"):
        cross_entropy(m, tokenizer, text_file, max_tokens=100_000)
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Q?", "answer_text": "A."}), "utf-8")
    with pytest.raises(RefusalError) as e:
        cross_entropy(m, tokenizer, tmp_path / "q.jsonl")
    assert "no response column" in str(e.value) and "answer_text" in str(e.value) and "question" in str(e.value)
    with pytest.raises(RefusalError, match="does not exist"):
        cross_entropy(m, tokenizer, tmp_path / "missing.txt")
    with pytest.raises(RefusalError, match="Unknown cross-entropy mode"):
        cross_entropy(m, tokenizer, text_file, mode="pairs")
    with pytest.raises(RefusalError, match="is a text file"):
        cross_entropy(m, tokenizer, text_file, mode="response")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the optional package were not installed
    with pytest.raises(RefusalError, match="datasets"):
        cross_entropy(m, tokenizer, "hf:truthfulqa/truthful_qa:generation:validation")
    # allowing fewer tokens takes the whole text
    model = build_model("llama", len(tokenizer), n_layers=2)
    n = len(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    res = cross_entropy(model, tokenizer, text_file, seq_len=64, max_tokens=100_000, allow_fewer=True)
    assert res["tokens"] == n - res["sequences"]


def test_under_an_intervention(tokenizer, text_file):
    model = build_model("llama", len(tokenizer), n_layers=2)
    seqs = prepare(tokenizer, text_file, seq_len=20, max_tokens=60)
    base = evaluate(model, seqs, batch_size=2)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with ablate(model, direction):
        ablated = evaluate(model, seqs, batch_size=2)
        hand = sum(_nll(model, s, 1)[0] for s in seqs.ids) / seqs.tokens
    assert ablated["loss"] == pytest.approx(hand, rel=1e-5)
    assert ablated["loss"] != pytest.approx(base["loss"], rel=1e-4)
    assert evaluate(model, seqs, batch_size=2) == base  # hooks gone after the context
