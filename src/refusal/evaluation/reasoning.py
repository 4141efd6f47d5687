"""Completions of reasoning models, split into their reasoning and their final answer.

Two formats, both read from the tokenizer (its vocabulary, added tokens and chat template), not from a list of
models:

- **tags**: the reasoning sits between an opening and a closing tag, ``<think>...</think>`` (Qwen3, DeepSeek-R1 and
  its distills, SmolLM3, ...). The tag names looked for are reasoning words (``think``, ``thinking``, ``reasoning``,
  ``thought``); a pair counts when both tags are added tokens of the tokenizer or strings of its chat template.
- **harmony** (gpt-oss): messages ``<|channel|>NAME<|message|>TEXT<|end|>``, each after ``<|start|>ROLE``; the
  ``final`` channel is the answer, every other channel (``analysis``, ``commentary``) is reasoning.

A completion is cut inside its reasoning when the reasoning never closes (no ``</think>``; no ``final`` message):
the generation budget ran out before the answer, so there is no answer to judge.

Decoding drops special tokens; harmony's markers are special tokens, Qwen3's ``<think>`` is not (an added token
that survives). :meth:`ReasoningFormat.keep_ids` names the marker tokens that decoding must keep, and generation
keeps them (``refusal.generation.batched.generate(keep_special=...)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REASONING_TAGS = ("think", "thinking", "reasoning", "thought")
HARMONY = {"channel": "<|channel|>", "message": "<|message|>", "end": "<|end|>", "start": "<|start|>"}
HARMONY_STOPS = ("<|end|>", "<|return|>", "<|call|>")
ANSWER_CHANNEL = "final"


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model marks its reasoning: ``kind`` ``"tags"`` (``open`` ... ``close``) or ``"harmony"``."""

    kind: str
    open: str
    close: str

    @property
    def markers(self) -> tuple[str, ...]:
        if self.kind == "harmony":
            return (*HARMONY.values(), *HARMONY_STOPS[1:])
        return (self.open, self.close)

    def keep_ids(self, tokenizer: Any) -> list[int]:
        """Ids of this format's markers that are special tokens (plain decoding would drop them)."""
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if t.special}
        ids = {m: tokenizer.convert_tokens_to_ids(m) for m in self.markers}  # an unknown marker maps to <unk>
        return sorted({i for m, i in ids.items() if isinstance(i, int) and i in special
                       and tokenizer.convert_ids_to_tokens(i) == m})

    def to_json(self) -> dict:
        return {"kind": self.kind, "open": self.open, "close": self.close}


def _known_strings(tokenizer: Any) -> tuple[set[str], str]:
    """The tokenizer's added and special tokens (not its whole BPE vocabulary, where a merged ``<think>`` can be a
    piece of web text), and its chat template's text."""
    vocab = {t.content for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    vocab |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    tpl = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(tpl, dict):
        tpl = "\n".join(v for v in tpl.values() if isinstance(v, str))
    return vocab, tpl


def reasoning_format(tokenizer: Any) -> ReasoningFormat | None:
    """The tokenizer's reasoning format, or ``None`` when it marks no reasoning."""
    vocab, tpl = _known_strings(tokenizer)
    if HARMONY["channel"] in vocab and HARMONY["message"] in vocab:
        return ReasoningFormat("harmony", HARMONY["channel"], HARMONY["end"])
    for tag in REASONING_TAGS:
        o, c = f"<{tag}>", f"</{tag}>"
        if (o in vocab and c in vocab) or (o in tpl and c in tpl):
            return ReasoningFormat("tags", o, c)
    return None


def open_prefix(post_text: str, fmt: ReasoningFormat | None) -> str:
    """The part of a generation prompt's end (the post-instruction text) that opens a reasoning block the prompt
    leaves open, so the completion starts inside the reasoning (a template that ends with ``<think>\\n``); ``""``
    when the prompt leaves none open (Qwen3 with thinking off ends with a closed ``<think></think>``)."""
    if fmt is None:
        return ""
    if fmt.kind == "tags":
        i, j = post_text.rfind(fmt.open), post_text.rfind(fmt.close)
        return fmt.open if i >= 0 and i > j else ""
    tail = post_text.rpartition(HARMONY["start"])[2]
    if HARMONY["channel"] in tail and HARMONY["message"] in tail and not any(s in tail for s in HARMONY_STOPS):
        return tail[tail.index(HARMONY["channel"]):]
    return ""


@dataclass(frozen=True)
class Split:
    """A completion's ``reasoning`` (``None``: none) and final ``answer``; ``cut_inside_reasoning``: the reasoning
    never closed, so there is no answer (the budget ran out first)."""

    reasoning: str | None
    answer: str
    cut_inside_reasoning: bool = False

    def to_json(self) -> dict:
        return {"reasoning": self.reasoning, "answer": self.answer, "cut_inside_reasoning": self.cut_inside_reasoning}


def split_completion(text: str, fmt: ReasoningFormat | None, prefix: str = "") -> Split:
    """Split ``text`` (decoded with the format's markers kept) into reasoning and answer. ``prefix``: what the
    prompt left open (:func:`open_prefix`), read as if it began the completion."""
    if fmt is None:
        return Split(None, text.strip())
    if fmt.kind == "harmony":
        return _split_harmony(prefix + text)
    return _split_tags(prefix + text, fmt.open, fmt.close)


def _split_tags(text: str, open_: str, close: str) -> Split:
    if open_ not in text and close in text:  # the block was opened where we did not see it (the prompt)
        text = open_ + text
    answer, reasoning, rest, cut = [], [], text, False
    while True:
        i = rest.find(open_)
        if i < 0:
            answer.append(rest)
            break
        answer.append(rest[:i])
        rest = rest[i + len(open_):]
        j = rest.find(close)
        if j < 0:
            reasoning.append(rest)
            cut = True
            break
        reasoning.append(rest[:j])
        rest = rest[j + len(close):]
    if not reasoning:
        return Split(None, text.strip())
    return Split("\n".join(r.strip() for r in reasoning).strip(), "".join(answer).strip(), cut)


def _split_harmony(text: str) -> Split:
    ch, msg, start = HARMONY["channel"], HARMONY["message"], HARMONY["start"]
    if ch not in text:
        return Split(None, text.strip())
    answer: list[str] = []
    reasoning: list[str] = []
    has_final = False
    for seg in text.split(start):
        if ch not in seg:
            if seg.strip() and not reasoning and not answer:  # text before any message: part of the answer
                answer.append(seg)
            continue
        header, _, body = seg[seg.index(ch) + len(ch):].partition(msg)
        for s in HARMONY_STOPS:
            body = body.split(s)[0]
        name = header.split()[0].split("<")[0] if header.split() else ""
        has_final |= name == ANSWER_CHANNEL
        (answer if name == ANSWER_CHANNEL else reasoning).append(body)
    if not reasoning:
        return Split(None, "".join(answer).strip())
    return Split("\n".join(r.strip() for r in reasoning).strip(), "".join(answer).strip(), not has_final)


# ---- the parts of split records, for judges ----------------------------------------------------------------------

PARTS = ("answer", "reasoning")


def has_split(record: Mapping) -> bool:
    """Whether a completion record carries a split (generate writes ``answer`` and ``reasoning`` for reasoning
    models)."""
    return "answer" in record


def part_text(record: Mapping, part: str) -> str | None:
    """The text a judge of ``part`` sees: the final answer (the whole completion for records without a split;
    ``None`` when cut inside the reasoning, so no answer exists), or the reasoning (``None`` when there is none)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")
    if not has_split(record):
        return record.get("completion") if part == "answer" else None
    if part == "answer":
        return None if record.get("cut_inside_reasoning") else record["answer"]
    return record.get("reasoning")


def with_reasoning(judged: Mapping[str, Mapping[str, Sequence[Mapping]]],
                   reasoning_verdicts: Mapping[str, Mapping[str, Mapping]]) -> dict:
    """Records judged on their answer (``refused``, from a configured judge's verdicts) with what
    :func:`substring_parts` adds, from the same judge's verdicts on the reasoning (``judges_reasoning.json``'s entry,
    whose items follow the records that have reasoning): ``refused_reasoning`` and ``no_answer``. So the judge a run
    configured, with its phrase list, judges both parts, once."""
    out: dict = {}
    for kind, conds in judged.items():
        for cond, recs in conds.items():
            items = iter(reasoning_verdicts.get(kind, {}).get(cond, {}).get("items", []))
            rows = []
            for r in recs:
                row = dict(r)
                if has_split(r):
                    reasoning = part_text(r, "reasoning")
                    row["refused_reasoning"] = None if reasoning is None else next(items)["label"] == "refusal"
                    row["no_answer"] = part_text(r, "answer") is None
                rows.append(row)
            if next(items, None) is not None:
                raise ValueError(f"more reasoning verdicts than completions with reasoning in {kind}/{cond}")
            out.setdefault(kind, {})[cond] = rows
    return out


def substring_parts(records: Sequence[Mapping]) -> list[dict]:
    """The paper's substring judgement of each record's answer (``refused``) and, for records with reasoning, of
    the reasoning (``refused_reasoning``). A record cut inside its reasoning has no answer: ``refused`` is false and
    ``no_answer`` true."""
    from .substring import is_refusal, refusal_phrases

    phrases = refusal_phrases()
    out = []
    for r in records:
        answer, reasoning = part_text(r, "answer"), part_text(r, "reasoning")
        row = {**r, "refused": answer is not None and is_refusal(answer, phrases)}
        if has_split(r):
            row["refused_reasoning"] = None if reasoning is None else is_refusal(reasoning, phrases)
            row["no_answer"] = answer is None
        out.append(row)
    return out
