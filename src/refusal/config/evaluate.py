"""The ``evaluate`` section: the judges, and the option sections (cross-entropy sources, lm-eval benchmarks, the
over-refusal check), each a :class:`~refusal.config.schema.Spec` with its parser."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import RefusalError
from .checks import _check_fields, _parsed
from .defaults import CROSS_ENTROPY_BATCH, OVER_REFUSAL_MAX_NEW_TOKENS
from .judges import SubstringJudgeConfig, _default_judges, _parse_judges, parse_judge
from .schema import Spec, at_least, non_negative, positive, setting


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
