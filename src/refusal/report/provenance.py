"""The configuration and provenance section: the run's settings, data sources and splits, its conditions with
their interventions in words, and each stage's digest, time and status."""

from __future__ import annotations

import json
from typing import Any

from .artifacts import Artifacts
from .blocks import Code, Section, Sub, Table, Text
from .values import _dig, _num, _scalar, as_dict


def _total_seconds(summary: dict) -> str | None:
    secs = summary.get("stage_seconds")
    if not isinstance(secs, dict):
        return None
    # load_model happens inside the first stage that needs the model: it is part of that stage's seconds
    total = sum(v for k, v in secs.items() if k != "load_model" and _num(v) is not None)
    if not total:
        return None
    return f"{total:.1f} s" if total < 60 else f"{int(total // 60)} min {total % 60:.0f} s"


def _config_section(a: Artifacts, summary: dict, config: dict) -> Section:
    s = Section("config", "Configuration and provenance")
    data = as_dict(config.get("data"))
    rows: list[list[Any]] = []
    for label, v in (("model", config.get("model") or summary.get("model")),
                     ("preset", config.get("preset") or summary.get("preset")),
                     ("device", summary.get("device") or config.get("device")),
                     ("dtype", summary.get("dtype") or config.get("dtype")),
                     ("system prompt", config.get("system_prompt")),
                     ("batch size", config.get("batch_size")),
                     ("config digest", Code(str(config["digest"])) if config.get("digest") else None)):
        if v is not None:
            rows.append([label, v])
    for key in ("harmful", "harmless", "harmful_test", "harmless_test"):
        if data.get(key):
            rows.append([f"data: {key.replace('_', ' ')}", Code(str(data[key]))])
    if data:
        rows.append(["split sizes asked (train / val / test per kind)",
                     f"{data.get('n_train')} / {data.get('n_val')} / {data.get('n_test')}"])
        rows.append(["seed, filter by baseline refusal", f"{data.get('seed')}, {data.get('filter')}"])
    for key in ("select", "generate"):
        part = config.get(key)
        if isinstance(part, dict):
            flat = ", ".join(f"{k}={v}" for k, v in part.items() if _scalar(v))
            if flat:
                rows.append([f"{key} settings", Code(flat)])
    if rows:
        s.blocks.append(Table(["", ""], rows, kind="kv"))

    splits = a.json("splits.json")
    if isinstance(splits, dict):
        srows = []
        for kind in ("harmful", "harmless"):
            parts = splits.get(kind)
            if isinstance(parts, dict):
                srows.append([kind] + [len(parts.get(sp) or []) if isinstance(parts.get(sp), list) else None
                                       for sp in ("train", "val", "test")])
        if srows:
            s.blocks += [Sub("Prompts used (splits.json)"), Table(["kind", "train", "val", "test"], srows)]
        kept = splits.get("filtered")
        if isinstance(kept, dict) and kept:
            s.blocks.append(Text("Kept by the baseline-refusal filter: "
                                 + ", ".join(f"{k} {v}" for k, v in kept.items()), "note"))

    conds = _dig(config, "generate", "conditions")
    if isinstance(conds, list) and conds:
        crows = []
        for c in conds:
            if not isinstance(c, dict):
                continue
            ivs = c.get("interventions") or []
            desc = "; ".join(_intervention_text(iv) for iv in ivs if isinstance(iv, dict)) or "none (the model as is)"
            crows.append([c.get("prompts"), c.get("name"), desc])
        s.blocks += [Sub("Conditions"), Table(["prompt set", "condition", "interventions"], crows)]

    digests = as_dict(config.get("digests")) or as_dict(summary.get("digests"))
    secs = as_dict(summary.get("stage_seconds"))
    stages = list(dict.fromkeys([*digests, *(k for k in secs if k != "load_model")]))
    if stages:
        drows = []
        for st in stages:
            done = a.json(f"{st}.done.json")
            done = done if isinstance(done, dict) else {}
            status = None
            if done and digests.get(st):
                status = "finished" if done.get("digest") == digests[st] else "stale (another config)"
            elif digests.get(st):
                status = "not finished" if not done else None
            drows.append([st, Code(str(digests.get(st))) if digests.get(st) else None,
                          _num(secs.get(st)) if st in secs else _num(done.get("seconds")),
                          done.get("finished_at"), status])
        if _num(secs.get("load_model")) is not None:
            drows.append(["(model load, inside the first stage)", None, secs["load_model"], None, None])
        s.blocks += [Sub("Stages"), Table(["stage", "digest", "seconds", "finished at", "status"], drows,
                                          caption="Each stage's digest hashes its config keys and the digests "
                                                  "of the stages before it (extract: also the model's identity "
                                                  "and dtype).")]
    return s


def _intervention_text(iv: dict) -> str:
    parts = [f"{iv.get('op')} {iv.get('direction')}"]
    for k in ("coeff", "alpha"):
        if iv.get(k) not in (None, 1.0, 1):
            parts.append(f"{k}={iv[k]}")
    for k in ("layers", "sites"):
        if iv.get(k) is not None:
            parts.append(f"{k}={json.dumps(iv[k])}")
    if iv.get("tokens") not in (None, "all"):
        parts.append(f"tokens={iv['tokens']}")
    return " ".join(parts)
