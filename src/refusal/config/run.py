"""A run's whole config (:class:`RunConfig`: the model, the device, one section per stage), its batch sizes per
stage, and what each stage's digest covers (:data:`STAGE_KEYS`, :func:`stage_config`, :func:`digest`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .defaults import CROSS_ENTROPY_BATCH, DEFAULT_MODEL, EXTRACT_BATCH, GENERATE_BATCH, SCORE_BATCH_FACTOR
from .evaluate import EvaluateConfig
from .schema import Spec, _hints, at_least, fraction, setting, to_plain
from .sections import DataConfig, ExtractConfig, GenerateConfig, SelectConfig


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
    out = {k: _digest_view(config[k], hints[k]) for k in STAGE_KEYS[stage] if k in config}
    sel = out.get("select")
    if isinstance(sel, dict) and not sel.get("keep_refusal"):  # the method matters only with keep_refusal: the run
        sel.pop("keep_refusal_method", None)                     # folders made before it keep their digests
        sel.pop("keep_refusal_max_release", None)
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
