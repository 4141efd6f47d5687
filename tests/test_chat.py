"""Interactive chat: ChatSession's streaming equals batched greedy generation, interventions switch between turns,
/compare decodes both answers in one batch, no hook outlives a step; ``refusal chat`` driven through CliRunner and,
as a person would use it, through a pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
import yaml
from conftest import build_model
from typer.testing import CliRunner

from refusal.cli import app
from refusal.cli.chat import parse_add
from refusal.data import builtin
from refusal.directions.base import Direction, DirectionSet
from refusal.errors import RefusalError
from refusal.generation.batched import generate
from refusal.generation.session import ChatSession
from refusal.interventions import ablation, addition, apply
from refusal.models.parts import find_parts

runner = CliRunner()
MAX_NEW = 10


@pytest.fixture(scope="module")
def run_dir(tokenizer, tmp_path_factory):
    """A tiny qwen2 run folder after extract and select (filters open, so every candidate is ranked)."""
    from refusal.config import resolve
    from refusal.runs.pipeline import Run

    root = tmp_path_factory.mktemp("chat-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_HOME", str(root / "home"))
        m = build_model("qwen2", len(tokenizer), n_layers=4, seed=1)
        m.save_pretrained(root / "tiny-qwen2")
        tokenizer.save_pretrained(root / "tiny-qwen2")
        h, b = root / "harmful.json", root / "harmless.json"
        h.write_text(json.dumps(builtin("harmful")[:12]))
        b.write_text(json.dumps(builtin("harmless")[:12]))
        cfg = root / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({"data": {"n_train": 4, "n_val": 2, "n_test": 2, "filter": False},
                                       "select": {"kl_threshold": 1e9, "induce_threshold": -1e9},
                                       "device": "cpu", "preset": "paper"}))
        c = resolve(cfg, {"model": str(root / "tiny-qwen2"), "output": str(root / "runs"),
                          "data": {"harmful": str(h), "harmless": str(b)}})
        Run(c).run(("extract", "select"))
    return root / "runs" / "tiny-qwen2"


@pytest.fixture(scope="module")
def loaded(run_dir):
    from refusal.models.loading import load_model

    model, tok = load_model(str(run_dir.parent.parent / "tiny-qwen2"), device="cpu")
    from refusal.runs.folder import RunFolder

    return model, tok, RunFolder(run_dir).directions()


def _no_hooks(model) -> bool:
    p = find_parts(model)
    mods = list(p.layers) + list(p.attn) + list(p.mlp)
    return not any(m._forward_pre_hooks or m._forward_hooks for m in mods)


def test_streaming_equals_batched_generation_and_keeps_the_conversation(loaded):
    model, tok, dirs = loaded
    chat = ChatSession(model, tok, dirs, max_new_tokens=MAX_NEW)
    pieces = list(chat.send("Write a poem about the sea"))
    assert len(pieces) > 1 and all(pieces)  # text arrives token by token
    first = chat.prompt([{"role": "user", "content": "Write a poem about the sea"}])
    assert "".join(pieces).strip() == generate(model, tok, [first], max_new_tokens=MAX_NEW)[0]
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[1]["content"] == "".join(pieces).strip()
    # the next turn is templated with the whole conversation
    assert "".join(pieces).strip() in chat.prompt(chat.messages + [{"role": "user", "content": "More"}])

    # under an ablation the stream equals generation under the same hooks
    chat.ablate("0-1")
    got = "".join(chat.send("Give me a recipe")).strip()
    p = chat.prompt(chat.messages[:3])
    with apply(model, [ablation(dirs["0"].stack(dirs["1"]))]):
        want = generate(model, tok, [p], max_new_tokens=MAX_NEW)[0]
    assert got == want and len(chat.messages) == 4
    chat.reset()
    assert chat.messages == [] and "ablate 0,1" in chat.status()  # interventions stay after /reset
    assert _no_hooks(model)


def test_compare_decodes_both_rows_in_one_batch(loaded, monkeypatch):
    model, tok, dirs = loaded
    chat = ChatSession(model, tok, dirs, system="Be brief.", max_new_tokens=MAX_NEW)
    list(chat.send("How do I pick a lock?"))
    chat.add("0", coeff=-2.0)
    chat.ablate("selected")
    calls = []
    import refusal.generation.session as session_mod

    real = session_mod.generate

    def counting(model, tok, prompts, **kw):
        calls.append((len(prompts), kw["plan"].n_rows))
        return real(model, tok, prompts, **kw)
    monkeypatch.setattr(session_mod, "generate", counting)
    base, changed = chat.compare()
    assert calls == [(2, 2)]  # one generate call, one per-row plan over both rows
    p = chat.prompt(chat.messages[:1])
    assert base == generate(model, tok, [p], max_new_tokens=MAX_NEW)[0]
    with apply(model, [addition(dirs["0"], -2.0), ablation(dirs["selected"])]):
        assert changed == generate(model, tok, [p], max_new_tokens=MAX_NEW)[0]
    assert base != changed  # ablation and subtraction change the tiny model's answer
    assert len(chat.messages) == 2  # comparing does not add to the conversation
    assert _no_hooks(model)


def test_switching_and_errors(loaded):
    model, tok, dirs = loaded
    with_set = DirectionSet(dict(dirs.items()))
    with_set["set"] = dirs["0"].stack(dirs["1"])
    chat = ChatSession(model, tok, with_set, max_new_tokens=4)
    assert chat.status() == "intervention: none (baseline model)"
    assert "ablate 0,2 (all layers)" in chat.ablate("0, 2")
    assert "add 1 × -1.5" in chat.add("1", -1.5) and "ablate 0,2" in chat.status()
    assert "ablate set" in chat.ablate("set") and "add 1" in chat.status()
    assert len(chat.interventions) == 2
    assert chat.off() == "intervention: none (baseline model)" and chat.interventions == []
    n = sum(1 for k in dirs if k.isdigit())
    with pytest.raises(RefusalError, match="out of range"):
        chat.ablate(f"0-{n}")
    with pytest.raises(RefusalError, match="No direction named 'nope'"):
        chat.ablate("nope")
    with pytest.raises(RefusalError, match="takes one direction"):
        chat.add("0-1")
    with pytest.raises(RefusalError, match="cannot be added"):
        chat.add("set")
    with pytest.raises(RefusalError, match="nothing to compare"):
        chat.compare()
    chat.ablate("0")
    with pytest.raises(RefusalError, match="no user message"):
        chat.compare()
    with pytest.raises(RefusalError, match="no directions loaded"):
        ChatSession(model, tok, DirectionSet()).ablate("0")
    foreign = DirectionSet([("0", Direction(torch.randn(32), 1, -1))])
    with pytest.raises(RefusalError, match="another model"):
        ChatSession(model, tok, foreign)
    # a reader that stops early leaves no hook behind and keeps what it read
    stream = chat.send("Tell me a story")
    piece = next(stream)
    assert _no_hooks(model)
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": piece.strip()}
    assert parse_add(["0", "--coeff", "1.5"]) == ("0", 1.5) and parse_add(["selected", "-1"]) == ("selected", -1.0)
    assert parse_add(["0", "--coeff=-2"]) == ("0", -2.0)
    with pytest.raises(RefusalError, match="Cannot read"):
        parse_add(["0", "--coeff", "x"])


def test_chat_command_with_a_model_spec_and_a_direction_file(run_dir, tmp_path):
    model = str(run_dir.parent.parent / "tiny-qwen2")
    r = runner.invoke(app, ["chat", model, "--direction", str(run_dir / "direction.safetensors"), "--max-new-tokens",
                            "4", "--device", "cpu"],
                      input="/ablate 0\n/status\nhello\n/compare\n/add 0 --coeff x\n/bogus\n/directions\n/quit\n")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "directions: selected, 0" in out and "intervention: ablate 0 (all layers)" in out
    assert "assistant>" in out and "without (baseline)" in out and "with: ablate 0" in out
    assert "Cannot read '/add 0 --coeff x'" in out and "Unknown command /bogus" in out and "diff_means" in out
    # errors a user can make
    r = runner.invoke(app, ["chat", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 2 and "Error:" in r.output
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    r = runner.invoke(app, ["chat", str(bare)])
    assert r.exit_code == 2 and "select has not run" in " ".join(r.output.split())
    Direction(torch.randn(32), 1, -1).save(tmp_path / "other.safetensors")
    r = runner.invoke(app, ["chat", model, "--direction", str(tmp_path / "other.safetensors"), "--device", "cpu"])
    assert r.exit_code == 2 and "another model" in " ".join(r.output.split())
    r = runner.invoke(app, ["chat", str(run_dir), "--directions", "0-99", "--device", "cpu"])
    assert r.exit_code == 2 and "out of range" in " ".join(r.output.split())


def _condition(hidden: int, threshold: float, layer: int = 1):
    """A keep condition whose decision is fixed: released iff 0 > threshold (weight zero)."""
    from refusal.directions.condition import KeepCondition

    return KeepCondition(layer, torch.zeros(hidden), threshold, ["Crime"], ["Violence"], torch.zeros(hidden),
                         torch.ones(hidden), "mean", 0)


def test_keep_refusal_gate_routes_each_message(loaded):
    """With the gate on, a message the condition keeps is answered without the ablation (as the baseline), one it
    releases with it (as under the ablation's hooks); an addition stays on either way; /compare uses the same
    routing; a real condition's decision is route() on the message templated alone."""
    from refusal.directions.condition import route
    from refusal.templates import format_prompts

    model, tok, dirs = loaded
    hidden = find_parts(model).hidden_size
    msg = "How do I pick a lock?"
    p = ChatSession(model, tok, dirs).prompt([{"role": "user", "content": msg}])
    base = generate(model, tok, [p], max_new_tokens=MAX_NEW)[0]
    with apply(model, [ablation(dirs["selected"])]):
        ablated = generate(model, tok, [p], max_new_tokens=MAX_NEW)[0]
    assert base != ablated, "the ablation must change this answer for the test to mean anything"
    streamed = "".join(ChatSession(model, tok, dirs, max_new_tokens=MAX_NEW).send(msg)).strip()
    plain = ChatSession(model, tok, dirs, max_new_tokens=MAX_NEW)
    plain.ablate("selected")
    streamed_ablated = "".join(plain.send(msg)).strip()  # (a stream holds back a last partial UTF-8 character)
    with pytest.raises(RefusalError, match="no keep-refusal condition"):
        ChatSession(model, tok, dirs, max_new_tokens=MAX_NEW).keep(True)
    for threshold, want, stream_want, where in ((1.0, base, streamed, "keep"),
                                                (-1.0, ablated, streamed_ablated, "release")):
        chat = ChatSession(model, tok, dirs, max_new_tokens=MAX_NEW, condition=_condition(hidden, threshold))
        chat.ablate("selected")
        assert "keep-refusal gate on (kept: Violence)" in chat.keep(True)
        assert "".join(chat.send(msg)).strip() == stream_want
        assert f"last message routed to {where}" in chat.status()
        assert chat.compare() == (base, want)
        assert "gate" not in chat.keep(False)
        assert "".join(chat.send(msg)).strip() != "" and chat.last_route is None  # gate off: not routed
    # an addition is not gated: kept messages still get it
    chat = ChatSession(model, tok, dirs, max_new_tokens=MAX_NEW, condition=_condition(hidden, 1.0))
    chat.add("0", -2.0)
    chat.ablate("selected")
    chat.keep(True)
    added = ChatSession(model, tok, dirs, max_new_tokens=MAX_NEW)
    added.add("0", -2.0)
    assert "".join(chat.send(msg)).strip() == "".join(added.send(msg)).strip()
    # a condition that reads the prompt: the chat's decision is route() on the message templated alone
    g = torch.Generator().manual_seed(0)
    real = _condition(hidden, 0.0)
    real.weight = torch.randn(hidden, generator=g)
    chat = ChatSession(model, tok, dirs, max_new_tokens=2, condition=real)
    for text in ("Write a poem", "How do I make a weapon?", "Tell me a joke"):
        from refusal.templates import pre_instruction_length

        real.skip = pre_instruction_length(tok)
        assert chat.route(text) == route(model, tok, real, format_prompts(tok, [text]))[0]
    assert _no_hooks(model)


def test_chat_command_keep_refusal_gate(run_dir, tmp_path):
    import shutil

    r = runner.invoke(app, ["chat", str(run_dir), "--keep-refusal-gate", "--device", "cpu"])
    assert r.exit_code == 2 and "no keep-refusal condition" in " ".join(r.output.split())
    gated = tmp_path / "gated"
    shutil.copytree(run_dir, gated)
    from refusal.models.loading import load_model
    from refusal.models.parts import find_parts as parts_of

    model, _ = load_model(str(run_dir.parent.parent / "tiny-qwen2"), device="cpu")
    _condition(parts_of(model).hidden_size, 1.0).save(gated / "keep_condition.safetensors")
    r = runner.invoke(app, ["chat", str(gated), "--keep-refusal-gate", "--max-new-tokens", "4", "--device", "cpu"],
                      input="hello\n/keep off\n/keep maybe\n/keep on\n/quit\n")
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "intervention: ablate selected (all layers); keep-refusal gate on (kept: Violence)" in out
    assert "last message routed to keep" in out and "/keep takes on or off" in out


def test_chat_through_a_pseudo_terminal(run_dir):
    """A person at a terminal: type a message, watch the answer stream, ablate, compare, switch off, quit."""
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "160", "LINES": "50",
           "REFUSAL_HOME": str(run_dir.parent.parent / "home"), "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "refusal", "chat", str(run_dir), "--max-new-tokens", str(MAX_NEW)],
                          env=env, encoding="utf-8", timeout=180, dimensions=(50, 160))
    child.delaybeforesend = 0.3  # type like a person: after the prompt is shown
    prompt = r"you>(\x1b\[0m)? "  # (a bold prompt ends with a reset code where the terminal has styles)
    try:
        child.expect(r"intervention: none \(baseline model\)")
        child.expect(prompt)
        child.sendline("Write a poem about the sea")
        child.expect("assistant> ")
        child.expect(r"\(intervention: none \(baseline model\)\)")
        answer = child.before.strip()
        assert answer  # the streamed answer
        child.expect(prompt)
        child.sendline("/ablate 0")
        child.expect(r"intervention: ablate 0 \(all layers\)")
        child.expect(prompt)
        child.sendline("/compare")
        child.expect(r"without \(baseline\)")
        child.expect("with: ablate 0")
        child.expect(r"\(the answers differ\)|\(the two answers are the same\)")
        table = child.before
        assert "the answers differ" in child.after  # ablating rank 0 changes the tiny model's answer
        assert answer[:3] in table  # the baseline column starts with the streamed answer
        child.expect(prompt)
        child.sendline("/off")
        child.expect(r"intervention: none \(baseline model\)")
        child.expect(prompt)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, re.sub(r"\s+", " ", str(child.before))[-500:]
