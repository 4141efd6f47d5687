"""Chat templates and post-instruction positions, derived from the tokenizer.

The post-instruction tokens are the ones a chat template puts between the end of the user's instruction and the
start of the model's answer (for ChatML: ``<|im_end|>\\n<|im_start|>assistant\\n``). They are found by templating
a sentinel instruction and reading what follows it, so no table of model families is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch

from .errors import RefusalError

_SENTINEL = "Zq7 sentinel instruction Xw9"

@lru_cache(maxsize=1)
def builtin_phrases() -> dict:
    return json.loads(resources.files("refusal").joinpath("data/builtin/refusal_phrases.json").read_text("utf-8"))


THINKING = ("default", "on", "off")


def thinking_mode(value) -> str:
    """``"default"``, ``"on"`` or ``"off"`` from a config value (YAML reads ``on``/``off`` as booleans; ``None`` is
    the default)."""
    mode = {None: "default", True: "on", False: "off"}[value] if value is None or isinstance(value, bool) else value
    if not isinstance(mode, str) or mode not in THINKING:
        raise RefusalError(f"The thinking mode must be one of {', '.join(THINKING)} (got {value!r}).",
                           "default: the template's own choice; on / off: enable_thinking=True / False.")
    return mode


def template_variables(tokenizer) -> set[str]:
    """The variables the chat template reads from its caller (``enable_thinking``, ``reasoning_effort``, ...)."""
    import jinja2
    from jinja2 import meta

    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # several named templates: the default one
        tpl = tpl.get("default", next(iter(tpl.values()), None))
    if not isinstance(tpl, str):
        return set()
    try:
        return set(meta.find_undeclared_variables(jinja2.Environment().parse(tpl)))
    except jinja2.TemplateError:  # transformers' own environment has extensions; the rendered check still decides
        return {"enable_thinking"} if "enable_thinking" in tpl else set()


def _render(tokenizer, instruction: str, system: str | None, kwargs: dict) -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)


def has_thinking_switch(tokenizer) -> bool:
    """Whether the chat template reads ``enable_thinking`` and renders differently with it on and off (Qwen3,
    SmolLM3 and others; read from the template, not from a list of models)."""
    if not getattr(tokenizer, "chat_template", None) or "enable_thinking" not in template_variables(tokenizer):
        return False
    on = _render(tokenizer, _SENTINEL, None, {"enable_thinking": True})
    return on != _render(tokenizer, _SENTINEL, None, {"enable_thinking": False})


def thinking_kwargs(tokenizer, thinking="default") -> dict:
    """What :func:`format_prompts` passes to ``apply_chat_template`` for a thinking mode: nothing for ``default``,
    ``enable_thinking=True/False`` for ``on``/``off`` (a clear error when the template has no such switch)."""
    mode = thinking_mode(thinking)
    if mode == "default":
        return {}
    if not has_thinking_switch(tokenizer):
        raise RefusalError(
            f"Thinking '{mode}' was asked for, but this model's chat template has no enable_thinking switch (it "
            "renders the same prompt with enable_thinking on and off).",
            "Use thinking: default (--thinking default) for this model.",
        )
    return {"enable_thinking": mode == "on"}


def format_prompts(tokenizer, instructions: list[str], system: str | None = None,
                   thinking: str | bool | None = "default") -> list[str]:
    """Apply the tokenizer's own chat template, ending with the generation prompt.

    ``thinking``: ``"default"`` renders the template as it is; ``"on"``/``"off"`` pass ``enable_thinking=True/False``
    (templates that have that switch, e.g. Qwen3's; others are refused with a clear error), so the prompts end with
    the generation prompt the model sees in that mode."""
    if not getattr(tokenizer, "chat_template", None):
        raise RefusalError(
            f"The tokenizer of this model ({type(tokenizer).__name__}) has no chat template, so it is not a "
            "chat model.",
            "Use an instruction-tuned model, or set a chat template on the tokenizer before calling refusal.",
        )
    kwargs = thinking_kwargs(tokenizer, thinking)
    return [_render(tokenizer, ins, system, kwargs) for ins in instructions]


def post_instruction_text(tokenizer, system: str | None = None, thinking: str | bool | None = "default") -> str:
    """The text the template places after every instruction in the given thinking mode (its generation prompt)."""
    text = format_prompts(tokenizer, [_SENTINEL], system, thinking)[0]
    return text[text.rindex(_SENTINEL) + len(_SENTINEL):]


def post_instruction_ids(tokenizer, system: str | None = None, thinking: str | bool | None = "default") -> list[int]:
    """Token ids the template places after every instruction (the end-of-instruction positions), in the given
    thinking mode (with thinking off, Qwen3's generation prompt also carries an empty ``<think></think>`` block)."""
    text = format_prompts(tokenizer, [_SENTINEL], system, thinking)[0]
    suffix = text[text.rindex(_SENTINEL) + len(_SENTINEL):]
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if not ids or full[-len(ids):] != ids:
        # the suffix tokenizes differently on its own: count the tokens that start after the sentinel instead
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start = text.rindex(_SENTINEL) + len(_SENTINEL)
        ids = [i for i, (s, _) in zip(enc["input_ids"], enc["offset_mapping"]) if s >= start]
    if not ids:
        raise RefusalError(
            "The chat template adds no tokens after the instruction, so there are no post-instruction positions.",
            "Use a chat model whose template marks the start of the assistant's turn.",
        )
    return ids


def pre_instruction_length(tokenizer, system: str | None = None, thinking: str | bool | None = "default") -> int:
    """How many tokens the template places before every instruction (system prompt, role markers): the tokens of a
    templated prompt that end before the instruction starts. Their activations are the same for every prompt (the
    attention is causal), so a summary of *the prompt* skips them."""
    text = format_prompts(tokenizer, [_SENTINEL], system, thinking)[0]
    start = text.index(_SENTINEL)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return sum(1 for _, end in enc["offset_mapping"] if end <= start)
    except (NotImplementedError, TypeError, KeyError):  # a slow tokenizer has no offsets: the prefix on its own
        return len(tokenizer(text[:start], add_special_tokens=False)["input_ids"])


def prompts_post_instruction_ids(tokenizer, prompts: list[str], system: str | None = None) -> list[int]:
    """The post-instruction ids of the thinking mode the prompts were formatted in: the default mode's, or, when the
    first prompt ends with another mode's (``enable_thinking`` on or off), that one's. For checks that receive
    formatted prompts without their mode (:func:`check_prompts_end_with` then checks every prompt)."""
    default = post_instruction_ids(tokenizer, system)
    if not prompts or not has_thinking_switch(tokenizer):
        return default
    first = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    for ids in [default] + [post_instruction_ids(tokenizer, system, m) for m in ("on", "off")]:
        if list(first[-len(ids):]) == ids:
            return ids
    return default


def decode_keeping(tokenizer, sequences, keep_ids=()) -> list[str]:
    """``batch_decode(sequences, skip_special_tokens=True)``, except that the special tokens in ``keep_ids`` stay in
    the text (reasoning markers such as harmony's ``<|channel|>``, which plain decoding drops)."""
    keep = {int(i) for i in keep_ids}
    if not keep:
        return tokenizer.batch_decode(sequences, skip_special_tokens=True)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if t.special}
    drop = special - keep
    rows = [[int(t) for t in row if int(t) not in drop] for row in sequences]
    return tokenizer.batch_decode(rows, skip_special_tokens=False)


def check_prompts_end_with(tokenizer, prompts: list[str], post_ids: list[int], what: str = "prompt") -> None:
    """Raise a :class:`RefusalError` naming the first prompt (``what`` and its index, e.g. "harmful prompt 3")
    whose tokens do not end with ``post_ids``.

    The post-instruction positions are the last ``len(post_ids)`` tokens of every prompt; that holds only if each
    prompt ends with the template's post-instruction tokens. It fails when an instruction itself ends with template
    tokens (which then merge differently), or when the tokenizer truncates prompts (``model_max_length``). All
    prompts are tokenized in one batched call, as :func:`tokenize` does."""
    post_ids = list(post_ids)
    n = len(post_ids)
    if not prompts or not n:
        return
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for i, row in enumerate(ids):
        if list(row[-n:]) != post_ids:
            preview = prompts[i] if len(prompts[i]) <= 120 else "..." + prompts[i][-117:]
            raise RefusalError(
                f"{what[:1].upper()}{what[1:]} {i} does not end with the chat template's post-instruction tokens "
                f"{post_ids} after tokenization (it ends with {list(row[-n:])}; prompt: {preview!r}), so its "
                "post-instruction positions would be wrong.",
                "Apply the chat template to every instruction (format_prompts), remove chat-template tokens from the "
                "end of that instruction, and make sure the tokenizer does not truncate prompts (raise its "
                "model_max_length or shorten the instruction).",
            )


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def tokenize(tokenizer, prompts: list[str], device, multiple_of: int = 8) -> Batch:
    """Left-padded batch of already-templated prompts (the template supplies any BOS token).

    The width is rounded up to a multiple of ``multiple_of``: GPU attention kernels want aligned mask widths and
    fall back to slower ones without (the extra columns are padding, masked out)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    extra = -ids.shape[1] % multiple_of
    if extra:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.cat([ids.new_full((len(ids), extra), pad), ids], 1)
        mask = torch.cat([mask.new_zeros((len(mask), extra)), mask], 1)
    return Batch(ids.to(device), mask.to(device))


