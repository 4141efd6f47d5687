"""Judges: what ``evaluate.judges``, ``select.objective`` and ``evaluate.over_refusal.judge`` name. The options of
the built-in judges are defined here; :mod:`refusal.evaluation.judges` builds each judge from its spec."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..endpoints import check_env_name, check_url
from ..errors import RefusalError
from ..names import JUDGES, judge_type
from .checks import _matches, _type_names
from .defaults import JUDGE_MAX_NEW_TOKENS
from .schema import Spec, _hints, _required, help_of, non_negative, positive, setting

RUBRICS = ("refusal", "safety")  # the rubrics of the llm and openai judges (refusal.evaluation.judges.llm.RUBRICS)
GUARD_FORMATS = ("llama-guard", "wildguard")


def _phrases_ok(phrases: list) -> str | None:
    if not phrases or not all(isinstance(p, str) and p for p in phrases):
        return "must be a non-empty list of non-empty strings"
    return None


@dataclass(eq=False, kw_only=True)
class JudgeSpec(Spec):
    """A judge: ``type`` picks it, ``name`` labels its column in the reports (default: the judge's own name)."""

    type: str = setting("", "the judge type: substring, refusal_score, guard, llm or openai")
    name: str | None = setting(None, "its name in the reports; default: the judge's own")


@dataclass(eq=False, kw_only=True)
class SubstringJudgeConfig(JudgeSpec):
    """Refusal if the completion contains a refusal phrase (the paper's judge)."""

    type: str = setting("substring", "substring: a refusal phrase in the completion")
    phrases: list[str] | None = setting(None, "phrases that mark a refusal; default: the built-in list",
                                        check=_phrases_ok)


@dataclass(eq=False, kw_only=True)
class RefusalScoreJudgeConfig(JudgeSpec):
    """Refusal if the refusal-token score stored with each completion is above a threshold."""

    type: str = setting("refusal_score", "refusal_score: the refusal score stored with each completion")
    threshold: float = setting(0.0, "log-odds above which a completion counts as a refusal")
    field: str = setting("refusal_score", "the record field holding the score")


@dataclass(eq=False, kw_only=True)
class LocalJudgeConfig(JudgeSpec):
    """Options of a judge that runs a model here."""

    model: str = setting(help="path, hub id or catalog name of the judge model")
    batch_size: int = setting(16, "prompts per generation batch", check=positive)
    device: str | None = setting(None, "cuda, cpu, mps...; default: CUDA if present")
    dtype: str | None = setting(None, "auto, bfloat16, float16 or float32")
    trust_remote_code: bool = setting(False, "allow the judge model's own code to run (from its folder or the hub)")


@dataclass(eq=False, kw_only=True)
class LLMJudgeConfig(LocalJudgeConfig):
    """A local chat model asked a rubric question about each completion."""

    type: str = setting("llm", "llm: a local chat model with a rubric")
    rubric: str = setting("refusal", "refusal (refusal / compliance / partial) or safety (safe / unsafe)",
                          choices=RUBRICS)
    max_new_tokens: int = setting(JUDGE_MAX_NEW_TOKENS, "tokens of the judge's answer (a label)", check=positive)


@dataclass(eq=False, kw_only=True)
class GuardJudgeConfig(LocalJudgeConfig):
    """A guard classifier (Llama Guard, WildGuard) run locally."""

    type: str = setting("guard", "guard: Llama Guard or WildGuard, local")
    model: str = setting(help="path, hub id or catalog name of the guard model")
    format: str = setting("llama-guard", "the guard's prompt and answer format", choices=GUARD_FORMATS)
    label_from: str | None = setting(None, "WildGuard only: the answer that gives the label",
                                     choices=(None, "harmful_response", "response_refusal"))
    max_new_tokens: int | None = setting(None, "tokens of the guard's answer; default: 10 for llama-guard, 32 for "
                                               "wildguard", check=positive)
    batch_size: int = setting(8, "prompts per generation batch", check=positive)


@dataclass(eq=False, kw_only=True)
class OpenAIJudgeConfig(JudgeSpec):
    """A rubric judge behind an OpenAI-compatible endpoint (vLLM, llama.cpp's server, Ollama, a hosted API)."""

    type: str = setting("openai", "openai: an OpenAI-compatible endpoint with a rubric")
    url: str = setting(help="base URL of the server, e.g. http://localhost:8000/v1", check=check_url)
    model: str = setting(help="the model name the server knows")
    api_key_env: str | None = setting(None, "environment variable holding the API key (none: no Authorization "
                                            "header)", check=check_env_name, secret=True)
    rubric: str = setting("refusal", "refusal or safety", choices=RUBRICS)
    timeout: float = setting(60.0, "seconds per request", check=positive)
    retries: int = setting(3, "retries after the first attempt", check=non_negative)
    backoff: float = setting(1.0, "first retry delay in seconds, doubling", check=non_negative)
    concurrency: int = setting(4, "requests in flight", check=positive)
    max_tokens: int = setting(JUDGE_MAX_NEW_TOKENS, "tokens of the judge's answer (a label)", check=positive)


# type -> its schema (a judge registered from outside the package without one takes no options: JudgeSpec)
JUDGE_SCHEMAS: dict[str, type[JudgeSpec]] = {
    "substring": SubstringJudgeConfig, "refusal_score": RefusalScoreJudgeConfig, "guard": GuardJudgeConfig,
    "llm": LLMJudgeConfig, "openai": OpenAIJudgeConfig}
assert set(JUDGE_SCHEMAS) == set(JUDGES)


def register_judge(type_name: str, schema: type[JudgeSpec] | None = None) -> None:
    """Make ``{type: type_name}`` a known judge type, its specs checked against ``schema`` (default: no options;
    :func:`refusal.evaluation.judges.register` calls this)."""
    JUDGE_SCHEMAS[type_name] = schema if schema is not None else JudgeSpec


def judge_types() -> list[str]:
    return sorted(JUDGE_SCHEMAS)


def _judge_type(spec: Any) -> str:
    return judge_type(spec, judge_types())


def parse_judge(spec: Any, where: str = "") -> Any:
    """A judge spec checked against its type's schema (keys, types, choices, ranges; no model loaded, no request
    sent): a typed :class:`JudgeSpec` holding the keys given. A :class:`RefusalError` names the key and the fix."""
    if isinstance(spec, JudgeSpec):
        return spec
    key = _judge_type(spec)
    schema = JUDGE_SCHEMAS[key]
    type_name = str(spec["type"])
    flds = {f.name: f for f in dataclasses.fields(schema) if f.name not in ("type", "name")}
    allowed = {"type", "name", *flds}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise RefusalError(f"Unknown key(s) {', '.join(map(repr, unknown))} in the '{type_name}' judge spec.",
                           f"Allowed keys: {', '.join(sorted(allowed))}.")
    hints = _hints(schema)
    values: dict[str, Any] = {}
    for name, f in flds.items():
        if name not in spec:
            if _required(f):
                h = help_of(f)
                raise RefusalError(f"The '{type_name}' judge spec needs '{name}'{f' ({h})' if h else ''}.",
                                   f"Add \"{name}\" to the spec.")
            continue
        value = spec[name]
        if not _matches(value, hints[name]):
            raise RefusalError(f"'{name}' in the '{type_name}' judge spec is {value!r}; expected "
                               f"{_type_names(hints[name])}.", f"Fix '{name}' in the spec.")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise RefusalError(f"'{name}' in the '{type_name}' judge spec is {value!r}.",
                               f"Use one of: {', '.join(map(str, choices))}.")
        check = f.metadata.get("check")
        complaint = check(value) if check is not None and value is not None else None
        if complaint:
            raise RefusalError(f"'{name}' in the '{type_name}' judge spec is {value!r}: {complaint}.",
                               f"Fix '{name}' in the spec.")
        values[name] = value
    name = spec.get("name")
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise RefusalError(f"'name' in the '{type_name}' judge spec is {name!r}.", "Use a non-empty string.")
    return schema(type=type_name, name=name, **values).given(spec)


def _parse_judges(v: list, where: str) -> list:
    return [parse_judge(s, f"{where}[{i}]") for i, s in enumerate(v)]


def _default_judges() -> list:
    return [SubstringJudgeConfig(), RefusalScoreJudgeConfig()]
