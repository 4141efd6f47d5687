"""The one typed configuration of a run: defaults, then a preset, then a YAML file, then CLI flags.

Every setting is a field of a dataclass below, declared with :func:`setting`: its default, a description (the
field's ``metadata["help"]``) and, where it has them, its allowed values and range. The schema is the one place
defaults are written: :func:`resolve` checks every value against it before anything runs (a wrong type, value or key
is a :class:`RefusalError` naming the setting), and ``refusal config`` prints it as commented YAML
(:func:`documented_yaml`). Sections written as a mapping of options (a judge, a cross-entropy source, the benchmarks,
the over-refusal check) are :class:`Spec` s: typed fields read as attributes, and, as a mapping, exactly the keys
that were given, which is what ``config.yaml`` keeps and what the stage digests cover.

The resolved config is saved with every run (``config.yaml``); each stage's digest covers the sections it reads
(:data:`STAGE_KEYS`, :func:`stage_config`), less the settings that do not change results (batch sizes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .endpoints import check_env_name, check_url
from .errors import RefusalError
from .names import JUDGES, check_scope, judge_type

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"

# ---- one generation budget per purpose (tokens) -----------------------------------------------------------------
GENERATE_MAX_NEW_TOKENS = 256  # generate.max_new_tokens: the test completions of every condition
SELECT_JUDGE_MAX_NEW_TOKENS = 32  # select.judge_max_new_tokens: completions judged by a judge objective
OVER_REFUSAL_MAX_NEW_TOKENS = 64  # evaluate.over_refusal.max_new_tokens: completions of the contrast prompts
JUDGE_MAX_NEW_TOKENS = 8  # an llm judge's answer (max_new_tokens) and an openai judge's (max_tokens): one label
CHAT_MAX_NEW_TOKENS = 256  # `refusal chat`: most tokens per answer

# ---- batch sizes chosen from the device when not set: (on a GPU, on a CPU) ---------------------------------------
EXTRACT_BATCH = (64, 16)  # sequences per forward when reading activations
GENERATE_BATCH = (512, 64)  # sequences decoded together (every condition's rows share batches)
CROSS_ENTROPY_BATCH = (32, 8)  # every position's logits are kept: smaller than the others
SCORE_BATCH_FACTOR = 64  # on a GPU, a scoring forward (last position only) takes this many times extract's batch


# ----------------------------------------------------------------------------------------------------------------
# The schema's building blocks


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            choices: tuple | None = None, check: Callable[[Any], str | None] | None = None, digest: bool = True,
            parse: Callable[[Any, str], Any] | None = None, secret: bool = False) -> Any:
    """A documented config field. ``choices``: the allowed values; ``check``: returns a complaint (``"must be at
    least 1"``) or None; ``digest=False``: a setting that does not change results (left out of the stage digests,
    and out of ``config.yaml`` while unset); ``parse``: builds the typed value from what YAML gave (after the type
    check); ``secret``: a complaint never echoes the value."""
    meta = {"help": help, "choices": choices, "check": check, "digest": digest, "parse": parse, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v >= low else f"must be at least {low}"
    return check


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def fraction(*, closed_high: bool) -> Callable[[Any], str | None]:
    """In (0, 1] (``closed_high``) or (0, 1)."""
    def check(v: Any) -> str | None:
        ok = 0 < v <= 1 if closed_high else 0 < v < 1
        return None if ok else f"must be in (0, 1{']' if closed_high else ')'}"
    return check


def help_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def _required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


S = TypeVar("S", bound="Spec")


class Spec(Mapping[str, Any]):
    """A section written as a mapping of options. Its fields are typed and read as attributes (an option not
    given reads as its default in the schema); as a mapping it holds exactly the options that were given, which is
    what is saved and digested, so a run's digest does not depend on defaults it never named. A ``Spec`` made in
    Python holds, as given, its required fields and every field that differs from its default."""

    _given: tuple[str, ...]

    def __post_init__(self) -> None:
        given = [f.name for f in dataclasses.fields(self)  # type: ignore[arg-type]
                 if _required(f) or getattr(self, f.name) != _default(f) or f.name == "type"]
        object.__setattr__(self, "_given", tuple(given))

    def given(self: S, keys: typing.Iterable[str]) -> S:
        """This spec, holding ``keys`` as given (the keys a YAML mapping had)."""
        object.__setattr__(self, "_given", tuple(k for k in (f.name for f in dataclasses.fields(self))  # type: ignore
                                                 if k in set(keys) or k == "type"))
        return self

    def __getitem__(self, key: str) -> Any:
        if key not in self._given:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._given)

    def __len__(self) -> int:
        return len(self._given)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"

    def options(self) -> dict[str, Any]:
        """Every option (given or default) but ``type`` and ``name``: what builds the thing the spec names."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name not in ("type", "name")}


# ----------------------------------------------------------------------------------------------------------------
# Judges: what ``evaluate.judges``, ``select.objective`` and ``evaluate.over_refusal.judge`` name. The options of
# the built-in judges are defined here; :mod:`refusal.evaluation.judges` builds each judge from its spec.

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


def _type_names(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_names(a) for a in args)
    if t is type(None):
        return "null"
    return getattr(origin or t, "__name__", str(t))


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


# ----------------------------------------------------------------------------------------------------------------
# Evaluation's option sections


@dataclass(eq=False, kw_only=True)
class CrossEntropySource(Spec):
    """A source of text for cross-entropy under every condition's interventions."""

    name: str = setting(help="its name in the reports")
    source: str = setting(help="completions (the run's baseline completions to the harmless test prompts: offline, "
                               "nothing else needed), a file (.txt, .json, .jsonl, .csv, .parquet) or hf:ORG/NAME")
    mode: str | None = setting(None, "text, response or completion; default: text for a text file, else response "
                                     "if the records have a response column, else completion")
    max_tokens: int | None = setting(None, "stop reading the source after this many tokens; default: all of it",
                                     check=positive)
    seq_len: int = setting(512, "tokens per sequence (text mode)", check=positive)
    columns: dict[str, str] | None = setting(None, "which columns hold the instruction and the response, e.g. "
                                                   "{instruction: Question, response: Best Answer}")
    allow_fewer: bool = setting(True, "accept a source with fewer tokens than max_tokens")


_CE_KEYS = ("name", "source", "mode", "max_tokens", "seq_len", "columns", "allow_fewer")


def _parse_cross_entropy(v: list, where: str) -> list:
    out = []
    for i, ce in enumerate(v):
        if isinstance(ce, CrossEntropySource):
            out.append(ce)
            continue
        if not isinstance(ce, Mapping) or not {"name", "source"} <= set(ce) or set(ce) - set(_CE_KEYS):
            raise RefusalError(f"evaluate.cross_entropy[{i}] must be a mapping with name and source (and optionally "
                               f"mode, max_tokens, seq_len, columns, allow_fewer); got {ce}.",
                               "e.g. {name: wikitext, source: path/to/wiki.test.raw, max_tokens: 20000}.")
        _check_fields(dict(ce), CrossEntropySource, f"{where}[{i}].")
        out.append(CrossEntropySource(**ce).given(ce))
    return out


def _default_ce() -> list:
    return [CrossEntropySource(name="own_completions", source="completions")]


@dataclass(eq=False, kw_only=True)
class BenchmarksConfig(Spec):
    """lm-eval coherence benchmarks under every condition; off while empty."""

    tasks: list[str] = setting(help="lm-eval task names, e.g. [refusal_mmlu, refusal_arc_challenge]",
                               factory=list)
    limit: int | None = setting(None, "questions per task; default: all", check=positive)
    data_dir: str | None = setting(None, "a folder with the tasks' data (offline); default: the hub")
    num_fewshot: int | None = setting(None, "few-shot examples per question; default: the task's", check=non_negative)
    batch_size: int = setting(8, "sequences per lm-eval forward", check=positive)


def _parse_benchmarks(b: Any, where: str) -> BenchmarksConfig:
    if isinstance(b, BenchmarksConfig):
        return b
    keys = [f.name for f in dataclasses.fields(BenchmarksConfig)]
    if b and (not isinstance(b, Mapping) or not b.get("tasks") or set(b) - set(keys)):
        raise RefusalError(f"evaluate.benchmarks must be {{tasks: [...], limit?, data_dir?, num_fewshot?, "
                           f"batch_size?}}; got {b}.",
                           "e.g. {tasks: [refusal_mmlu, refusal_arc_challenge], limit: 100, data_dir: DIR}.")
    _check_fields(dict(b or {}), BenchmarksConfig, f"{where}.")
    return BenchmarksConfig(**(b or {})).given(b or {})


@dataclass(eq=False, kw_only=True)
class OverRefusalConfig(Spec):
    """Over-refusal on a contrast set (safe prompts that look harmful, and unsafe ones) under every condition; off
    while empty."""

    contrast: str = setting("builtin", "builtin, a FILE.csv or hf:ID")
    max_new_tokens: int = setting(OVER_REFUSAL_MAX_NEW_TOKENS, "tokens per completion of a contrast prompt",
                                  check=at_least(1))
    judge: Any = setting(help="the judge of those completions", factory=SubstringJudgeConfig, parse=parse_judge)


def _parse_over_refusal(o: Any, where: str) -> OverRefusalConfig:
    if isinstance(o, OverRefusalConfig):
        return o
    keys = [f.name for f in dataclasses.fields(OverRefusalConfig)]
    if o and (not isinstance(o, Mapping) or set(o) - set(keys)):
        raise RefusalError(f"evaluate.over_refusal must be {{contrast?, max_new_tokens?, judge?}}; got {o}.",
                           "e.g. {contrast: builtin, max_new_tokens: 64}.")
    o = dict(o or {})
    _check_fields(o, OverRefusalConfig, f"{where}.")
    return OverRefusalConfig(**_parsed(o, OverRefusalConfig, f"{where}.")).given(o)


# ----------------------------------------------------------------------------------------------------------------
# The run's sections


def _thinking(v: Any) -> str:
    return {None: "default", True: "on", False: "off"}[v] if v is None or isinstance(v, bool) else v


@dataclass
class DataConfig:
    """The prompts: where they come from, how many per split, which are kept."""

    harmful: str = setting("builtin", "harmful instructions: builtin, a file (.json, .jsonl, .csv, .parquet), a "
                                      "folder, or hf:ORG/NAME")
    harmless: str = setting("builtin", "harmless instructions, the same kinds of source")
    harmful_test: str | None = setting(None, "a separate harmful test set (e.g. JailbreakBench); default: a split "
                                             "of harmful")
    harmless_test: str | None = setting(None, "a separate harmless test set; default: a split of harmless")
    n_train: int = setting(128, "prompts per kind to extract directions from", check=at_least(1))
    n_val: int = setting(32, "prompts per kind to select a direction on", check=at_least(1))
    n_test: int = setting(100, "prompts per kind to generate and evaluate on", check=at_least(1))
    seed: int = setting(42, "seed of the shuffle that makes the splits")
    filter: bool = setting(True, "keep the harmful train/val prompts the model refuses and the harmless ones it "
                                 "does not")
    thinking: str | bool = setting("default", "reasoning models: default renders the chat template as it is; on / "
                                              "off pass enable_thinking=True / False (templates with that switch, "
                                              "e.g. Qwen3's); YAML's on / off (true / false) are accepted",
                                   check=lambda v: None if _thinking(v) in ("default", "on", "off") else
                                   "must be default, on or off")

    def __post_init__(self) -> None:
        self.thinking = _thinking(self.thinking)  # YAML reads on/off as booleans


METHODS = ("diff_means", "inlp")


def _methods_ok(methods: list) -> str | None:
    bad = [m for m in methods if m not in METHODS]
    return None if not bad and "diff_means" in methods else "must include diff_means and may add inlp"


@dataclass
class InlpConfig:
    """Iterative nullspace projection at every component (see refusal.directions.inlp)."""

    n_iterations: int = setting(16, "most directions per component (one per round)", check=at_least(1))
    min_accuracy: float = setting(0.55, "a round whose classifier is below this held-out accuracy adds no direction")
    margin: float = setting(0.02, "... nor one within this margin of chance (0.5)")
    heldout_fraction: float = setting(0.2, "share of the train prompts held out to test each round's classifier",
                                      check=fraction(closed_high=False))
    classifier: str = setting("logistic", "the linear classifier of each round", choices=("logistic", "svm"))


@dataclass
class ExtractConfig:
    """Reading activations and computing candidate directions."""

    methods: list[str] = setting(help="diff_means (the paper), and inlp for INLP subspaces too",
                                 factory=lambda: ["diff_means"], check=_methods_ok)
    inlp: InlpConfig = setting(help="INLP's settings (with methods: [diff_means, inlp])", factory=InlpConfig)
    batch_size: int | None = setting(None, f"sequences per forward when reading activations; default: batch_size, "
                                           f"else {EXTRACT_BATCH[0]} on a GPU, {EXTRACT_BATCH[1]} on a CPU",
                                     check=at_least(1), digest=False)


@dataclass
class SelectConfig:
    """Picking one direction among the candidates (the paper's filters and score)."""

    kl_threshold: float = setting(0.1, "drop candidates whose ablation moves the harmless first-token "
                                       "distribution by more KL than this")
    induce_threshold: float = setting(0.0, "drop candidates whose addition does not raise the harmless refusal "
                                           "score above this")
    max_layer_fraction: float = setting(0.8, "candidates from the last 1 - this share of layers are not scored",
                                        check=fraction(closed_high=True))
    layer_stride: int = setting(1, "score every k-th layer (1 = all, as in the paper)", check=at_least(1))
    prune: bool = setting(False, "bypass/KL only for candidates passing the induce filter (same pick, fewer "
                                 "forwards)")
    ranking: str = setting("global", "rank components by intervening everywhere (global, the paper), at the "
                                     "source only (local), or both", choices=("global", "local", "both"))
    objective: Any = setting("refusal_score", "the final pick among the candidates that pass the filters: "
                                              "refusal_score (the paper), or a judge spec (e.g. {type: substring}): "
                                              "short completions of the harmful val prompts under each of the best "
                                              "judge_candidates ablations, judged; the lowest judged refusal rate "
                                              "wins", parse=lambda v, where: v if isinstance(v, str) else
                             parse_judge(v, where))
    judge_candidates: int = setting(8, "candidates judged with a judge objective", check=at_least(1))
    judge_max_new_tokens: int = setting(SELECT_JUDGE_MAX_NEW_TOKENS, "tokens per completion judged with a judge "
                                                                     "objective", check=at_least(1))
    keep_refusal: list[str] = setting(help="categories (the harmful records' category field) whose refusal is kept: "
                                           "the run also extracts one direction per category of the harmful train "
                                           "split, writes the others' direction made orthogonal to these ones as "
                                           "kept in directions.safetensors, and adds the condition keep_refusal "
                                           "(harmful prompts, kept ablated)", factory=list)
    batch_size: int | None = setting(None, f"sequences per scoring forward (the filter, candidate scores, rankings, "
                                           f"first-token KL): only the last position's logits are kept; default: "
                                           f"extract's size, times {SCORE_BATCH_FACTOR} on a GPU",
                                     check=at_least(1), digest=False)


OPS = ("ablate", "add", "reflect")
PROMPT_SETS = ("harmful", "harmless")


@dataclass
class InterventionSpec:
    """One intervention of a condition: an operator on a named direction of the run, at a scope."""

    op: str = setting(help="ablate (project out), add (activation addition) or reflect (counterfactual reflection)")
    direction: str = setting("selected", "a name in the run's direction set (directions.safetensors): selected, 0, "
                                         "1, ... by rank, inlp, inlp_first, kept, set")
    coeff: float = setting(1.0, "add: multiplier of the raw vector (negative: subtraction)")
    alpha: float = setting(1.0, "reflect: x - (1 + alpha) P x")
    layers: Any = setting(None, "source, all, a list, or {top: p}; default: the operator's (ablate: all; add, "
                                "reflect: the direction's layer)")
    sites: list[str] | None = setting(None, "input, attn, mlp; default: ablate at all three, add/reflect at the "
                                            "input")
    tokens: str = setting("all", "all, prompt or generated")


@dataclass
class Condition:
    """A named condition: a prompt set (harmful or harmless test prompts) under a list of interventions."""

    name: str = setting(help="its name in the reports (unique per prompt set)")
    prompts: str = setting(help="harmful or harmless (the test prompts)")
    interventions: list[InterventionSpec] = setting(help="what is applied while the model reads and decodes",
                                                    factory=list)
    max_new_tokens: int | None = setting(None, "this condition's generation budget; default: "
                                               "generate.max_new_tokens")


def default_conditions() -> list[Condition]:
    """The paper's five: harmful under baseline, ablation and ActAdd(-); harmless under baseline and ActAdd(+)."""
    return [Condition("baseline", "harmful"), Condition("ablation", "harmful", [InterventionSpec("ablate")]),
            Condition("actadd", "harmful", [InterventionSpec("add", coeff=-1.0)]),
            Condition("baseline", "harmless"), Condition("actadd", "harmless", [InterventionSpec("add", coeff=1.0)])]


@dataclass
class OpenAIGenerateConfig:
    """``generate.backend: openai``: the conditions with no interventions (the model's own weights) decode on an
    OpenAI-compatible server, e.g. ``vllm serve MODEL`` (docs/serving.md); the others stay local."""

    url: str = setting("http://localhost:8000/v1", "base URL of the server", check=check_url)
    model: str | None = setting(None, "the served name of the run's model (GET /v1/models); null: the only base "
                                      "model served")
    api_key_env: str | None = setting(None, "the NAME of the environment variable holding the API key (never the "
                                            "key)", check=check_env_name, secret=True)
    concurrency: int = setting(8, "requests in flight", check=at_least(1))
    batch_size: int = setting(16, "prompts per request", check=at_least(1))
    timeout: float = setting(600.0, "seconds per request", check=positive)
    retries: int = setting(5, "attempts after the first, on timeouts, connection errors, 429 and 5xx",
                           check=non_negative)
    backoff: float = setting(1.0, "first retry delay in seconds, doubling", check=non_negative)
    prompt_format: str = setting("tokens", "tokens: the run's token ids (what local decoding reads; vLLM takes "
                                           "them); text: the templated text, for a server that takes no token ids",
                                 choices=("tokens", "text"))
    stop_token_ids: bool = setting(True, "send the model's stop tokens (vLLM's stop_token_ids): stop where local "
                                         "decoding does")
    force_model: bool = setting(False, "generate even if the served model does not look like the run's model "
                                       "(recorded)")


@dataclass
class GenerateConfig:
    """Decoding the test prompts under every condition."""

    max_new_tokens: int = setting(GENERATE_MAX_NEW_TOKENS, "tokens per completion (the paper uses 512)",
                                  check=at_least(1))
    static_cache: bool | str = setting(False, "false: model.generate; true: compiled static-cache decoding (CUDA "
                                              "graphs on a GPU); graphs: the eager step in CUDA graphs, no compile",
                                       choices=(False, True, "graphs"))
    kl: bool = setting(True, "each condition's first-token KL on the harmless test prompts (one forward per row)")
    conditions: list[Condition] = setting(help="what runs: each condition is a prompt set under a list of "
                                               "interventions (an op x a scope on a named direction)",
                                          factory=default_conditions)
    backend: str = setting("local", "local: every condition decodes here; openai: the conditions without "
                                    "interventions decode on the OpenAI-compatible server of generate.openai "
                                    "(docs/serving.md)", choices=("local", "openai"))
    openai: OpenAIGenerateConfig = setting(help="the server of backend: openai", factory=OpenAIGenerateConfig)
    batch_size: int | None = setting(None, f"sequences decoded together (every condition's rows share batches; "
                                           f"also the over-refusal check and a judge objective's completions); "
                                           f"default: batch_size, else {GENERATE_BATCH[0]} on a GPU, "
                                           f"{GENERATE_BATCH[1]} on a CPU (halved on out-of-memory)",
                                     check=at_least(1), digest=False)

    def __post_init__(self) -> None:
        if isinstance(self.openai, dict):
            self.openai = OpenAIGenerateConfig(**self.openai)


@dataclass
class EvaluateConfig:
    """What ``evaluate`` measures for every condition."""

    judges: list[Any] = setting(help="judges, all reported side by side, each {type, name?, its options}; name "
                                     "labels its column (default: the judge's own). The types and their options:",
                                factory=_default_judges, parse=_parse_judges)
    cross_entropy: list[CrossEntropySource] = setting(
        help="sources of text for cross-entropy under each condition's interventions, each {name, source, mode?, "
             "max_tokens?, seq_len?, columns?, allow_fewer?}; source completions is the run's own baseline "
             "completions to the harmless test prompts", factory=_default_ce, parse=_parse_cross_entropy)
    ce_batch_size: int | None = setting(None, f"sequences per cross-entropy forward; default: "
                                              f"{CROSS_ENTROPY_BATCH[0]} on a GPU, {CROSS_ENTROPY_BATCH[1]} on a "
                                              f"CPU", check=at_least(1))
    benchmarks: BenchmarksConfig = setting(help="lm-eval coherence benchmarks under every condition, {tasks, limit?, "
                                                "data_dir?, num_fewshot?, batch_size?}; {} = off",
                                           factory=BenchmarksConfig, parse=_parse_benchmarks)
    magnitude: bool = setting(False, "projection on the selected direction vs refusal (test prompts, and the "
                                     "contrast set)")
    over_refusal: OverRefusalConfig = setting(help="over-refusal on a contrast set under every condition, "
                                                   "{contrast?, max_new_tokens?, judge?}; {} = off",
                                              factory=OverRefusalConfig, parse=_parse_over_refusal)


@dataclass
class BatchSizes:
    """The batch sizes a run uses, resolved for its device (:meth:`RunConfig.batch_sizes`)."""

    extract: int
    select: int
    generate: int
    cross_entropy: int


@dataclass
class RunConfig:
    """A run: the model, the device, and one section per stage."""

    model: str = setting(DEFAULT_MODEL, "a hub id, a local Hugging Face folder, a .gguf file or a catalog name "
                                        "(`refusal models list`)")
    preset: str = setting("auto", "auto (cpu without a GPU, else paper), paper or cpu: settings between the "
                                  "defaults and your file and flags")
    device: str | None = setting(None, "cuda, cuda:1, cpu, mps...; default: CUDA if present")
    dtype: str = setting("auto", "auto, bfloat16, float16 or float32")
    device_map: str | None = setting(None, "auto: spread the model over every visible GPU (accelerate)")
    max_memory_fraction: float = setting(0.9, "with device_map: share of each GPU's free memory that weights may "
                                              "fill", check=fraction(closed_high=True))
    trust_remote_code: bool = setting(False, "allow a model's own code to run (from its folder or the hub)")
    batch_size: int | None = setting(None, "the one size --batch-size sets: extract.batch_size and "
                                           "generate.batch_size where those are unset, and so select.batch_size "
                                           "(extract's, times 64 on a GPU); not evaluate.ce_batch_size. "
                                           "Default: each from the device", check=at_least(1))
    system_prompt: str | None = setting(None, "a system prompt for every prompt; default: none")
    refusal_tokens: list[str] | None = setting(None, "refusal openings whose first tokens make the refusal score; "
                                                     "default: the built-in list")
    output: str = setting("runs", "the folder that holds run folders")
    name: str | None = setting(None, "the run folder's name; default: the model's alias")
    data: DataConfig = setting(help="the prompts", factory=DataConfig)
    extract: ExtractConfig = setting(help="reading activations, candidate directions", factory=ExtractConfig)
    select: SelectConfig = setting(help="picking the direction", factory=SelectConfig)
    generate: GenerateConfig = setting(help="completions under every condition", factory=GenerateConfig)
    evaluate: EvaluateConfig = setting(help="judges and measures of every condition", factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what ``config.yaml`` holds): an option section as the keys it was given, a
        setting that changes no result (a per-stage batch size) only once set."""
        out = to_plain(self)
        assert isinstance(out, dict)
        return out

    def stage_config(self, stage: str) -> dict[str, Any]:
        """The part of the config that ``stage`` reads (what its digest covers, with its inputs' digests)."""
        return stage_config(self.to_dict(), stage)

    def batch_sizes(self, on_gpu: bool) -> BatchSizes:
        """Every batch size, resolved: a stage's own size, else ``batch_size``, else the device's default."""
        i = 0 if on_gpu else 1
        extract = self.extract.batch_size or self.batch_size or EXTRACT_BATCH[i]
        return BatchSizes(extract=extract,
                          select=self.select.batch_size or (extract * SCORE_BATCH_FACTOR if on_gpu else extract),
                          generate=self.generate.batch_size or self.batch_size or GENERATE_BATCH[i],
                          cross_entropy=self.evaluate.ce_batch_size or CROSS_ENTROPY_BATCH[i])


# ----------------------------------------------------------------------------------------------------------------
# Plain data and digests


def to_plain(obj: Any) -> Any:
    """``obj`` as plain data (dicts, lists, scalars): a :class:`Spec` as the keys it holds, a dataclass as all its
    fields but an unset setting that changes no result (``digest=False``, value None)."""
    if isinstance(obj, Spec):
        return {k: to_plain(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("digest", True) or getattr(obj, f.name) is not None}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _digest_view(value: Any, cls: Any) -> Any:
    """``value`` (a section as plain data) less the settings of ``cls`` that change no result."""
    if not (isinstance(value, dict) and isinstance(cls, type) and dataclasses.is_dataclass(cls)
            and not issubclass(cls, Spec)):
        return value
    hints = _hints(cls)
    out = {}
    for k, v in value.items():
        f = next((f for f in dataclasses.fields(cls) if f.name == k), None)
        if f is not None and not f.metadata.get("digest", True):
            continue
        out[k] = _digest_view(v, hints[k]) if f is not None else v
    return out


# What each stage reads. A stage's digest covers these keys, the digests of the stages it reads from, and (for
# extract) the model's identity and the resolved dtype; settings that do not change results (device, batch sizes,
# output folder) are in none of them.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "extract": ("model", "trust_remote_code", "system_prompt", "refusal_tokens", "data", "extract"),
    "select": ("select",),
    "generate": ("generate",),
    "evaluate": ("evaluate",),
}


def stage_config(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The part of a config (plain data, e.g. a saved ``config.yaml``) that ``stage``'s digest covers: its
    :data:`STAGE_KEYS` that ``config`` has, less the settings that change no result (per-stage batch sizes)."""
    hints = _hints(RunConfig)
    return {k: _digest_view(config[k], hints[k]) for k in STAGE_KEYS[stage] if k in config}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Presets sit between the defaults and the user's file/flags.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's sizes are the defaults. Decoding captures the eager step into CUDA graphs (same tokens as
    # model.generate, set up in a second where a compile costs a minute). Off a GPU it is plain static-cache decoding.
    "paper": {"generate": {"static_cache": "graphs"}},
    # Sized for a 2-core CPU: the whole pipeline in under 10 minutes (see docs/results.md). Fewer prompts,
    # every fourth layer, bypass/KL only where induce passes, short completions (refusal phrases come first).
    "cpu": {
        "data": {"n_train": 24, "n_val": 6, "n_test": 12, "filter": False},
        "select": {"prune": True, "layer_stride": 4},
        "generate": {"max_new_tokens": 24, "kl": False},
        "evaluate": {"cross_entropy": []},  # on two cores, CE under five conditions costs as much as generation
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Checking and building


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            raise RefusalError(f"Unknown config key '{k}' in {where}.",
                               f"Known keys there: {', '.join(sorted(base))}.")
        nested = isinstance(base[k], dict) and isinstance(v, dict) and base[k]  # an empty default takes any keys
        out[k] = _merge(base[k], v, f"{where}.{k}") if nested else v
    return out


def _defaults_tree(cls: type) -> dict[str, Any]:
    """Every key of ``cls`` with its default as plain data, per-stage batch sizes included (what a file may name)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        d = _default(f)
        sub = dataclasses.is_dataclass(t) and isinstance(t, type) and not issubclass(t, Spec)
        out[f.name] = _defaults_tree(t) if sub else to_plain(d)
    return out


_EXAMPLES = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "null",
             dict: "a mapping"}


def _describe(t: Any) -> str:
    if t in _EXAMPLES:
        return _EXAMPLES[t]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list or t is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict or dataclasses.is_dataclass(t):
        return "a mapping"
    return str(t)


def _matches(v: Any, t: Any) -> bool:
    if t is Any:
        return True
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in args)
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is str:
        return isinstance(v, str)
    if origin is list or t is list:
        return isinstance(v, list) and (not args or all(_matches(x, args[0]) for x in v))
    if origin is dict or t is dict:
        return isinstance(v, Mapping) and (not args or all(_matches(x, args[1]) for x in v.values()))
    if dataclasses.is_dataclass(t) and isinstance(t, type):
        return isinstance(v, (Mapping, t))
    return True


def _or(values: tuple) -> str:
    names = [json.dumps(v).strip('"') for v in values]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _check_fields(d: Mapping[str, Any], cls: type, where: str = "") -> None:
    """Every value of ``d`` (a section as a mapping) against its field in ``cls``: type, allowed values, range. A
    wrong one is a :class:`RefusalError` naming the setting, what it must be and an example, before anything runs.
    Nested sections are checked in turn; a field with its own parser (judges, option sections) is checked there."""
    hints = _hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls)}
    for key, v in d.items():
        t, f = hints.get(key), flds.get(key)
        if t is None or f is None:
            continue
        name = f"{where}{key}"
        if dataclasses.is_dataclass(t) and isinstance(t, type) and not issubclass(t, Spec) and not isinstance(v, t):
            if not isinstance(v, Mapping):
                raise RefusalError(f"{name} must be a mapping of settings (got {v!r}).",
                                   f"Write it as key: value pairs under {key}: (see `refusal config`).")
            _check_fields(v, t, f"{name}.")
            continue
        args = typing.get_args(t)
        if typing.get_origin(t) is list and args and dataclasses.is_dataclass(args[0]):  # checked when built
            if not isinstance(v, list):
                raise RefusalError(f"{name} must be a list (got {v!r}).", "See `refusal config` for the layout.")
            continue
        if not _matches(v, t):
            if isinstance(v, str) and (typing.get_origin(t) is list or list in args
                                       or any(typing.get_origin(a) is list for a in args)):
                fix = f"Write it as a list: {key}: [{v}]."
            elif f.default not in (MISSING, None):
                fix = f"For example {key}: {json.dumps(f.default).replace(chr(34), '')} (the default)."
            else:
                fix = "See `refusal config` for every setting and its default."
            got = "" if f.metadata.get("secret") else f" (got {v!r})"
            raise RefusalError(f"{name} must be {_describe(t)}{got}.", fix)
        choices = f.metadata.get("choices")
        if choices is not None and v not in choices:
            raise RefusalError(f"{name} must be {_or(choices)} (got {v!r}).", _fix(f))
        check = f.metadata.get("check")
        complaint = check(v) if check is not None and v is not None else None
        if complaint:
            got = "" if f.metadata.get("secret") else f" (got {v!r})"
            raise RefusalError(f"{name} {complaint}{got}.", _fix(f))


def _fix(f: dataclasses.Field) -> str:
    h = help_of(f)
    default = "" if _required(f) or isinstance(_default(f), (list, dict)) else \
        f" The default is {json.dumps(to_plain(_default(f)))}."
    return (f"{h[0].upper()}{h[1:]}." if h else "See `refusal config`.") + default


check_types = _check_fields  # the earlier name


def _parsed(d: Mapping[str, Any], cls: type, where: str) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from ``d`` (checked): nested sections built, parsers applied."""
    hints = _hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, v in d.items():
        f, t = flds[key], hints[key]
        parse = f.metadata.get("parse")
        if parse is not None:
            v = parse(v, f"{where}{key}")
        elif dataclasses.is_dataclass(t) and isinstance(t, type) and isinstance(v, Mapping):
            v = t(**_parsed(v, t, f"{where}{key}."))
        elif key == "conditions":
            v = [_condition(c, i) for i, c in enumerate(v)]
        out[key] = v
    return out


def _build(d: dict) -> RunConfig:
    return RunConfig(**_parsed(d, RunConfig, ""))


def _condition(c: Any, i: int) -> Condition:
    if isinstance(c, Condition):
        return c
    where = f"generate.conditions[{i}]"
    if not isinstance(c, dict) or not {"name", "prompts"} <= set(c):
        raise RefusalError(f"{where} must be a mapping with at least 'name' and 'prompts'.",
                           "Write e.g. {name: ablation, prompts: harmful, interventions: [{op: ablate}]}.")
    unknown = set(c) - {f.name for f in dataclasses.fields(Condition)}
    if unknown:
        raise RefusalError(f"Unknown key(s) {sorted(unknown)} in {where}.",
                           "Keys are: name, prompts, interventions, max_new_tokens.")
    ivs = []
    if not isinstance(c.get("interventions") or [], list):
        raise RefusalError(f"{where}.interventions must be a list (got {c['interventions']!r}).",
                           "Write e.g. interventions: [{op: ablate}].")
    for j, iv in enumerate(c.get("interventions") or []):
        if isinstance(iv, InterventionSpec):
            ivs.append(iv)
            continue
        known = {f.name for f in dataclasses.fields(InterventionSpec)}
        if not isinstance(iv, dict) or "op" not in iv or set(iv) - known:
            raise RefusalError(f"{where}.interventions[{j}] is not a valid intervention ({iv}).",
                               f"Give 'op' ({', '.join(OPS)}) and optionally: {', '.join(sorted(known - {'op'}))}.")
        _check_fields(iv, InterventionSpec, f"{where}.interventions[{j}].")
        ivs.append(InterventionSpec(**iv))
    budget = c.get("max_new_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise RefusalError(f"{where}.max_new_tokens must be a positive integer (got {budget!r}).",
                           "Give this condition's generation budget in tokens, or leave it out for "
                           "generate.max_new_tokens.")
    return Condition(str(c["name"]), str(c["prompts"]), ivs, budget)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise RefusalError(f"The config file '{path}' does not exist.", "Check the path given to --config.")
    try:
        d = yaml.safe_load(p.read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RefusalError(f"The config file '{path}' is not valid YAML ({exc}).", "Fix the YAML syntax.") from None
    if not isinstance(d, dict):
        raise RefusalError(f"The config file '{path}' is not a mapping.", "Write it as key: value pairs.")
    return d


def resolve(config_file: str | Path | None = None, overrides: dict | None = None, *,
            has_gpu: bool | None = None) -> RunConfig:
    """Defaults < preset < YAML file < overrides (a nested dict of the CLI flags that were given)."""
    base = _defaults_tree(RunConfig)
    given = load_yaml(config_file) if config_file else {}
    _merge(base, given, str(config_file))  # unknown keys are refused here, naming the file
    # every key the file gives wins over the preset, also one equal to the built-in default (static_cache: false
    # under the paper preset, or a run folder's saved config.yaml)
    user_diff = _merge_plain(given, overrides or {})
    preset = user_diff.get("preset", "auto")
    if preset == "auto":
        if has_gpu is None:
            import torch

            has_gpu = torch.cuda.is_available()
        device = user_diff.get("device")
        preset = "paper" if (has_gpu and device in (None, "cuda")) or (device or "").startswith("cuda") else "cpu"
    if preset not in PRESETS:
        raise RefusalError(f"Unknown preset '{preset}'.", f"Use one of: auto, {', '.join(PRESETS)}.")
    merged = _merge(_merge(base, PRESETS[preset], f"preset {preset}"), user_diff, "the config")
    merged["preset"] = preset
    _check_fields(merged, RunConfig)
    cfg = _build(merged)
    _add_keep_refusal_condition(cfg)
    validate(cfg)
    return cfg


KEEP_REFUSAL_CONDITION = "keep_refusal"


def _add_keep_refusal_condition(cfg: RunConfig) -> None:
    """With ``select.keep_refusal``, the harmful prompts under the ``kept`` direction's ablation, unless a condition
    already ablates it (a saved config has it; a user may write their own). Without it, the condition added
    earlier (a saved config's, exactly as added) is dropped, so that turning the option off works on a resumed run."""
    auto = Condition(KEEP_REFUSAL_CONDITION, "harmful", [InterventionSpec("ablate", direction="kept")])
    if not cfg.select.keep_refusal:
        cfg.generate.conditions = [c for c in cfg.generate.conditions if c != auto]
        return
    blank = [c for c in cfg.select.keep_refusal if not c.strip()]
    if blank:
        raise RefusalError(f"select.keep_refusal holds an empty category name ({cfg.select.keep_refusal!r}).",
                           "Name each category to keep, e.g. keep_refusal: [Sexual content, Violence].")
    if any(iv.direction == "kept" for c in cfg.generate.conditions for iv in c.interventions):
        return
    cfg.generate.conditions.append(auto)


def _merge_plain(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_plain(out[k] if isinstance(out.get(k), dict) else {}, v) if isinstance(v, dict) else v
    return out


def validate(cfg: RunConfig) -> None:
    """What one field's schema cannot say: settings checked together, and the conditions' interventions."""
    if isinstance(cfg.select.objective, str) and cfg.select.objective != "refusal_score":
        raise RefusalError(f"select.objective must be refusal_score or a judge spec (got {cfg.select.objective}).",
                           "e.g. objective: {type: substring}.")
    seen = set()
    for c in cfg.generate.conditions:
        if c.prompts not in PROMPT_SETS:
            raise RefusalError(f"Condition '{c.name}' uses the prompt set '{c.prompts}'.",
                               f"Prompt sets are: {', '.join(PROMPT_SETS)}.")
        if (c.name, c.prompts) in seen:
            raise RefusalError(f"Two conditions are named '{c.name}' on the {c.prompts} prompts.",
                               "Give each condition of a prompt set its own name.")
        seen.add((c.name, c.prompts))
        for iv in c.interventions:
            if iv.op not in OPS:
                raise RefusalError(f"Condition '{c.name}': unknown operator '{iv.op}'.",
                                   f"Use one of: {', '.join(OPS)}.")
            check_scope(iv.layers if iv.layers is not None else "all", tuple(iv.sites or ("input",)), iv.tokens)
    if not cfg.generate.conditions:
        raise RefusalError("generate.conditions is empty.", "Name at least one condition (or drop the key).")
    has_base = any(c.name == "baseline" and c.prompts == "harmless" for c in cfg.generate.conditions)
    if any(ce.source == "completions" for ce in cfg.evaluate.cross_entropy) and not has_base:
        raise RefusalError("evaluate.cross_entropy uses source 'completions' (the baseline completions to the harmless "
                           "prompts), but generate.conditions has no {name: baseline, prompts: harmless}.",
                           "Add that condition, or set evaluate.cross_entropy to other sources (or []).")


# ----------------------------------------------------------------------------------------------------------------
# The documented YAML of `refusal config`


def _comment(text: str, indent: str, hang: str = "") -> list[str]:
    lines = textwrap.wrap(text, 118 - len(indent), initial_indent=hang, subsequent_indent=hang + "  " if hang else "")
    return [f"{indent}# {line}" for line in lines]


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**9, sort_keys=False).strip().removesuffix("\n...")


def _documented(obj: Any, indent: str = "") -> list[str]:
    lines: list[str] = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        v, t = getattr(obj, f.name), hints[f.name]
        lines += _comment(help_of(f), indent)
        if dataclasses.is_dataclass(v) and not isinstance(v, Spec):
            lines.append(f"{indent}{f.name}:")
            lines += _documented(v, indent + "  ")
            continue
        inner = typing.get_args(t)[0] if typing.get_origin(t) is list and typing.get_args(t) else None
        spec_cls = type(v) if isinstance(v, Spec) else (inner if isinstance(inner, type) and issubclass(inner, Spec)
                                                       else None)
        if spec_cls is not None:
            lines += _spec_fields(spec_cls, indent, "  ")
        if f.name == "judges":
            for schema in dict.fromkeys(s for s in JUDGE_SCHEMAS.values() if s is not None):
                kind = next(g.default for g in dataclasses.fields(schema) if g.name == "type")
                lines += _comment(f"{{type: {kind}}}: {(schema.__doc__ or '').strip()}", indent, "  ")
                lines += _spec_fields(schema, indent, "    ", skip=("type", "name"))
        plain = to_plain(v)
        if isinstance(plain, list) and plain:
            lines.append(f"{indent}{f.name}:")
            lines += [f"{indent}  - {_yaml_value(x)}" for x in plain]
        else:
            lines.append(f"{indent}{f.name}: {_yaml_value(plain)}")
    return lines


def _spec_fields(cls: type, indent: str, hang: str, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for g in dataclasses.fields(cls):  # type: ignore[arg-type]
        if g.name in skip:
            continue
        d = "required" if _required(g) else f"default {_yaml_value(to_plain(_default(g)))}"
        out += _comment(f"{g.name} ({d}): {help_of(g)}", indent, hang)
    return out


def documented_yaml(cfg: RunConfig | None = None) -> str:
    """``cfg`` (default: the built-in defaults) as YAML, every setting under its description: what ``refusal
    config`` prints, a starting point for ``--config`` that reads back as the same config."""
    head = ["# refusal: every setting with its description and value. Give a file like this one with --config;",
            "# keys left out keep their defaults, flags override the file."]
    return "\n".join(head + _documented(cfg if cfg is not None else RunConfig())) + "\n"
