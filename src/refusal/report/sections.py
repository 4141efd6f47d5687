"""What the report says, independent of its format: a run folder's artifacts read into a :class:`Report` of
sections and blocks (tables, images, texts, completions), which :mod:`.html` and :mod:`.markdown` render.

Every model-written or user-written string stays a plain ``str`` here; the renderers escape it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import io
from ..errors import RefusalError

# The headline metric of each prompt set (as in the paper's table): harmful → how often the model does NOT refuse,
# harmless → how often it DOES.
HEADLINE = {"harmful": ("non_refusal", "non-refusal rate"), "harmless": ("refusal", "refusal rate")}
METRICS = (("refusal", "refusal rate"), ("non_refusal", "non-refusal rate"),
           ("refusal_score_positive", "refusal score > 0"))
MAX_RECORD_ROWS = 200


# ---- blocks ------------------------------------------------------------------------------------------------------


@dataclass
class RateCell:
    """A rate ``{count, n, rate, low, high}`` (low/high: its 95 % interval); ``refusal`` tells which way it points:
    True if a high value means more refusal, False if it means less, None if neither."""

    rate: dict
    refusal: bool | None = None


@dataclass
class Code:
    text: str


@dataclass
class Heat:
    """A number coloured by where it lies in ``[lo, hi]``."""

    value: float | None
    lo: float
    hi: float


@dataclass
class Verdict:
    """One completion under one condition: its text, whether it was judged a refusal, its refusal score."""

    completion: str
    refused: bool | None
    score: float | None


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    kind: str = ""  # a styling hint: "kv", "results", "grid", "completions"
    row_groups: list[int] | None = None  # rows that start a new group (drawn with a rule above)


@dataclass
class Image:
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Text:
    text: str
    kind: str = ""  # "", "note", "warn", "legend" (about colours: HTML only)


@dataclass
class Sub:
    title: str
    level: int = 3


@dataclass
class Completions:
    prompt_set: str
    conditions: list[str]
    rows: list[tuple[str, str | None, list[Verdict | None]]]  # (instruction, category, one verdict per condition)
    descriptions: dict[str, str] = field(default_factory=dict)  # condition → its interventions, in words


@dataclass
class Row:
    """Blocks side by side where there is room (one after the other in Markdown)."""

    parts: list[list]


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


@dataclass
class Card:
    """A headline: ``steps`` are (condition, value) in order, the first being the baseline."""

    title: str
    subtitle: str
    steps: list[tuple[str, Any]]
    refusal: bool | None = None


@dataclass
class Report:
    title: str
    facts: list[tuple[str, str]]
    cards: list[Card]
    sections: list[Section]
    generated: str


# ---- reading the run folder --------------------------------------------------------------------------------------


class Artifacts:
    """The files of a run folder, each read once; optional ones that are missing or unreadable are None (unreadable
    ones are listed in ``problems`` and shown in the report)."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.problems: list[str] = []

    def json(self, name: str) -> Any:
        p = self.dir / name
        if not p.is_file():
            return None
        try:
            return io.read_json(p)
        except (OSError, ValueError) as exc:
            self.problems.append(f"{name}: {exc}")
            return None

    def yaml(self, name: str) -> Any:
        p = self.dir / name
        if not p.is_file():
            return None
        try:
            return io.read_yaml(p)
        except Exception as exc:  # noqa: BLE001 (a broken optional file is reported, not fatal)
            self.problems.append(f"{name}: {exc}")
            return None

    def png(self, name: str) -> bytes | None:
        p = self.dir / name
        if not p.is_file():
            return None
        data = p.read_bytes()
        if not data.startswith(b"\x89PNG"):
            self.problems.append(f"{name}: not a PNG file")
            return None
        return data


# ---- helpers -----------------------------------------------------------------------------------------------------


def is_rate(x: Any) -> bool:
    return isinstance(x, dict) and "rate" in x and isinstance(x.get("rate"), (int, float))


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (str, int, float, bool))


def _leaf(x: Any) -> bool:
    return _scalar(x) or is_rate(x) or (isinstance(x, list) and all(_scalar(v) for v in x) and len(x) <= 12)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _round(x: Any, digits: int) -> float | None:
    v = _num(x)
    return None if v is None else round(v, digits)


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _rate_cell(metric: str, value: Any) -> Any:
    if is_rate(value):
        return RateCell(value, None if metric not in ("refusal", "non_refusal", "refusal_score_positive")
                        else metric != "non_refusal")
    return value


def conditions_of(results: dict) -> list[tuple[str, list[str]]]:
    """Prompt sets and their conditions in the order they appear, baseline first."""
    out = []
    for kind, conds in results.items():
        if isinstance(conds, dict):
            names = list(conds)
            names.sort(key=lambda c: c != "baseline")
            out.append((kind, names))
    return out


def _flat_results(summary: dict) -> dict:
    """``results`` from an older summary that holds only the flat headline rates (no counts or intervals)."""
    out: dict = {}
    for kind, (metric, _) in HEADLINE.items():
        for cond, v in (summary.get(kind) or {}).items():
            n = _dig(summary, "n", kind, cond) or summary.get(f"n_{kind}")
            if _num(v) is None:
                continue
            other = "refusal" if metric == "non_refusal" else "non_refusal"
            if isinstance(n, int):
                k = round(v * n)
                entry = {metric: {"count": k, "n": n, "rate": v}, other: {"count": n - k, "n": n, "rate": 1 - v}}
            else:
                entry = {metric: {"rate": v}, other: {"rate": 1 - v}}
            score = _dig(summary, "refusal_score", kind, cond)
            if _num(score) is not None:
                entry["mean_refusal_score"] = score
            out.setdefault(kind, {})[cond] = entry
    return out


# ---- sections ----------------------------------------------------------------------------------------------------


def build(run_dir: str | Path) -> Report:
    """Read a run folder into a :class:`Report`. A folder without ``summary.json`` is an error; every other
    artifact is optional."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RefusalError(f"No run folder at '{run_dir}'.",
                           "Give the folder a run wrote (runs/<model>/ by default).")
    a = Artifacts(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise RefusalError(f"'{run_dir}' has no summary.json: the run has not been evaluated yet.",
                           f"Run `refusal run` first (or `refusal run --resume {run_dir}` to finish this run).")
    try:
        summary = io.read_json(run_dir / "summary.json")
    except (OSError, ValueError) as exc:
        raise RefusalError(f"'{run_dir / 'summary.json'}' cannot be read ({exc}).",
                           f"Redo the evaluation: `refusal run --resume {run_dir} --from-stage evaluate`.") from None
    if not isinstance(summary, dict):
        raise RefusalError(f"'{run_dir / 'summary.json'}' is not a summary (a JSON object).",
                           f"Redo the evaluation: `refusal run --resume {run_dir} --from-stage evaluate`.")
    config = a.yaml("config.yaml")
    config = config if isinstance(config, dict) else {}
    scores = a.json("scores.json")
    scores = scores if isinstance(scores, dict) else None
    results = summary.get("results") if isinstance(summary.get("results"), dict) else _flat_results(summary)

    from .crosslingual import crosslingual_section, is_crosslingual_run

    per_language = is_crosslingual_run(summary)  # a `refusal crosslingual` folder: its languages hold the results
    sections = [
        None if per_language else _results_section(results),
        None if per_language else _direction_section(a, summary, scores, config),
        _scores_section(a, scores, config),
        _judges_section(a),
        _generic_section(a, "ce", "Cross-entropy", "ce.json", None,
                         "Mean loss (nats per predicted token) and perplexity of the model under each condition."),
        _generic_section(a, "benchmarks", "Benchmarks", "benchmarks.json", None,
                         "Benchmark scores under each condition."),
        _generic_section(a, "magnitude", "Magnitude", "magnitude.json", "magnitude.png",
                         "Rates as the intervention's coefficient is varied."),
        crosslingual_section(a, summary),
        _completions_section(a, config),
        _config_section(a, summary, config),
    ]
    sections = [s for s in sections if s is not None and s.blocks]
    if a.problems:
        sections.append(Section("problems", "Unreadable files",
                                [Text("These files exist but could not be read; their sections are left out.",
                                      "warn"), Table(["file and error"], [[p] for p in a.problems], kind="kv")]))

    model = str(summary.get("model") or config.get("model") or run_dir.name)
    if "/" in model and Path(model).exists():  # a local folder or file: its name (the full path is in the config)
        model = Path(model).name
    facts = [(k, str(v)) for k, v in (
        ("preset", summary.get("preset") or config.get("preset")),
        ("device", summary.get("device")),
        ("dtype", summary.get("dtype")),
        ("new tokens", summary.get("max_new_tokens") or _dig(config, "generate", "max_new_tokens")),
        ("selected", _selected_text(summary, scores)),
        ("stage time", _total_seconds(summary)),
    ) if v not in (None, "")]
    return Report(f"Refusal direction report: {model}", facts, _cards(results), sections,
                  datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _selected_text(summary: dict, scores: dict | None) -> str | None:
    sel = (scores or {}).get("selected") or summary.get("selected")
    if not isinstance(sel, dict) or "layer" not in sel:
        return None
    n_layers = len(scores["bypass"][0]) if scores and scores.get("bypass") else 0
    return f"position {sel.get('pos')}, layer {sel.get('layer')}" + (f" of {n_layers}" if n_layers else "")


def _total_seconds(summary: dict) -> str | None:
    secs = summary.get("stage_seconds")
    if not isinstance(secs, dict):
        return None
    # load_model happens inside the first stage that needs the model: it is part of that stage's seconds
    total = sum(v for k, v in secs.items() if k != "load_model" and _num(v) is not None)
    if not total:
        return None
    return f"{total:.1f} s" if total < 60 else f"{int(total // 60)} min {total % 60:.0f} s"


def _cards(results: dict) -> list[Card]:
    cards = []
    for kind, conds in conditions_of(results):
        if kind not in HEADLINE:
            continue
        metric, label = HEADLINE[kind]
        steps = [(c, RateCell(results[kind][c][metric], metric == "refusal")) for c in conds
                 if is_rate(_dig(results, kind, c, metric))]
        if steps:
            what = ("does the model answer harmful prompts? (higher: refusal bypassed)" if kind == "harmful" else
                    "does the model refuse harmless prompts? (higher: refusal induced)")
            cards.append(Card(f"{kind.capitalize()} prompts: {label}", what, steps, metric == "refusal"))
    return cards


def _results_section(results: dict) -> Section:
    s = Section("results", "Refusal rates")
    s.blocks.append(Text(
        "Every metric per prompt set and condition, with its 95 % Wilson interval. Refusal is judged by substring "
        "match on the completion; the refusal score is the log-odds of refusal tokens at the first generated "
        "position."))
    s.blocks.append(Text("Red: the model refuses; green: it complies. The bar under each rate is its interval.",
                         "legend"))
    rows, groups = [], []
    for kind, conds in conditions_of(results):
        groups.append(len(rows))
        for c in conds:
            m = results[kind][c] if isinstance(results[kind][c], dict) else {}
            n = next((v.get("n") for v in m.values() if is_rate(v) and "n" in v), None)
            rows.append([kind, c, n] + [_rate_cell(key, m.get(key)) for key, _ in METRICS]
                        + [_round(m.get("mean_refusal_score"), 2)])
    if not rows:
        s.blocks.append(Text("summary.json holds no results.", "warn"))
        return s
    s.blocks.append(Table(["prompt set", "condition", "n"] + [label for _, label in METRICS]
                          + ["mean refusal score"], rows, kind="results", row_groups=groups))
    return s


def _direction_section(a: Artifacts, summary: dict, scores: dict | None, config: dict) -> Section:
    s = Section("direction", "Selected direction")
    sel = (scores or {}).get("selected") or summary.get("selected") or {}
    n_layers = len(scores["bypass"][0]) if scores and scores.get("bypass") and scores["bypass"][0] else None
    rows: list[list[Any]] = []
    if sel:
        rows += [["position", sel.get("pos")],
                 ["layer", f"{sel.get('layer')}" + (f" of {n_layers}" if n_layers else "")]]
        for k, label in (("bypass", "bypass (harmful, ablated)"),
                         ("induce", "induce (harmless, added)"),
                         ("kl", "KL (harmless, ablated)"), ("n_passing", "candidates passing")):
            if k in sel:
                rows.append([label, sel[k]])
    base = (scores or {}).get("baseline_refusal_score") or {}
    for kind in ("harmful", "harmless"):
        if _num(base.get(kind)) is not None:
            rows.append([f"baseline score, {kind} val", base[kind]])
    sc = config.get("select") if isinstance(config.get("select"), dict) else {}
    if sc:
        frac = _num(sc.get("max_layer_fraction"))
        rows += [["filters", f"KL < {sc.get('kl_threshold')}, induce > {sc.get('induce_threshold')}"],
                 ["layers scored", f"below {frac:.0%} of depth" if frac is not None else None]]
    frows: list[list[Any]] = []
    path = a.dir / "direction.safetensors"
    if path.is_file():
        try:
            from ..directions.base import Direction

            d = Direction.load(path)
            frows += [["method", d.method], ["hidden size", d.d], ["basis rows (k)", d.k]]
            if d.k == 1 and not d.per_layer:
                frows.append(["norm ‖r‖", float(d.vector.norm())])
            frows += [["model identity", Code(d.model or "—")], ["data digest", Code(d.data_digest or "—")]]
        except Exception as exc:  # noqa: BLE001 (a broken optional file is reported, not fatal)
            a.problems.append(f"direction.safetensors: {exc}")
    left = [Sub("Candidate"), Table(["", ""], rows, kind="kv")] if rows else []
    right = [Sub("Direction file"), Table(["", ""], frows, kind="kv")] if frows else []
    ranked = (scores or {}).get("ranked")
    if isinstance(ranked, list) and ranked and scores:
        positions = scores.get("positions") or []
        rrows = []
        for r, cand in enumerate(ranked[:10]):
            p, la = cand.get("pos"), cand.get("layer")
            vals = []
            for key in ("bypass", "induce", "kl"):
                try:
                    vals.append(scores[key][positions.index(p)][la])
                except (ValueError, IndexError, KeyError, TypeError):
                    vals.append(None)
            rrows.append([r, p, la, *vals])
        right = [Sub("Best candidates"), Table(["rank", "pos", "layer", "bypass", "induce", "KL"], rrows,
                                               caption="Candidates that pass the filters, best first.")] + right
    parts = [p for p in (left, right) if p]
    if parts:
        s.blocks.append(Row(parts))
    return s


def _scores_section(a: Artifacts, scores: dict | None, config: dict) -> Section:
    s = Section("scores", "Selection scores")
    if scores:
        from .plots import score_heatmaps

        sc = config.get("select") if isinstance(config.get("select"), dict) else {}
        n_layers = len(scores["bypass"][0]) if scores.get("bypass") and scores["bypass"][0] else None
        frac = _num(sc.get("max_layer_fraction"))
        try:
            png = score_heatmaps(scores, kl_threshold=_num(sc.get("kl_threshold")),
                                 induce_threshold=_num(sc.get("induce_threshold")),
                                 max_layer=int(frac * n_layers) if frac is not None and n_layers else None)
        except Exception as exc:  # noqa: BLE001 (a malformed optional file is reported, not fatal)
            a.problems.append(f"scores.json: cannot draw the heatmaps ({exc})")
            png = None
        if png:
            s.blocks += [Text("Each candidate direction (post-instruction position × layer) scored on the validation "
                              "prompts. Grey: not scored (layers skipped by the stride, or candidates pruned by the "
                              "induce filter). Dots: candidates that pass the filters; box: the selected one."),
                         Image(png, "bypass, induce and KL heatmaps over position and layer")]
    png = a.png("scores.png")
    if png:
        s.blocks += [Sub("Scores by layer (scores.png)"), Image(png, "selection scores by layer (scores.png)")]
    return s


def _judges_section(a: Artifacts) -> Section | None:
    data = a.json("judges.json")
    if data is None:
        return None
    s = Section("judges", "Judges side by side")
    s.blocks.append(Text("The same completions judged by each judge: one column per judge and label."))
    ok = isinstance(data, dict) and all(isinstance(c, dict) and all(isinstance(j, dict) for j in c.values())
                                        for c in data.values())
    if not ok:
        s.blocks += generic_blocks(data)
        return s
    for kind, conds in data.items():
        columns: list[tuple[str, str | None]] = []
        cells: dict[tuple[str, str, str | None], Any] = {}
        for cond, judges in conds.items():
            for judge, v in judges.items():
                if isinstance(v, dict) and isinstance(v.get("rates"), dict):
                    items = list(v["rates"].items())
                else:
                    items = [(None, v)]
                for label, val in items:
                    if (judge, label) not in columns:
                        columns.append((judge, label))
                    cells[(cond, judge, label)] = val
        rows = []
        for cond in conds:
            row: list[Any] = [cond]
            for judge, label in columns:
                v = cells.get((cond, judge, label))
                row.append(RateCell(v, _points_to_refusal(label or judge)) if is_rate(v) else v)
            rows.append(row)
        s.blocks += [Sub(f"{kind} prompts"),
                     Table(["condition"] + [f"{j} · {lab}" if lab else j for j, lab in columns], rows,
                           kind="results")]
    return s


def _points_to_refusal(label: str) -> bool | None:
    label = label.lower()
    if "non" in label or "comply" in label or "complied" in label:
        return False
    if "refus" in label:
        return True
    return None


def _generic_section(a: Artifacts, sid: str, title: str, json_name: str, png_name: str | None,
                     intro: str) -> Section | None:
    data = a.json(json_name)
    png = a.png(png_name) if png_name else None
    if data is None and png is None:
        return None
    s = Section(sid, title, [Text(intro)])
    if data is not None:
        s.blocks += generic_blocks(data)
    if png:
        s.blocks.append(Image(png, f"{title} ({png_name})", png_name or ""))
    return s


def _completions_section(a: Artifacts, config: dict) -> Section | None:
    judged = a.json("judgements.json")
    source = "judgements.json"
    if not isinstance(judged, dict):
        judged, source = a.json("completions.json"), "completions.json"
    if not isinstance(judged, dict):
        return None
    described = {}
    for c in _dig(config, "generate", "conditions") or []:
        if isinstance(c, dict):
            ivs = [iv for iv in c.get("interventions") or [] if isinstance(iv, dict)]
            described[(c.get("prompts"), c.get("name"))] = "; ".join(_intervention_text(iv) for iv in ivs)
    s = Section("completions", "Completions side by side")
    s.blocks.append(Text(f"Greedy completions of the test prompts under each condition ({source}). Each cell is "
                         "marked refused or not refused by the substring judge, with its first-token refusal score. "
                         "Rows where a condition changed the verdict of the baseline are marked."))
    for kind, conds in judged.items():
        if not isinstance(conds, dict):
            continue
        names = [c for c in conds if isinstance(conds[c], list)]
        names.sort(key=lambda c: c != "baseline")
        if not names:
            continue
        n = max(len(conds[c]) for c in names)
        rows = []
        for i in range(n):
            instruction, category = "", None
            verdicts: list[Verdict | None] = []
            for c in names:
                rec = conds[c][i] if i < len(conds[c]) and isinstance(conds[c][i], dict) else None
                if rec is None:
                    verdicts.append(None)
                    continue
                instruction = instruction or str(rec.get("instruction") or "")
                category = category or (str(rec["category"]) if rec.get("category") else None)
                refused = rec.get("refused")
                verdicts.append(Verdict(str(rec.get("completion") or ""),
                                        None if refused is None else bool(refused), _num(rec.get("refusal_score"))))
            rows.append((instruction, category, verdicts))
        s.blocks.append(Completions(kind, names, rows, {c: described.get((kind, c), "") for c in names}))
    return s if len(s.blocks) > 1 else None


def _config_section(a: Artifacts, summary: dict, config: dict) -> Section:
    s = Section("config", "Configuration and provenance")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
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

    digests = config.get("digests") if isinstance(config.get("digests"), dict) else {}
    digests = digests or (summary.get("digests") if isinstance(summary.get("digests"), dict) else {})
    secs = summary.get("stage_seconds") if isinstance(summary.get("stage_seconds"), dict) else {}
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


# ---- any JSON as tables ------------------------------------------------------------------------------------------


def _depth(x: Any) -> int:
    if _leaf(x):
        return 0
    if isinstance(x, dict):
        return 1 + max((_depth(v) for v in x.values()), default=0)
    return 1


def _matrix(x: Any) -> bool:
    return (isinstance(x, list) and bool(x) and all(isinstance(r, list) and r for r in x)
            and all(_num(v) is not None or v is None for r in x for v in r))


def _heat_rows(values: list[list[Any]], row_labels: list[str], col_labels: list[str]) -> Table:
    nums = [v for r in values for v in r if _num(v) is not None]
    lo, hi = (min(nums), max(nums)) if nums else (0.0, 1.0)
    rows = [[row_labels[i] if i < len(row_labels) else str(i)] + [Heat(_num(v), lo, hi) for v in r]
            for i, r in enumerate(values)]
    width = max(len(r) for r in values)
    cols = [""] + [col_labels[j] if j < len(col_labels) else str(j) for j in range(width)]
    return Table(cols, rows, kind="grid")


def generic_blocks(obj: Any, level: int = 3) -> list:
    """Tables for any JSON value: a mapping of mappings of numbers is a table (rows: outer keys, columns: inner keys),
    deeper mappings become one sub-heading per key, lists of records a table, matrices a colour-coded grid, and
    ``{count, n, rate, low, high}`` objects rates with their intervals."""
    if isinstance(obj, dict):
        values = obj.get("values", obj.get("matrix"))
        if _matrix(values):
            rl = obj.get("rows") or obj.get("row_labels") or []
            cl = obj.get("cols") or obj.get("columns") or obj.get("col_labels") or []
            blocks: list = []
            if isinstance(obj.get("metric"), str):
                blocks.append(Text(f"metric: {obj['metric']}", "note"))
            return blocks + [_heat_rows(values, [str(x) for x in rl], [str(x) for x in cl])]
    if _leaf(obj):
        return [Table(["", ""], [["value", obj]], kind="kv")]
    if _matrix(obj):
        return [_heat_rows(obj, [], [])]
    if isinstance(obj, list):
        if all(isinstance(r, dict) for r in obj):
            cols = list(dict.fromkeys(k for r in obj for k in r))
            rows = [[_cell(r.get(k), k) for k in cols] for r in obj[:MAX_RECORD_ROWS]]
            blocks = [Table(cols, rows)]
            if len(obj) > MAX_RECORD_ROWS:
                blocks.append(Text(f"First {MAX_RECORD_ROWS} of {len(obj)} records.", "note"))
            return blocks
        return [Table(["", ""], [[str(i), _cell(v)] for i, v in enumerate(obj[:MAX_RECORD_ROWS])], kind="kv")]
    if not isinstance(obj, dict):
        return [Text(str(obj))]
    leaves = {k: v for k, v in obj.items() if _leaf(v)}
    nested = {k: v for k, v in obj.items() if not _leaf(v)}
    blocks = []
    if leaves:
        blocks.append(Table(["", ""], [[k, _cell(v, k)] for k, v in leaves.items()], kind="kv"))
    two = {k: v for k, v in nested.items() if isinstance(v, dict) and _depth(v) == 1}
    if len(two) >= 1 and len(two) == len(nested):
        cols = list(dict.fromkeys(k for v in two.values() for k in v))
        rows = [[k] + [_cell(v.get(c), c) for c in cols] for k, v in two.items()]
        blocks.append(Table([""] + cols, rows, kind="results"))
        return blocks
    for k, v in nested.items():
        blocks.append(Sub(str(k), min(level, 5)))
        blocks += generic_blocks(v, level + 1)
    return blocks


def _cell(v: Any, key: str = "") -> Any:
    if is_rate(v):
        return RateCell(v, _points_to_refusal(str(key)))
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return v


__all__ = ["Artifacts", "Card", "Code", "Completions", "Heat", "Image", "RateCell", "Report", "Row", "Section", "Sub",
           "Table", "Text", "Verdict", "build", "generic_blocks", "is_rate"]
