"""Resolving a run's config: defaults, then a preset, then a YAML file, then CLI flags (:func:`resolve`), every
value checked against the schema before anything runs, and the checks that span settings (:func:`validate`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ..errors import RefusalError
from ..names import check_scope
from .checks import _check_fields, _parsed
from .conditions import OPS, PROMPT_SETS, Condition, InterventionSpec
from .presets import PRESETS
from .run import RunConfig
from .schema import Spec, _default, _hints, to_plain


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


def _build(d: dict) -> RunConfig:
    return RunConfig(**_parsed(d, RunConfig, ""))


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


def keep_refusal_auto(method: str) -> Condition:
    """The condition ``select.keep_refusal`` adds with ``method``: the harmful prompts under the selected
    direction's ablation, gated per prompt by the keep condition (conditional), or under the ``kept`` direction's
    ablation (orthogonal)."""
    if method == "orthogonal":
        return Condition(KEEP_REFUSAL_CONDITION, "harmful", [InterventionSpec("ablate", direction="kept")])
    return Condition(KEEP_REFUSAL_CONDITION, "harmful", [InterventionSpec("ablate")])


def _add_keep_refusal_condition(cfg: RunConfig) -> None:
    """With ``select.keep_refusal``, the condition of ``select.keep_refusal_method`` (:func:`keep_refusal_auto`),
    unless the user wrote their own (a harmful condition named keep_refusal, or, orthogonal, one that ablates
    ``kept``). The automatic conditions added earlier (a saved config's, exactly as added) are dropped first, so
    that turning the option off, or changing the method, works on a resumed run."""
    autos = [keep_refusal_auto(m) for m in ("conditional", "orthogonal")]
    cfg.generate.conditions = [c for c in cfg.generate.conditions if c not in autos]
    if not cfg.select.keep_refusal:
        return
    blank = [c for c in cfg.select.keep_refusal if not c.strip()]
    if blank:
        raise RefusalError(f"select.keep_refusal holds an empty category name ({cfg.select.keep_refusal!r}).",
                           "Name each category to keep, e.g. keep_refusal: [Sexual content, Violence].")
    method = cfg.select.keep_refusal_method
    if any(c.name == KEEP_REFUSAL_CONDITION and c.prompts == "harmful" for c in cfg.generate.conditions):
        return
    if method == "orthogonal" and any(iv.direction == "kept" for c in cfg.generate.conditions
                                      for iv in c.interventions):
        return
    cfg.generate.conditions.append(keep_refusal_auto(method))


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
