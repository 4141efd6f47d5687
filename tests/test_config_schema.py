"""The typed config schema: a description on every field, `refusal config` as documented YAML that reads back as the
defaults, wrong values refused with the setting's name, per-stage batch sizes outside the digests, and the stage
digests of configs written before the schema unchanged."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from typer.testing import CliRunner

from refusal import config as C
from refusal.config import STAGE_KEYS, RunConfig, digest, documented_yaml, resolve, stage_config
from refusal.errors import RefusalError


def _sections() -> list[type]:
    """Every dataclass of the schema: RunConfig's sections, nested ones, conditions, and the option sections."""
    seen: list[type] = []
    todo: list[type] = [RunConfig, C.Condition, C.InterventionSpec, *[s for s in C.JUDGE_SCHEMAS.values() if s]]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for t in typing.get_type_hints(cls).values():
            for a in (t, *typing.get_args(t)):
                if dataclasses.is_dataclass(a) and isinstance(a, type):
                    todo.append(a)
    return seen


def test_every_field_has_a_description():
    sections = _sections()
    names = {c.__name__ for c in sections}
    assert {"DataConfig", "GenerateConfig", "OpenAIGenerateConfig", "EvaluateConfig", "CrossEntropySource",
            "BenchmarksConfig", "OverRefusalConfig", "InlpConfig", "GuardJudgeConfig"} <= names
    missing = [f"{c.__name__}.{f.name}" for c in sections for f in dataclasses.fields(c)
               if len(C.help_of(f).strip()) < 8]
    assert not missing, missing


def test_refusal_config_prints_every_setting_under_its_description_and_reads_back_as_the_defaults():
    from refusal.cli import app

    r = CliRunner().invoke(app, ["config"])
    assert r.exit_code == 0, r.output
    text = r.output
    assert text == documented_yaml()
    parsed = yaml.safe_load(text)
    # every field of every nested section is there, each right under a comment line
    lines = text.splitlines()

    def walk(cls: type, d: dict, indent: str) -> None:
        for f in dataclasses.fields(cls):
            assert f.name in d, f"{cls.__name__}.{f.name} is not printed"
            at = next(i for i, line in enumerate(lines) if line.startswith(f"{indent}{f.name}:"))
            assert lines[at - 1].lstrip().startswith("#"), lines[at - 1]
            t = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(t) and not issubclass(t, C.Spec):
                walk(t, d[f.name], indent + "  ")

    walk(RunConfig, parsed, "")
    assert "# sequences per forward when reading activations" in text  # extract.batch_size, documented
    assert "max_new_tokens (default 64)" in text and "max_new_tokens (default 8)" in text  # option sections too
    # it reads back as the defaults (every key a file names wins over the preset), with the same digests
    for has_gpu in (False, True):
        back, default = resolve(None, parsed, has_gpu=has_gpu), RunConfig()
        assert back.to_dict() == {**default.to_dict(), "preset": "paper" if has_gpu else "cpu"}
        assert all(digest(back.stage_config(s)) == digest(default.stage_config(s)) for s in STAGE_KEYS)


def test_refusal_config_of_a_file_reads_back_as_that_config(tmp_path):
    from refusal.cli import app

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({
        "batch_size": 4, "extract": {"batch_size": 2},
        "evaluate": {"judges": [{"type": "substring", "phrases": ["no way"]}, {"type": "refusal_score",
                                                                             "threshold": 1}],
                     "benchmarks": {"tasks": ["refusal_mmlu"], "limit": 5},
                     "over_refusal": {"contrast": "builtin"},
                     "cross_entropy": [{"name": "w", "source": "wiki.txt", "max_tokens": 100}]},
        "select": {"objective": {"type": "substring"}}}))
    r = CliRunner().invoke(app, ["config", "--config", str(p)])
    assert r.exit_code == 0, r.output
    assert "#   tasks (required" not in r.output and "tasks (default [])" in r.output
    want = resolve(p)
    back = resolve(None, yaml.safe_load(r.output))
    assert back.to_dict() == want.to_dict() and back.batch_sizes(True) == want.batch_sizes(True)


@pytest.mark.parametrize("overrides, message", [
    ({"data": {"n_train": "many"}}, "data.n_train must be a whole number (got 'many')"),
    ({"data": {"n_val": 0}}, "data.n_val must be at least 1 (got 0)"),
    ({"select": {"ranking": "upward"}}, "select.ranking must be global, local or both (got 'upward')"),
    ({"select": {"max_layer_fraction": 1.5}}, "select.max_layer_fraction must be in (0, 1]"),
    ({"extract": {"batch_size": 0}}, "extract.batch_size must be at least 1"),
    ({"extract": {"inlp": {"classifier": "tree"}}}, "extract.inlp.classifier must be logistic or svm"),
    ({"extract": {"methods": ["inlp"]}}, "extract.methods must include diff_means"),
    ({"generate": {"batch_size": "big"}}, "generate.batch_size must be a whole number or null"),
    ({"generate": {"openai": {"timeout": "slow"}}}, "generate.openai.timeout must be a number"),
    ({"generate": {"kl": "yes"}}, "generate.kl must be true or false"),
    ({"evaluate": {"ce_batch_size": 2.5}}, "evaluate.ce_batch_size must be a whole number or null"),
    ({"evaluate": {"benchmarks": {"tasks": ["t"], "limit": "all"}}}, "evaluate.benchmarks.limit must be"),
    ({"evaluate": {"benchmarks": {"tasks": ["t"], "batch_size": 0}}}, "evaluate.benchmarks.batch_size must be > 0"),
    ({"evaluate": {"over_refusal": {"max_new_tokens": "64"}}}, "evaluate.over_refusal.max_new_tokens must be"),
    ({"evaluate": {"cross_entropy": [{"name": "w", "source": "x", "seq_len": "long"}]}},
     "evaluate.cross_entropy[0].seq_len must be a whole number"),
    ({"evaluate": {"judges": [{"type": "refusal_score", "threshold": "high"}]}},
     "'threshold' in the 'refusal_score' judge spec is 'high'; expected float"),
    ({"evaluate": {"judges": [{"type": "llm", "model": "m", "max_new_tokens": 0}]}}, "must be > 0"),
    ({"evaluate": {"over_refusal": {"judge": {"type": "guard"}}}}, "The 'guard' judge spec needs 'model'"),
    ({"select": {"objective": {"type": "openai", "url": "h:1", "model": "m"}}}, "http:// or https://"),
    ({"refusal_tokens": "Sorry"}, "refusal_tokens must be a list of text or null"),
])
def test_wrong_values_are_refused_naming_the_setting(overrides, message):
    with pytest.raises(RefusalError) as e:
        resolve(None, overrides, has_gpu=False)
    assert message in str(e.value), str(e.value)
    assert e.value.fix


def test_yaml_exponent_read_as_text_gets_the_spelling_that_parses(tmp_path):
    """PyYAML (YAML 1.1) reads 1.0e9 as a string; the error says so and gives 1.0e+9, which parses."""
    p = tmp_path / "c.yaml"
    p.write_text("select: {kl_threshold: 1.0e9}\n")
    with pytest.raises(RefusalError) as e:
        resolve(p, has_gpu=False)
    assert "write kl_threshold: 1.0e+9" in e.value.fix
    p.write_text("select: {kl_threshold: 1.0e+9}\n")
    assert resolve(p, has_gpu=False).select.kl_threshold == 1e9


def test_batch_sizes_are_named_per_stage_and_stay_out_of_the_digests():
    cfg = resolve(None, None, has_gpu=False)
    assert cfg.batch_sizes(on_gpu=True) == C.BatchSizes(extract=64, select=4096, generate=512, cross_entropy=32)
    assert cfg.batch_sizes(on_gpu=False) == C.BatchSizes(extract=16, select=16, generate=64, cross_entropy=8)
    one = resolve(None, {"batch_size": 4}, has_gpu=False)  # --batch-size: extract, select (through it), generate
    assert one.batch_sizes(on_gpu=True) == C.BatchSizes(extract=4, select=256, generate=4, cross_entropy=32)
    own = resolve(None, {"batch_size": 4, "extract": {"batch_size": 2}, "select": {"batch_size": 300},
                         "generate": {"batch_size": 9}}, has_gpu=False)
    assert own.batch_sizes(on_gpu=True) == C.BatchSizes(extract=2, select=300, generate=9, cross_entropy=32)
    assert own.to_dict()["extract"]["batch_size"] == 2  # saved with the run ...
    assert "batch_size" not in cfg.to_dict()["extract"]  # ... once set
    for s in STAGE_KEYS:  # ... and in no digest
        assert digest(own.stage_config(s)) == digest(cfg.stage_config(s))
        assert stage_config(own.to_dict(), s) == cfg.stage_config(s)


def test_stage_digests_of_configs_written_before_the_schema_are_unchanged():
    """Pinned from the config module before the typed schema: every existing run folder keeps its digests."""
    want = {False: {"extract": "d8d19e33c6b38155", "select": "01c287d6eec9d111", "generate": "957e4a2b0fdd5494",
                    "evaluate": "f39f006bb1503bd7"},
            True: {"extract": "25e565b0c816263c", "select": "b5c0ab7f3af27116", "generate": "6643683d284c4b1c",
                   "evaluate": "2f4ce35a7e0c29c9"}}
    for has_gpu, digests in want.items():
        cfg = resolve(None, None, has_gpu=has_gpu)
        assert {s: digest(cfg.stage_config(s)) for s in STAGE_KEYS} == digests
    options = {"evaluate": {"judges": [{"type": "substring", "phrases": ["no"]}, {"type": "refusal_score",
                                                                                 "threshold": 1}],
                            "over_refusal": {"contrast": "builtin"}, "benchmarks": {"tasks": ["t"], "limit": 5}}}
    assert digest(resolve(None, options, has_gpu=False).stage_config("evaluate")) == "0f8286de3847060a"


def test_option_sections_are_typed_and_hold_the_keys_given():
    cfg = resolve(None, {"evaluate": {"over_refusal": {"contrast": "builtin"},
                                      "judges": [{"type": "guard", "model": "m", "format": "wildguard"}]}},
                  has_gpu=False)
    o = cfg.evaluate.over_refusal
    assert isinstance(o, C.OverRefusalConfig) and dict(o) == {"contrast": "builtin"}
    assert o.max_new_tokens == C.OVER_REFUSAL_MAX_NEW_TOKENS == 64 and o.judge.type == "substring"
    g = cfg.evaluate.judges[0]
    assert isinstance(g, C.GuardJudgeConfig) and g.batch_size == 8 and g.format == "wildguard"
    assert dict(g) == {"type": "guard", "model": "m", "format": "wildguard"}
    assert g.options()["max_new_tokens"] is None and "type" not in g.options()
    assert not cfg.evaluate.benchmarks and cfg.evaluate.benchmarks.batch_size == 8  # off, with its defaults
    assert cfg.to_dict()["evaluate"]["benchmarks"] == {}
    assert resolve(None, cfg.to_dict(), has_gpu=False).to_dict() == cfg.to_dict()


def test_the_judges_read_their_options_from_the_schema():
    from refusal.evaluation.judges import make_judge, validate_spec
    from refusal.evaluation.judges.guard import FORMATS
    from refusal.evaluation.judges.llm import RUBRICS

    assert set(RUBRICS) == set(C.RUBRICS) and tuple(FORMATS) == C.GUARD_FORMATS
    assert validate_spec({"type": "openai", "url": "http://h/v1", "model": "m"})["max_tokens"] == \
        C.JUDGE_MAX_NEW_TOKENS
    assert make_judge(C.SubstringJudgeConfig(phrases=["nope"])).judge([("q", "nope, never")])[0].refused
    assert make_judge({"type": "refusal_score", "threshold": 1}).threshold == 1.0
