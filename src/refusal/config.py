"""The one typed configuration of a run: defaults, then a preset, then a YAML file, then CLI flags.

The resolved config is saved with every run (``config.yaml``); its hash tells whether a run folder was made with
the same settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RefusalError

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


@dataclass
class DataConfig:
    harmful: str = "builtin"
    harmless: str = "builtin"
    harmful_test: str | None = None  # a separate harmful test set (e.g. JailbreakBench)
    harmless_test: str | None = None
    n_train: int = 128
    n_val: int = 32
    n_test: int = 100
    seed: int = 42
    filter: bool = True  # keep harmful train/val prompts the model refuses and harmless ones it does not
    # reasoning models: "default" renders the chat template as it is; "on" / "off" pass enable_thinking=True/False
    # (templates with that switch, e.g. Qwen3's); the post-instruction positions are the generation prompt in that mode
    thinking: str | bool = "default"  # YAML reads on / off as true / false: both are accepted

    def __post_init__(self):
        if self.thinking is None or isinstance(self.thinking, bool):  # YAML reads on/off as booleans
            self.thinking = {None: "default", True: "on", False: "off"}[self.thinking]


METHODS = ("diff_means", "inlp")


@dataclass
class InlpConfig:
    """Iterative nullspace projection at every component (see refusal.directions.inlp)."""

    n_iterations: int = 16
    min_accuracy: float = 0.55  # a round's classifier below this held-out accuracy adds no direction
    margin: float = 0.02  # ... nor one within this margin of chance (0.5)
    heldout_fraction: float = 0.2
    classifier: str = "logistic"  # or "svm"


@dataclass
class ExtractConfig:
    methods: list[str] = field(default_factory=lambda: ["diff_means"])  # add "inlp" for INLP subspaces too
    inlp: InlpConfig = field(default_factory=InlpConfig)


@dataclass
class SelectConfig:
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    max_layer_fraction: float = 0.8  # candidates from the last 20 % of layers are not scored
    layer_stride: int = 1  # score every k-th layer (1 = all, as in the paper)
    prune: bool = False  # bypass/KL only for candidates passing the induce filter (same pick, fewer forwards)
    ranking: str = "global"  # rank components by intervening everywhere (the paper), "local" (source only) or "both"
    # the final pick among the candidates that pass the filters: "refusal_score" (the paper), or a judge spec (e.g.
    # {type: substring} or {type: llm, model: ...}): short completions of the harmful val prompts under each of the
    # best `judge_candidates` ablations, judged; the lowest judged refusal rate wins
    objective: Any = "refusal_score"
    judge_candidates: int = 8
    judge_max_new_tokens: int = 32
    # categories (the harmful records' `category` field) whose refusal is kept: the run also extracts one direction
    # per category of the harmful train split, writes the others' direction made orthogonal to these ones as `kept`
    # in directions.safetensors, and adds the condition keep_refusal (harmful prompts, `kept` ablated)
    keep_refusal: list[str] = field(default_factory=list)


OPS = ("ablate", "add", "reflect")
PROMPT_SETS = ("harmful", "harmless")


@dataclass
class InterventionSpec:
    """One intervention of a condition: an operator on a named direction of the run, at a scope."""

    op: str  # "ablate" (project out), "add" (activation addition), "reflect" (counterfactual reflection)
    direction: str = "selected"  # a name in the run's direction set (directions.safetensors)
    coeff: float = 1.0  # add: multiplier of the raw vector (negative: subtraction)
    alpha: float = 1.0  # reflect: x - (1 + alpha) P x
    layers: Any = None  # None: the operator's default (ablate: all; add, reflect: the direction's layer)
    sites: list[str] | None = None  # None: ablate at input, attn and mlp; add/reflect at the input
    tokens: str = "all"  # all | prompt | generated


@dataclass
class Condition:
    """A named condition: a prompt set (harmful or harmless test prompts) under a list of interventions."""

    name: str
    prompts: str
    interventions: list[InterventionSpec] = field(default_factory=list)
    max_new_tokens: int | None = None  # this condition's generation budget (None: generate.max_new_tokens)


def default_conditions() -> list[Condition]:
    """The paper's five: harmful under baseline, ablation and ActAdd(-); harmless under baseline and ActAdd(+)."""
    return [Condition("baseline", "harmful"), Condition("ablation", "harmful", [InterventionSpec("ablate")]),
            Condition("actadd", "harmful", [InterventionSpec("add", coeff=-1.0)]),
            Condition("baseline", "harmless"), Condition("actadd", "harmless", [InterventionSpec("add", coeff=1.0)])]


@dataclass
class OpenAIGenerateConfig:
    """``generate.backend: openai``: the conditions with no interventions (the model's own weights) decode on an
    OpenAI-compatible server, e.g. ``vllm serve MODEL`` (docs/serving.md); the others stay local."""

    url: str = "http://localhost:8000/v1"
    model: str | None = None  # the served name of the run's model (GET /v1/models); null: the only base model served
    api_key_env: str | None = None  # the NAME of the environment variable holding the API key (never the key)
    concurrency: int = 8  # requests in flight
    batch_size: int = 16  # prompts per request
    timeout: float = 600.0  # seconds per request
    retries: int = 5  # attempts after the first, on timeouts, connection errors, 429 and 5xx
    backoff: float = 1.0  # first retry delay in seconds, doubling
    prompt_format: str = "tokens"  # tokens: the run's token ids (what local decoding reads); text: the templated text
    stop_token_ids: bool = True  # send the model's stop tokens (vLLM's stop_token_ids): stop where local decoding does
    force_model: bool = False  # generate even if the served model does not look like the run's model (recorded)


@dataclass
class GenerateConfig:
    max_new_tokens: int = 256
    static_cache: bool | str = False  # false, true (compiled; CUDA graphs on a GPU) or "graphs" (eager, graphed)
    kl: bool = True  # each condition's first-token KL on the harmless test prompts (one forward per row)
    conditions: list[Condition] = field(default_factory=default_conditions)
    backend: str = "local"  # or "openai": conditions without interventions decode on generate.openai's server
    openai: OpenAIGenerateConfig = field(default_factory=OpenAIGenerateConfig)

    def __post_init__(self):
        if isinstance(self.openai, dict):
            self.openai = OpenAIGenerateConfig(**self.openai)


def _default_judges() -> list[dict]:
    return [{"type": "substring"}, {"type": "refusal_score"}]


def _default_ce() -> list[dict]:
    return [{"name": "own_completions", "source": "completions"}]


@dataclass
class EvaluateConfig:
    """What ``evaluate`` measures for every condition. ``judges``: judge specs (see refusal.evaluation.judges), all
    reported side by side. ``cross_entropy``: sources of text for CE under each condition's interventions, each
    ``{name, source, mode?, max_tokens?, seq_len?, columns?}``; ``source: completions`` is the run's own baseline
    completions to the harmless test prompts (offline, nothing else needed), else a file or ``hf:ORG/NAME``."""

    judges: list[dict] = field(default_factory=_default_judges)
    cross_entropy: list[dict] = field(default_factory=_default_ce)
    ce_batch_size: int | None = None  # sequences per cross-entropy forward; None = chosen from the device (8 / 32)
    # lm-eval coherence benchmarks under every condition: {tasks: [refusal_mmlu, ...], limit: 100, data_dir: DIR,
    # batch_size: 8}
    benchmarks: dict = field(default_factory=dict)
    magnitude: bool = False  # projection on the selected direction vs refusal (test prompts, and the contrast set)
    # over-refusal on a contrast set under every condition: {contrast: builtin | FILE.csv | hf:ID, max_new_tokens: 64}
    over_refusal: dict = field(default_factory=dict)


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL
    preset: str = "auto"  # "auto" = "cpu" without a GPU, else "paper"
    device: str | None = None
    dtype: str = "auto"
    device_map: str | None = None  # "auto": spread the model over every visible GPU (accelerate)
    max_memory_fraction: float = 0.9  # with device_map: share of each GPU's free memory that weights may fill
    trust_remote_code: bool = False
    batch_size: int | None = None  # sequences per forward; None = chosen from the device
    system_prompt: str | None = None
    refusal_tokens: list[str] | None = None  # refusal openings; None = the built-in list
    output: str = "runs"
    name: str | None = None  # run folder name; None = the model's alias
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_config(self, stage: str) -> dict[str, Any]:
        """The part of the config that ``stage`` reads (what its digest covers, with its inputs' digests)."""
        d = self.to_dict()
        return {k: d[k] for k in STAGE_KEYS[stage]}


# What each stage reads. A stage's digest covers these keys, the digests of the stages it reads from, and (for
# extract) the model's identity and the resolved dtype; settings that do not change results (device, batch size,
# output folder) are in none of them.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "extract": ("model", "trust_remote_code", "system_prompt", "refusal_tokens", "data", "extract"),
    "select": ("select",),
    "generate": ("generate",),
    "evaluate": ("evaluate",),
}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Presets sit between the defaults and the user's file/flags.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's sizes are the defaults. Decoding captures the eager step into CUDA graphs (same tokens as
    # model.generate; set up in a second, where a compile costs a minute): 500 x 256 tokens of a 1.5B model on an
    # H200 in about 4 s instead of 13 s (docs/results.md). Off a GPU it is plain static-cache decoding.
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


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            raise RefusalError(f"Unknown config key '{k}' in {where}.",
                               f"Known keys there: {', '.join(sorted(base))}.")
        nested = isinstance(base[k], dict) and isinstance(v, dict) and base[k]  # an empty default takes any keys
        out[k] = _merge(base[k], v, f"{where}.{k}") if nested else v
    return out


def _build(d: dict) -> RunConfig:
    d = dict(d)
    sub = {"data": DataConfig, "select": SelectConfig, "generate": GenerateConfig, "evaluate": EvaluateConfig}
    kwargs = {k: (sub[k](**v) if k in sub else v) for k, v in d.items()}
    ext = dict(kwargs.get("extract") or {})
    kwargs["extract"] = ExtractConfig(list(ext.get("methods", ["diff_means"])), InlpConfig(**(ext.get("inlp") or {})))
    kwargs["generate"].conditions = [_condition(c, i) for i, c in enumerate(kwargs["generate"].conditions)]
    return RunConfig(**kwargs)


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
        check_types(iv, InterventionSpec, f"{where}.interventions[{j}].")
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
    base = RunConfig().to_dict()
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
    check_types(merged, RunConfig)
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


_EXAMPLES = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "null",
             dict: "a mapping"}


def _describe(t: Any) -> str:
    import types
    import typing

    if t in _EXAMPLES:
        return _EXAMPLES[t]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list or t is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(t):
        return "a mapping"
    return str(t)


def _matches(v: Any, t: Any) -> bool:
    import types
    import typing

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
        return isinstance(v, dict)
    if dataclasses.is_dataclass(t):
        return isinstance(v, (dict, t))
    return True


def check_types(d: dict, cls: type, where: str = "") -> None:
    """Every value of ``d`` (a config section as a dict) against the type of its field in ``cls``: a wrong type is
    a :class:`RefusalError` naming the key, what it must be and an example, before anything runs."""
    import typing

    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for key, v in d.items():
        t = hints.get(key)
        if t is None:
            continue
        name = f"{where}{key}"
        if dataclasses.is_dataclass(t) and not isinstance(v, t):
            if not isinstance(v, dict):
                raise RefusalError(f"{name} must be a mapping of settings (got {v!r}).",
                                   f"Write it as key: value pairs under {key}: (see `refusal config`).")
            check_types(v, t, f"{name}.")
            continue
        if typing.get_args(t) and dataclasses.is_dataclass(typing.get_args(t)[0]):  # list[Condition]: checked later
            if not isinstance(v, list):
                raise RefusalError(f"{name} must be a list (got {v!r}).", "See `refusal config` for the layout.")
            continue
        if not _matches(v, t):
            if isinstance(v, str) and (typing.get_origin(t) is list or list in typing.get_args(t)
                                       or any(typing.get_origin(a) is list for a in typing.get_args(t))):
                fix = f"Write it as a list: {key}: [{v}]."
            elif key in defaults and defaults[key] is not None:
                example = json.dumps(defaults[key]).replace('"', "")
                fix = f"For example {key}: {example} (the default)."
            else:
                fix = "See `refusal config` for every setting and its default."
            raise RefusalError(f"{name} must be {_describe(t)} (got {v!r}).", fix)


def validate(cfg: RunConfig) -> None:
    d = cfg.data
    for name in ("n_train", "n_val", "n_test"):
        if getattr(d, name) < 1:
            raise RefusalError(f"data.{name} must be at least 1 (got {getattr(d, name)}).", "Set a positive size.")
    if cfg.evaluate.ce_batch_size is not None and cfg.evaluate.ce_batch_size < 1:
        raise RefusalError(f"evaluate.ce_batch_size must be at least 1 (got {cfg.evaluate.ce_batch_size}).",
                           "Set a positive size, or leave it out to size it from the device.")
    if cfg.generate.static_cache not in (False, True, "graphs"):
        raise RefusalError(f"generate.static_cache must be false, true or graphs (got "
                           f"{cfg.generate.static_cache!r}).", "true: compiled static-cache decoding (CUDA graphs on a "
                           "GPU); graphs: the eager step in CUDA graphs, no compile; false: model.generate.")
    from .evaluation.judges import validate_spec  # torch-free: checks every judge spec before any model work

    for spec in cfg.evaluate.judges:
        validate_spec(spec)
    for i, ce in enumerate(cfg.evaluate.cross_entropy):
        extra = set(ce) - {"name", "source", "mode", "max_tokens", "seq_len", "columns", "allow_fewer"}
        if not isinstance(ce, dict) or not {"name", "source"} <= set(ce) or extra:
            raise RefusalError(f"evaluate.cross_entropy[{i}] must be a mapping with name and source (and optionally "
                               f"mode, max_tokens, seq_len, columns, allow_fewer); got {ce}.",
                               "e.g. {name: wikitext, source: path/to/wiki.test.raw, max_tokens: 20000}.")
    if cfg.select.objective != "refusal_score":
        if not isinstance(cfg.select.objective, dict):
            raise RefusalError(f"select.objective must be refusal_score or a judge spec (got {cfg.select.objective}).",
                               "e.g. objective: {type: substring}.")
        validate_spec(cfg.select.objective)
    b, o = cfg.evaluate.benchmarks, cfg.evaluate.over_refusal
    bench_keys = {"tasks", "limit", "data_dir", "num_fewshot", "batch_size"}
    if b and (not isinstance(b, dict) or not b.get("tasks") or set(b) - bench_keys):
        raise RefusalError(f"evaluate.benchmarks must be {{tasks: [...], limit?, data_dir?, num_fewshot?, "
                           f"batch_size?}}; got {b}.",
                           "e.g. {tasks: [refusal_mmlu, refusal_arc_challenge], limit: 100, data_dir: DIR}.")
    if o and (not isinstance(o, dict) or set(o) - {"contrast", "max_new_tokens", "judge"}):
        raise RefusalError(f"evaluate.over_refusal must be {{contrast?, max_new_tokens?, judge?}}; got {o}.",
                           "e.g. {contrast: builtin, max_new_tokens: 64}.")
    bad = [m for m in cfg.extract.methods if m not in METHODS]
    if bad or "diff_means" not in cfg.extract.methods:
        raise RefusalError(f"extract.methods must include diff_means and may add inlp (got {cfg.extract.methods}).",
                           f"Methods are: {', '.join(METHODS)}.")
    if cfg.select.ranking not in ("global", "local", "both"):
        raise RefusalError(f"select.ranking must be global, local or both (got '{cfg.select.ranking}').",
                           "global: intervene at every layer (the paper); local: only at the source component.")
    if cfg.extract.inlp.classifier not in ("logistic", "svm"):
        raise RefusalError(f"extract.inlp.classifier must be logistic or svm (got '{cfg.extract.inlp.classifier}').",
                           "Use logistic (default) or svm.")
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
            from .interventions.scopes import Scope  # torch-free; checks layers, sites and tokens

            Scope(iv.layers if iv.layers is not None else "all", tuple(iv.sites or ("input",)), iv.tokens)
    if not cfg.generate.conditions:
        raise RefusalError("generate.conditions is empty.", "Name at least one condition (or drop the key).")
    has_base = any(c.name == "baseline" and c.prompts == "harmless" for c in cfg.generate.conditions)
    if any(ce.get("source") == "completions" for ce in cfg.evaluate.cross_entropy) and not has_base:
        raise RefusalError("evaluate.cross_entropy uses source 'completions' (the baseline completions to the harmless "
                           "prompts), but generate.conditions has no {name: baseline, prompts: harmless}.",
                           "Add that condition, or set evaluate.cross_entropy to other sources (or []).")
    for name, v, low in (("batch_size", cfg.batch_size, 1), ("select.layer_stride", cfg.select.layer_stride, 1),
                         ("select.judge_candidates", cfg.select.judge_candidates, 1),
                         ("select.judge_max_new_tokens", cfg.select.judge_max_new_tokens, 1),
                         ("extract.inlp.n_iterations", cfg.extract.inlp.n_iterations, 1)):
        if v is not None and v < low:
            raise RefusalError(f"{name} must be at least {low} (got {v}).", "Set a positive number.")
    if not 0 < cfg.max_memory_fraction <= 1:
        raise RefusalError(f"max_memory_fraction must be in (0, 1] (got {cfg.max_memory_fraction}).",
                           "It is the share of each GPU's free memory weights may fill; the default is 0.9.")
    if not 0 < cfg.extract.inlp.heldout_fraction < 1:
        raise RefusalError(f"extract.inlp.heldout_fraction must be in (0, 1) (got "
                           f"{cfg.extract.inlp.heldout_fraction}).", "The default is 0.2.")
    if not 0 < cfg.select.max_layer_fraction <= 1:
        raise RefusalError("select.max_layer_fraction must be in (0, 1].", "For the paper's filter use 0.8.")
    if cfg.generate.max_new_tokens < 1:
        raise RefusalError("generate.max_new_tokens must be at least 1.", "The paper uses 512; the default is 256.")
    _validate_backend(cfg.generate)
    if cfg.data.thinking not in ("default", "on", "off"):
        raise RefusalError(f"data.thinking must be default, on or off (got {cfg.data.thinking!r}).",
                           "default: the chat template as it is; on / off: enable_thinking=True / False.")


def _validate_backend(g: GenerateConfig) -> None:
    """generate.backend and generate.openai, checked without a network call (the key's variable is read when
    generate runs, so that stages that do not generate need no key)."""
    if g.backend not in ("local", "openai"):
        raise RefusalError(f"generate.backend must be local or openai (got {g.backend!r}).",
                           "local: every condition decodes here; openai: the conditions without interventions "
                           "decode on the OpenAI-compatible server of generate.openai (docs/serving.md).")
    if g.backend != "openai":
        return
    from .evaluation.judges.openai import _check_env_name, _check_url  # torch-free

    o = g.openai
    for name, complaint in (("url", _check_url(o.url)),
                            ("api_key_env", o.api_key_env and _check_env_name(o.api_key_env))):
        if complaint:
            got = f" (got {o.url!r})" if name == "url" else ""  # never echo what may be a pasted key
            raise RefusalError(f"generate.openai.{name} {complaint}{got}.",
                               "e.g. openai: {url: http://localhost:8000/v1, model: MODEL, api_key_env: VLLM_API_KEY}.")
    for name in ("concurrency", "batch_size"):
        if getattr(o, name) < 1:
            raise RefusalError(f"generate.openai.{name} must be at least 1 (got {getattr(o, name)}).",
                               "Set a positive number.")
    if o.timeout <= 0 or o.retries < 0 or o.backoff < 0:
        raise RefusalError("generate.openai.timeout must be positive, retries and backoff at least 0.",
                           "The defaults are timeout: 600, retries: 5, backoff: 1.")
    if o.prompt_format not in ("tokens", "text"):
        raise RefusalError(f"generate.openai.prompt_format must be tokens or text (got {o.prompt_format!r}).",
                           "tokens: the run's token ids, exactly what local decoding reads (vLLM takes them); text: "
                           "the templated text, for a server that takes no token ids.")
