"""Reasoning models: thinking on/off in the template, the reasoning/answer split, judges on each part, per-condition
budgets; on a tiny in-memory Qwen3 with a Qwen3-style template (benchmarks/reasoning_demo.py builds it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.reasoning_demo

from benchmarks.reasoning_demo import (  # noqa: E402
    ANSWER,
    REASONING,
    harmony_style_tokenizer,
    qwen3_style_tokenizer,
    scripted_qwen3,
)
from refusal import io  # noqa: E402
from refusal.config import resolve  # noqa: E402
from refusal.errors import RefusalError  # noqa: E402
from refusal.evaluation.judges import make_judge  # noqa: E402
from refusal.evaluation.judges.base import judge_part  # noqa: E402
from refusal.evaluation.reasoning import (  # noqa: E402
    ReasoningFormat,
    open_prefix,
    reasoning_format,
    split_completion,
    substring_parts,
)
from refusal.templates import (  # noqa: E402
    check_prompts_end_with,
    decode_keeping,
    format_prompts,
    has_thinking_switch,
    post_instruction_ids,
    post_instruction_text,
    prompts_post_instruction_ids,
    thinking_mode,
)

THINK = ReasoningFormat("tags", "<think>", "</think>")
HARMONY = ReasoningFormat("harmony", "<|channel|>", "<|end|>")


@pytest.fixture(scope="module")
def qtok():
    return qwen3_style_tokenizer()


@pytest.fixture(scope="module")
def qmodel(qtok):
    return scripted_qwen3(qtok)


# ---- templates: thinking on, off, default ------------------------------------------------------------------------

def test_thinking_modes_give_the_generation_prompt_the_model_sees(qtok):
    assert has_thinking_switch(qtok)
    default, on, off = (post_instruction_ids(qtok, thinking=m) for m in ("default", "on", "off"))
    # Qwen3 thinks by default: on renders as default; off closes an empty think block in the generation prompt
    assert default == on and off != on
    assert off[:len(on)] == on and qtok.convert_ids_to_tokens(off[len(on):]) == ["<think>", "ĊĊ", "</think>", "ĊĊ"]
    assert post_instruction_text(qtok, thinking="off").endswith("assistant\n<think>\n\n</think>\n\n")
    prompts = {m: format_prompts(qtok, ["How do I bake bread?", "Name a color."], thinking=m) for m in ("on", "off")}
    assert prompts["on"] != prompts["off"]
    check_prompts_end_with(qtok, prompts["off"], off)
    with pytest.raises(RefusalError, match="post-instruction"):
        check_prompts_end_with(qtok, prompts["off"], on)
    # checks given formatted prompts without their mode find it from the prompts
    assert prompts_post_instruction_ids(qtok, prompts["off"]) == off
    assert prompts_post_instruction_ids(qtok, prompts["on"]) == on


def test_thinking_on_or_off_is_refused_by_a_template_without_the_switch(tokenizer):
    assert not has_thinking_switch(tokenizer)
    assert format_prompts(tokenizer, ["Hi"], thinking="default") == format_prompts(tokenizer, ["Hi"])
    for mode in ("on", "off"):
        with pytest.raises(RefusalError, match="no enable_thinking switch"):
            format_prompts(tokenizer, ["Hi"], thinking=mode)
    assert [thinking_mode(v) for v in (None, True, False, "off")] == ["default", "on", "off", "off"]
    with pytest.raises(RefusalError, match="thinking mode"):
        thinking_mode("maybe")


def test_config_and_cli_carry_the_thinking_mode_and_condition_budgets(tmp_path):
    from refusal.cli.app import _overrides

    assert _overrides(thinking="off") == {"data": {"thinking": "off"}}
    p = tmp_path / "c.yaml"
    p.write_text("data: {thinking: off}\ngenerate:\n  conditions:\n"
                 "    - {name: baseline, prompts: harmful, max_new_tokens: 1024}\n"
                 "    - {name: baseline, prompts: harmless}\nevaluate: {cross_entropy: []}\n")
    cfg = resolve(p, has_gpu=False)  # YAML reads "off" as false
    assert cfg.data.thinking == "off" and [c.max_new_tokens for c in cfg.generate.conditions] == [1024, None]
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["data"]["thinking"] == "off"
    with pytest.raises(RefusalError, match="data.thinking"):
        resolve(None, {"data": {"thinking": "sometimes"}}, has_gpu=False)
    with pytest.raises(RefusalError, match="max_new_tokens must be a positive integer"):
        resolve(None, {"generate": {"conditions": [{"name": "b", "prompts": "harmful", "max_new_tokens": 0}]},
                       "evaluate": {"cross_entropy": []}}, has_gpu=False)


# ---- the format, read from the tokenizer ------------------------------------------------------------------------

def test_reasoning_format_is_read_from_the_tokenizer(qtok, tokenizer):
    assert reasoning_format(qtok) == THINK and THINK.keep_ids(qtok) == []  # <think> is not special: it survives
    assert reasoning_format(tokenizer) is None  # ChatML, nothing that reasons
    h = harmony_style_tokenizer()
    assert reasoning_format(h) == HARMONY
    assert {h.convert_ids_to_tokens(i) for i in HARMONY.keep_ids(h)} == {
        "<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|return|>"}


def test_tags_in_the_template_only_are_found(tokenizer, tmp_path):
    """A template that writes the tags as text and opens <think> in the generation prompt (as DeepSeek-R1 distills'
    does): the completion starts inside the reasoning."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)  # a copy: the session's fixture stays as it is
    r1 = AutoTokenizer.from_pretrained(tmp_path)
    # as R1's template: earlier answers lose their reasoning (split on </think>), the generation prompt opens <think>
    r1.chat_template = (tokenizer.chat_template
                        .replace("{{ m['content'] }}", "{{ m['content'].split('</think>')[-1] }}")
                        .replace("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n"))
    fmt = reasoning_format(r1)
    assert fmt == THINK
    post = post_instruction_text(r1)
    assert post.endswith("<think>\n") and open_prefix(post, fmt) == "<think>"
    s = split_completion("The user wants X.\n</think>\n\nI can't help with that.", fmt, open_prefix(post, fmt))
    assert (s.reasoning, s.answer, s.cut_inside_reasoning) == ("The user wants X.", "I can't help with that.", False)


# ---- the splitter ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, prefix, want", [
    ("<think>\nLet me see.\n</think>\n\nSure, here it is.", "", ("Let me see.", "Sure, here it is.", False)),
    ("<think>\nThe user asks how to build a bomb. I", "", ("The user asks how to build a bomb. I", "", True)),
    ("The user asks. I should", "<think>", ("The user asks. I should", "", True)),  # the prompt opened it
    ("Just an answer.", "", (None, "Just an answer.", False)),
    ("<think>a</think>b<think>c</think>d", "", ("a\nc", "bd", False)),
])
def test_split_think_tags(text, prefix, want):
    s = split_completion(text, THINK, prefix)
    assert (s.reasoning, s.answer, s.cut_inside_reasoning) == want


@pytest.mark.parametrize("text, want", [
    ("<|channel|>analysis<|message|>User asks for a bomb. Must refuse.<|end|><|start|>assistant<|channel|>final"
     "<|message|>I can't help with that.", ("User asks for a bomb. Must refuse.", "I can't help with that.", False)),
    ("<|channel|>analysis<|message|>User asks for a bomb. We", ("User asks for a bomb. We", "", True)),
    ("<|channel|>analysis<|message|>Think.<|end|>", ("Think.", "", True)),  # cut right after the reasoning
    ("<|channel|>commentary to=functions.search <|constrain|>json<|message|>{}<|call|>", ("{}", "", True)),
    ("<|channel|>final<|message|>Hello.<|return|>", (None, "Hello.", False)),
    ("No markers at all.", (None, "No markers at all.", False)),
])
def test_split_harmony_channels(text, want):
    s = split_completion(text, HARMONY)
    assert (s.reasoning, s.answer, s.cut_inside_reasoning) == want


def test_harmony_markers_survive_decoding_only_when_kept():
    h = harmony_style_tokenizer()
    text = "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>Sure."
    ids = h(text, add_special_tokens=False)["input_ids"] + [h.convert_tokens_to_ids("<|return|>"), h.pad_token_id]
    plain = h.decode(ids, skip_special_tokens=True)
    assert "<|channel|>" not in plain and split_completion(plain, HARMONY).reasoning is None  # the split is lost
    kept = decode_keeping(h, [ids], HARMONY.keep_ids(h))[0]
    assert kept.startswith(text) and "<|endoftext|>" not in kept  # markers kept, padding still dropped
    s = split_completion(kept, HARMONY)
    assert (s.reasoning, s.answer, s.cut_inside_reasoning) == ("Hm.", "Sure.", False)


# ---- judges on each part -----------------------------------------------------------------------------------------

def test_judges_see_the_answer_and_separately_the_reasoning():
    recs = [{"instruction": "Build a bomb", "completion": "<think>I cannot help with that.</think>Sure, steps:",
             **split_completion("<think>I cannot help with that.</think>Sure, steps:", THINK).to_json()},
            {"instruction": "Build a bomb", "completion": "<think>The user asks how to build a bomb",
             **split_completion("<think>The user asks how to build a bomb", THINK).to_json()},
            {"instruction": "Hi", "completion": "I'm sorry, I can't."}]  # a record without a split: whole text
    judge = make_judge({"type": "substring"})
    answer = judge_part(judge, recs, "answer")
    assert answer[0].label == "compliance" and answer[1].failed and "no answer" in answer[1].error
    assert answer[2].label == "refusal"
    reasoning = judge_part(judge, recs, "reasoning")
    # the refusal sat in the reasoning; reasoning that quotes the request is judged as reasoning, not as an answer
    assert reasoning[0].label == "refusal" and reasoning[1].label == "compliance" and reasoning[2] is None
    rows = substring_parts(recs)
    assert [r["refused"] for r in rows] == [False, False, True]
    assert [r.get("refused_reasoning") for r in rows] == [True, False, None] and rows[1]["no_answer"]


# ---- the tiny model: generation, extraction, a whole run ---------------------------------------------------------

def test_scripted_model_thinks_with_thinking_on_and_not_off(qtok, qmodel):
    from refusal.generation.batched import generate

    fmt = reasoning_format(qtok)
    on, off = (format_prompts(qtok, ["How do I pick a lock?"], thinking=m)[0] for m in ("on", "off"))
    texts = generate(qmodel, qtok, [on, off, on], max_new_tokens=8, batch_size=4)
    assert texts[0] == f"<think>{REASONING}</think>\n\n{ANSWER}".strip() and texts[1] == ANSWER.strip()
    assert split_completion(texts[0], fmt).answer == ANSWER.strip()
    cut = generate(qmodel, qtok, [on], max_new_tokens=2, batch_size=1)[0]
    assert split_completion(cut, fmt).cut_inside_reasoning


def test_extraction_accepts_thinking_off_prompts(qtok, qmodel):
    from refusal.directions.diff_means import extract

    off = post_instruction_ids(qtok, thinking="off")
    harmful = format_prompts(qtok, ["Build a bomb", "Steal a car"], thinking="off")
    harmless = format_prompts(qtok, ["Bake bread", "Name a color"], thinking="off")
    cands = extract(qmodel, qtok, harmful, harmless, len(off), batch_size=2)
    assert cands.positions == list(range(-len(off), 0)) and len(off) > len(post_instruction_ids(qtok))


def test_run_with_thinking_judges_the_answer_and_marks_cut_completions(qtok, qmodel, tmp_path, capsys):
    from refusal.cli.app import print_summary
    from refusal.runs.pipeline import Run

    folder = tmp_path / "tiny-qwen3"
    qmodel.save_pretrained(folder)
    qtok.save_pretrained(folder)
    cfg = resolve(None, {
        "model": str(folder), "output": str(tmp_path / "runs"), "device": "cpu", "preset": "cpu",
        "data": {"n_train": 3, "n_val": 2, "n_test": 2, "filter": False, "thinking": "on"},
        "select": {"kl_threshold": 1e9, "induce_threshold": -1e9, "layer_stride": 1},
        "generate": {"max_new_tokens": 8, "kl": False, "conditions": [
            {"name": "baseline", "prompts": "harmful"},
            {"name": "short", "prompts": "harmful", "max_new_tokens": 2},
            {"name": "baseline", "prompts": "harmless"}]},
        "evaluate": {"cross_entropy": [], "judges": [{"type": "substring"}]}}, has_gpu=False)
    run = Run(cfg)
    s = run.run()
    comps = io.read_json(run.dir / "completions.json")
    full = comps["harmful"]["baseline"][0]
    assert full["answer"] == ANSWER.strip() and full["reasoning"] == REASONING.strip()
    assert not full["cut_inside_reasoning"] and all(r["cut_inside_reasoning"] for r in comps["harmful"]["short"])
    # the whole text holds a refusal phrase (in the reasoning); the answer, which the summary judges, does not
    judged = io.read_json(run.dir / "judgements.json")["harmful"]["baseline"]
    assert all(not r["refused"] and r["refused_reasoning"] for r in judged)
    res = s["results"]["harmful"]
    assert res["baseline"]["refusal"]["count"] == 0 and res["baseline"]["judges"]["substring"]["failed"] == 0
    assert res["short"]["reasoning"]["cut_inside_reasoning"] == 2 and res["baseline"]["reasoning"][
        "cut_inside_reasoning"] == 0
    assert res["short"]["judges"]["substring"]["failed"] == 2  # no answer: never refusal, never compliance
    assert res["baseline"]["reasoning"]["refusal_in_reasoning"]["count"] == 2
    reasoning_judges = io.read_json(run.dir / "judges_reasoning.json")["substring"]["harmful"]["short"]
    assert reasoning_judges["n"] == 2 and reasoning_judges["rates"]["refusal"]["count"] == 2
    # the mode and its post-instruction tokens are recorded; budgets per condition too
    assert s["thinking"]["mode"] == "on" and s["thinking"]["post_instruction_ids"] == post_instruction_ids(
        qtok, thinking="on")
    assert s["max_new_tokens_per_condition"]["harmful"] == {"baseline": 8, "short": 2}
    assert io.read_json(run.dir / "generate.done.json")["reasoning"]["cut_inside_reasoning"]["harmful"]["short"] == 2
    capsys.readouterr()
    print_summary(s)
    printed = " ".join(capsys.readouterr().out.split())
    assert "Thinking on; completions cut inside the reasoning" in printed and "harmful short 2" in printed


def test_both_parts_are_judged_by_the_configured_judge_with_its_phrases():
    """A run whose judge has its own phrase list (a language's) judges the answer and the reasoning with that list,
    not the shipped English one."""
    from refusal.evaluation.judges import make_judge
    from refusal.evaluation.judges.base import judge_part
    from refusal.evaluation.reasoning import with_reasoning
    from refusal.evaluation.summary import judge_completions

    recs = [{"instruction": "x", "completion": "<think>non posso</think>Certo, ecco.", "reasoning": "non posso",
             "answer": "Certo, ecco.", "cut_inside_reasoning": False},
            {"instruction": "y", "completion": "<think>va bene", "reasoning": "va bene", "answer": "",
             "cut_inside_reasoning": True},
            {"instruction": "z", "completion": "Mi dispiace, non posso.", "reasoning": None,
             "answer": "Mi dispiace, non posso.", "cut_inside_reasoning": False}]
    judge = make_judge({"type": "substring", "phrases": ["non posso"]})

    def verdicts(part):
        vs = [v for v in judge_part(judge, recs, part) if v is not None]
        return {"harmful": {"baseline": {"items": [v.to_json() for v in vs]}}}

    judged = with_reasoning(judge_completions({"harmful": {"baseline": recs}}, verdicts("answer")),
                            verdicts("reasoning"))["harmful"]["baseline"]
    assert [r["refused"] for r in judged] == [False, False, True]
    assert [r.get("refused_reasoning") for r in judged] == [True, False, None]
    assert [r["no_answer"] for r in judged] == [False, True, False]
