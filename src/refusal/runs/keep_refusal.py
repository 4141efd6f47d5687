"""``select.keep_refusal`` in a run: the select-stage artifacts (per-category directions, the orthogonal ``kept``
direction, the conditional method's keep condition), the generate stage's per-prompt routing, and the summary's
keep-refusal fields. docs/keep-refusal.md describes both methods.

Conditional method (the default; CAST, Lee et al. 2024): the condition (:mod:`refusal.directions.condition`) is
fitted at select on the harmful train prompts at every candidate layer and its layer chosen on the val prompts
(``keep_condition.safetensors``). At generate, the test prompts are classified with one batched forward up to the
condition's layer, with no intervention; the condition ``keep_refusal``'s rows then get its interventions (the
selected direction's ablation) only where the prompt was routed to release, and none where it was routed to keep.
Every condition's rows already decode with their own interventions (:meth:`~refusal.interventions.hooks.Plan.rows`),
so the gate is exactly a per-row choice of interventions, decided before prefill: no hook decides anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import io
from ..batching import console
from ..config import KEEP_REFUSAL_CONDITION, Condition
from ..directions.base import Direction, DirectionSet
from ..directions.diff_means import Candidates
from ..errors import DamagedFileError, RefusalError

if TYPE_CHECKING:
    from .pipeline import Run

CONDITION_FILE = "keep_condition.safetensors"


def conditional(run: Run) -> bool:
    """Whether this run keeps refusal with the conditional method."""
    return bool(run.cfg.select.keep_refusal) and run.cfg.select.keep_refusal_method == "conditional"


def candidate_layers(run: Run, n_layers: int) -> list[int]:
    """The layers select scores (stride, depth limit): where the condition may read."""
    s = run.cfg.select
    return [i for i in range(0, n_layers, s.layer_stride) if i < int(s.max_layer_fraction * n_layers)] or [0]


def select_outputs(run: Run, splits: dict, cands: Candidates, chosen: Direction, ranked_set: DirectionSet) -> list[str]:
    """One direction per category of the harmful train split at the selected component (categories.safetensors,
    categories.json); the released categories' direction made orthogonal to the kept ones' (``kept`` in the ranked
    set: the orthogonal method's edit, and a diagnostic of the conditional one); with the conditional method, the
    keep condition (keep_condition.safetensors)."""
    from ..directions.categories import category_directions, keep_refusal_direction, records_by_category

    keep = list(run.cfg.select.keep_refusal)
    method = run.cfg.select.keep_refusal_method
    train = splits["harmful"]["train"]
    by_cat = records_by_category(train)
    gone = [c for c in keep if c not in by_cat]
    if gone:
        raise RefusalError(f"After filtering by baseline refusal the harmful train split holds no prompt of the "
                           f"categories to keep {gone} (it has: {', '.join(by_cat) or 'none'}).",
                           "Set data.filter: false (--no-filter), or raise data.n_train.")
    released = [c for c in by_cat if c not in keep]
    if not released:
        raise RefusalError(f"After filtering by baseline refusal only kept categories are left ({', '.join(keep)}).",
                           "Set data.filter: false (--no-filter), or raise data.n_train.")
    assert chosen.pos is not None  # the selected direction was made at a position (select's direction())
    i = cands.positions.index(chosen.pos)
    dirs = category_directions(run.model, run.tokenizer, {c: run.prompts(r) for c, r in by_cat.items()},
                               cands.harmless_mean[i, chosen.layer], chosen.pos, chosen.layer,
                               batch_size=run.batch_size, model_name=chosen.model)
    for d in dirs.values():
        d.data_digest = chosen.data_digest
        d.extra["n_harmless"] = cands.n_harmless
    kept: Direction | None = None
    orthogonal_error = None
    try:
        kept = keep_refusal_direction(dirs, released, keep)
    except RefusalError as exc:
        if method == "orthogonal":
            raise
        orthogonal_error = exc.problem  # a diagnostic only, under the conditional method
    if kept is not None:
        ranked_set["kept"] = kept
    dirs.save(run.dir / "categories.safetensors")
    names = list(dirs)
    sim = dirs.similarity()
    sel_unit = chosen.vector / chosen.vector.norm()
    info: dict[str, Any] = {
        "method": method, "pos": chosen.pos, "layer": chosen.layer, "kept": keep, "released": released,
        "n_train": {c: len(r) for c, r in by_cat.items()},
        "uncategorised_train": len(train) - sum(len(r) for r in by_cat.values()),
        "cosine_with_selected": {c: round(float(d.vector @ sel_unit / d.vector.norm()), 6) for c, d in dirs.items()},
        "similarity": {"categories": names, "matrix": [[round(float(x), 6) for x in row] for row in sim.tolist()]},
    }
    if kept is not None:
        info.update({"norm_fraction": kept.extra["norm_fraction"],
                     "cosine_kept_direction": kept.extra["cosine_with_categories"],
                     "cosine_kept_direction_selected": round(float(kept.vector @ sel_unit / kept.vector.norm()), 6)})
    else:
        info.update({"norm_fraction": None, "orthogonal_not_made": orthogonal_error})
    outputs = ["categories.safetensors"]
    if method == "conditional":
        cond = fit_condition(run, cands.n_layers, keep, released)
        cond.save(run.dir / CONDITION_FILE)
        outputs.append(CONDITION_FILE)
        info["condition"] = {"file": CONDITION_FILE, "layer": cond.layer, **cond.info}
        oof = cond.info["out_of_fold"]
        console.print(f"Keep refusal for {', '.join(keep)} (conditional): the condition reads layer {cond.layer}; "
                      f"out of fold it releases {oof['released_recall']:.0%} of released prompts and "
                      f"{oof['kept_released']:.0%} of kept ones (AUC {oof['auc']}); released: {', '.join(released)}")
    elif kept is not None:
        console.print(f"Keep refusal for {', '.join(keep)} (orthogonal); released {', '.join(released)}: the "
                      f"released direction keeps {kept.extra['norm_fraction']:.1%} of its norm outside the kept "
                      "categories' span")
    io.write_json(run.dir / "categories.json", info)
    return outputs + ["categories.json"]


def fit_condition(run: Run, n_layers: int, keep: list[str], released: list[str]) -> Any:
    """The keep condition, cross-validated on every categorised harmful train and val prompt (before the
    baseline-refusal filter: the condition learns the category, not whether the model refuses), read as the mean over
    each prompt's own tokens at every layer select may score."""
    from ..directions.condition import fit_keep_condition, prompt_activations
    from ..templates import pre_instruction_length

    layers = candidate_layers(run, n_layers)
    raw = run.inputs.splits["harmful"]
    recs = [r for split in ("train", "val") for r in raw[split]
            if r.get("category") is not None and str(r["category"]).strip()]
    skip = pre_instruction_length(run.tokenizer, run.cfg.system_prompt, run.cfg.data.thinking)
    acts = prompt_activations(run.model, run.tokenizer, run.prompts(recs), layers, pool="mean", skip=skip,
                              batch_size=run.batch_size,
                              description="Keep condition: activations of the harmful train and val prompts")
    return fit_keep_condition(acts, [str(r["category"]) for r in recs], layers, keep, released, pool="mean",
                              skip=skip, max_kept_release=run.cfg.select.keep_refusal_max_release,
                              seed=run.cfg.data.seed)


@dataclass
class Gates:
    """The routing of a conditional keep-refusal run: per gated condition (its index in the conditions), whether
    each of its prompts was routed to release; and the harmless test prompts' routing (for the first-token KL)."""

    layer: int
    rows: dict[int, list[bool]]
    harmless: list[bool] | None

    def interventions(self, ci: int, pi: int, ivs: list) -> list:
        """Row ``pi`` of condition ``ci``: its interventions if not gated or routed to release, else none."""
        return ivs if ci not in self.rows or self.rows[ci][pi] else []

    def label(self, ci: int, pi: int) -> str | None:
        return None if ci not in self.rows else "release" if self.rows[ci][pi] else "keep"

    def to_json(self) -> dict:
        return {"layer": self.layer, "routed_release": {str(ci): sum(v) for ci, v in self.rows.items()},
                "harmless_routed_release": None if self.harmless is None else sum(self.harmless)}


def gates(run: Run, conds: list[Condition], by_set: dict[str, list[str]]) -> Gates | None:
    """Route the test prompts of the gated conditions (named keep_refusal, on the harmful prompts) with the run's
    keep condition; None unless the run keeps refusal with the conditional method."""
    from ..directions.condition import KeepCondition, route

    gated = [ci for ci, c in enumerate(conds) if c.name == KEEP_REFUSAL_CONDITION and c.prompts == "harmful"]
    if not conditional(run) or not gated:
        return None
    path = run.dir / CONDITION_FILE
    if not path.is_file():
        raise RefusalError(f"{path} is missing: the keep-refusal condition was not saved by select.",
                           f"Redo select: `refusal run --resume {run.dir} --from-stage select`.")
    try:
        cond = KeepCondition.load(path)
    except DamagedFileError as exc:
        raise run.folder.explain(exc) from None
    harmful = route(run.model, run.tokenizer, cond, by_set["harmful"], batch_size=run.batch_size,
                    description="Keep condition: routing the harmful test prompts")
    harmless = route(run.model, run.tokenizer, cond, by_set["harmless"], batch_size=run.batch_size,
                     description="Keep condition: routing the harmless test prompts") if run.cfg.generate.kl else None
    console.print(f"Keep condition (layer {cond.layer}): {sum(harmful)} of {len(harmful)} harmful test prompts "
                  "routed to release" + ("" if harmless is None else
                                         f", {sum(harmless)} of {len(harmless)} harmless ones"))
    return Gates(cond.layer, {ci: harmful for ci in gated}, harmless)


def gated_kl(kl: torch.Tensor, gate: Gates | None) -> torch.Tensor:
    """Per-prompt first-token KL ``(n_conditions + 1, n)`` (the last row: no intervention) with each gated
    condition's row taken from the no-intervention row where the prompt was routed to keep; the last row dropped."""
    if gate is None or gate.harmless is None:
        return kl[:-1] if gate is not None else kl
    out = kl[:-1].clone()
    release = torch.tensor(gate.harmless, dtype=torch.bool)
    for ci in gate.rows:
        out[ci] = torch.where(release, kl[ci], kl[-1])
    return out


def routing_rates(records: list[dict]) -> dict[str, dict]:
    """``{category: rate of records routed to release}`` (with its Wilson interval), from records that carry
    ``gate`` (``"release"`` or ``"keep"``); records without a category count under ``(none)``."""
    from ..evaluation.stats import Rate

    groups: dict[str, list[bool]] = {}
    for r in records:
        if r.get("gate") not in ("release", "keep"):
            continue
        c = r.get("category")
        groups.setdefault("(none)" if c in (None, "") else str(c), []).append(r["gate"] == "release")
    return {c: Rate.of(sum(v), len(v)).to_json() for c, v in groups.items()}


def summary_fields(run: Run, judged: dict, kl: dict) -> dict:
    """``summary["keep_refusal"]``: the kept and released categories, the method, and (conditional) the condition's
    layer and accuracies and the routing rate per test category (Wilson intervals) and on the harmless prompts."""
    from ..evaluation.stats import Rate

    cats = io.read_json(run.dir / "categories.json")
    out = {k: cats.get(k) for k in ("kept", "released", "n_train", "norm_fraction")}
    out["method"] = cats.get("method", "orthogonal")
    cond = cats.get("condition")
    if out["method"] == "conditional" and isinstance(cond, dict):
        out["condition"] = {k: cond.get(k) for k in ("layer", "pool", "penalty", "max_kept_release", "out_of_fold",
                                                     "n")}
        recs = judged.get("harmful", {}).get(KEEP_REFUSAL_CONDITION) or []
        out["routing"] = routing_rates(recs)  # per test category: the share routed to release
        routed = [r.get("gate") == "release" for r in recs if r.get("gate") in ("release", "keep")]
        out["routing_overall"] = Rate.of(sum(routed), len(routed)).to_json()
        h = (kl.get("harmful", {}).get(KEEP_REFUSAL_CONDITION) or {}).get("harmless_routed_release")
        if isinstance(h, dict):
            out["routing_harmless"] = h
    return out


def refuse_weight_export(config: dict, run_dir: Any) -> None:
    """Raise a :class:`RefusalError` for a run (its saved ``config``) that keeps refusal with the conditional
    method: the gate decides per prompt, so it cannot be baked into weights, an adapter or a GGUF, and exporting the
    selected direction would remove refusal for the kept categories too."""
    sel = config.get("select") if isinstance(config, dict) else None
    if not isinstance(sel, dict) or not sel.get("keep_refusal"):
        return
    if sel.get("keep_refusal_method", "orthogonal") != "conditional":  # saved before the setting: orthogonal
        return
    raise RefusalError(
        f"The run {run_dir} keeps refusal for {', '.join(map(str, sel['keep_refusal']))} with the conditional "
        "method: a classifier on each prompt's activations decides whether the refusal direction is ablated. That "
        "is not a weight edit, and exporting the run's direction would remove refusal for the kept categories too.",
        "Conditional: serve with hooks (route each prompt with refusal.directions.condition.route, ablate for the "
        "released ones; docs/keep-refusal.md), or try it with `refusal chat RUN_DIR --keep-refusal-gate`. To export "
        "the plain "
        f"ablation, turn keep-refusal off (`refusal run --resume {run_dir} --keep-refusal \"\"`); the orthogonal "
        "method's `kept` direction exports from Python (docs/keep-refusal.md).")
