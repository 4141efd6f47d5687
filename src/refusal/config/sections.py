"""The stage sections before evaluation: ``data`` (the prompts), ``extract`` (candidate directions), ``select``
(picking one) and ``generate`` (completions under every condition, locally or on an OpenAI-compatible server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..endpoints import check_env_name, check_url
from .conditions import Condition, _parse_conditions, default_conditions
from .defaults import (
    EXTRACT_BATCH,
    GENERATE_BATCH,
    GENERATE_MAX_NEW_TOKENS,
    SCORE_BATCH_FACTOR,
    SELECT_JUDGE_MAX_NEW_TOKENS,
)
from .judges import parse_judge
from .schema import at_least, fraction, non_negative, positive, setting


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
    keep_refusal: list[str] = setting(help="categories (the harmful records' category field) whose refusal is kept "
                                           "(the others' is removed): the run extracts one direction per category "
                                           "of the harmful train split (categories.safetensors) and adds the "
                                           "condition keep_refusal (harmful prompts), made by keep_refusal_method",
                                      factory=list)
    keep_refusal_method: str = setting("conditional", "with keep_refusal: conditional (CAST, Lee et al. 2024: a "
                                                      "classifier on the prompt's activations routes each prompt; "
                                                      "those routed to release get the selected direction ablated, "
                                                      "the others nothing; keep_condition.safetensors; not a weight "
                                                      "edit) or orthogonal (one direction for every prompt: the "
                                                      "released categories' direction made orthogonal to the kept "
                                                      "ones', kept in directions.safetensors; exportable, but it "
                                                      "does not separate the categories: docs/keep-refusal.md)",
                                       choices=("conditional", "orthogonal"))
    keep_refusal_max_release: float = setting(0.1, "with keep_refusal, conditional: the share of kept-category "
                                                   "prompts the condition may route to release, measured out of "
                                                   "fold on the harmful train and val prompts (the threshold is set "
                                                   "there); lower keeps more refusal and releases fewer prompts",
                                              check=fraction(closed_high=False))
    batch_size: int | None = setting(None, f"sequences per scoring forward (the filter, candidate scores, rankings, "
                                           f"first-token KL): only the last position's logits are kept; default: "
                                           f"extract's size, times {SCORE_BATCH_FACTOR} on a GPU",
                                     check=at_least(1), digest=False)


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
                                          factory=default_conditions, parse=_parse_conditions)
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
