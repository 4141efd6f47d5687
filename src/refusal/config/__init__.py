"""The one typed configuration of a run: defaults, then a preset, then a YAML file, then CLI flags.

Every setting is a field of a dataclass, declared with :func:`setting`: its default, a description (the field's
``metadata["help"]``) and, where it has them, its allowed values and range. The schema is the one place defaults are
written: :func:`resolve` checks every value against it before anything runs (a wrong type, value or key is a
:class:`RefusalError` naming the setting), and ``refusal config`` prints it as commented YAML
(:func:`documented_yaml`). Sections written as a mapping of options (a judge, a cross-entropy source, the benchmarks,
the over-refusal check) are :class:`Spec` s: typed fields read as attributes, and, as a mapping, exactly the keys
that were given, which is what ``config.yaml`` keeps and what the stage digests cover.

The resolved config is saved with every run (``config.yaml``); each stage's digest covers the sections it reads
(:data:`STAGE_KEYS`, :func:`stage_config`), less the settings that do not change results (batch sizes).

The files, lowest first (each imports only those above it): ``defaults`` (the default model, generation budgets,
batch sizes), ``schema`` (:func:`setting`, :class:`Spec`, :func:`to_plain`), ``checks`` (a value against its
field), ``judges`` (the judge specs), ``conditions`` (what ``generate`` runs), ``evaluate`` and ``sections`` (the
stage sections), ``run`` (:class:`RunConfig`, the stage digests), ``presets``, ``load`` (:func:`resolve`) and
``describe`` (:func:`documented_yaml`). This package imports nothing of the layers above it: it checks names against
:mod:`refusal.names`, not against the modules that implement them.
"""

from __future__ import annotations

from .checks import check_types
from .conditions import OPS, PROMPT_SETS, Condition, InterventionSpec, default_conditions
from .defaults import (
    CHAT_MAX_NEW_TOKENS,
    CROSS_ENTROPY_BATCH,
    DEFAULT_MODEL,
    EXTRACT_BATCH,
    GENERATE_BATCH,
    GENERATE_MAX_NEW_TOKENS,
    JUDGE_MAX_NEW_TOKENS,
    OVER_REFUSAL_MAX_NEW_TOKENS,
    SCORE_BATCH_FACTOR,
    SELECT_JUDGE_MAX_NEW_TOKENS,
)
from .describe import documented_yaml
from .evaluate import BenchmarksConfig, CrossEntropySource, EvaluateConfig, OverRefusalConfig
from .judges import (
    GUARD_FORMATS,
    JUDGE_SCHEMAS,
    RUBRICS,
    GuardJudgeConfig,
    JudgeSpec,
    LLMJudgeConfig,
    LocalJudgeConfig,
    OpenAIJudgeConfig,
    RefusalScoreJudgeConfig,
    SubstringJudgeConfig,
    judge_types,
    parse_judge,
    register_judge,
)
from .load import KEEP_REFUSAL_CONDITION, load_yaml, resolve, validate
from .presets import PRESETS
from .run import STAGE_KEYS, BatchSizes, RunConfig, digest, stage_config
from .schema import Spec, at_least, fraction, help_of, non_negative, positive, setting, to_plain
from .sections import (
    METHODS,
    DataConfig,
    ExtractConfig,
    GenerateConfig,
    InlpConfig,
    OpenAIGenerateConfig,
    SelectConfig,
)

__all__ = [
    "CHAT_MAX_NEW_TOKENS", "CROSS_ENTROPY_BATCH", "DEFAULT_MODEL", "EXTRACT_BATCH", "GENERATE_BATCH",
    "GENERATE_MAX_NEW_TOKENS", "GUARD_FORMATS", "JUDGE_MAX_NEW_TOKENS", "JUDGE_SCHEMAS", "KEEP_REFUSAL_CONDITION",
    "METHODS", "OPS", "OVER_REFUSAL_MAX_NEW_TOKENS", "PRESETS", "PROMPT_SETS", "RUBRICS", "SCORE_BATCH_FACTOR",
    "SELECT_JUDGE_MAX_NEW_TOKENS", "STAGE_KEYS",
    "BatchSizes", "BenchmarksConfig", "Condition", "CrossEntropySource", "DataConfig", "EvaluateConfig",
    "ExtractConfig", "GenerateConfig", "GuardJudgeConfig", "InlpConfig", "InterventionSpec", "JudgeSpec",
    "LLMJudgeConfig", "LocalJudgeConfig", "OpenAIGenerateConfig", "OpenAIJudgeConfig", "OverRefusalConfig",
    "RefusalScoreJudgeConfig", "RunConfig", "SelectConfig", "Spec", "SubstringJudgeConfig",
    "at_least", "check_types", "default_conditions", "digest", "documented_yaml", "fraction", "help_of",
    "judge_types", "load_yaml", "non_negative", "parse_judge", "positive", "register_judge", "resolve", "setting",
    "stage_config", "to_plain", "validate",
]
