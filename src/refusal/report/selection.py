"""The sections of the direction's selection: the selected candidate (``scores.json``'s ``selected``, the one
place a run stores it; an older run's summary otherwise), the direction file (``direction.safetensors``, which
refers to it) beside the best candidates and the set ``refusal sets`` saved (``sets.safetensors``, its manifest
``sets.done.json``), and the selection scores drawn as heatmaps."""

from __future__ import annotations

from typing import Any

from .artifacts import Artifacts
from .blocks import Code, Image, Row, Section, Sub, Table, Text
from .values import _num, as_dict


def _selected_text(summary: dict, scores: dict | None) -> str | None:
    sel = (scores or {}).get("selected") or summary.get("selected")
    if not isinstance(sel, dict) or "layer" not in sel:
        return None
    n_layers = len(scores["bypass"][0]) if scores and scores.get("bypass") else 0
    return f"position {sel.get('pos')}, layer {sel.get('layer')}" + (f" of {n_layers}" if n_layers else "")


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
    sc = as_dict(config.get("select"))
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
            ref = d.extra.get("selection")
            if isinstance(ref, dict):  # the file refers to the selection instead of copying it
                frows.append(["selection", _reference_text(a, ref)])
        except Exception as exc:  # noqa: BLE001 (a broken optional file is reported, not fatal)
            a.problems.append(f"direction.safetensors: {exc}")
    left = [Sub("Candidate"), Table(["", ""], rows, kind="kv")] if rows else []
    left += _saved_set(a)
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


def _reference_text(a: Artifacts, ref: dict) -> str:
    """``scores.json#selected (sha256 0123abcd…)``, and whether the file it names still has that sha256."""
    from ..runs.folder import RunFolder

    name, sha = str(ref.get("file")), str(ref.get("sha256") or "")
    try:
        same = (a.dir / name).is_file() and RunFolder(a.dir).selection_reference().get("sha256") == sha
    except OSError:
        same = False
    return f"{name}#{ref.get('key', 'selected')} (sha256 {sha[:12]}…, " + \
        ("the file as it is now)" if same else "not the file there now: it was rewritten since)")


def _saved_set(a: Artifacts) -> list[Any]:
    """The set `refusal sets` saved (its manifest's best row and options), and whether it is still this selection's."""
    from ..runs.folder import RunFolder

    rf = RunFolder(a.dir)
    try:
        state = rf.sets_state()
        m = rf.manifest("sets") if state != "none" else None
    except Exception as exc:  # noqa: BLE001 (a broken optional file is reported, not fatal)
        a.problems.append(f"sets.done.json: {exc}")
        return []
    if state == "none":
        return []
    best = (m or {}).get("best") or {}
    opts = (m or {}).get("options") or {}
    members = " ".join(f"({x.get('pos')}, {x.get('layer')})" for x in best.get("members") or [])
    rows: list[list[Any]] = [
        ["state", "made from this selection" if state == "fresh" else
         "stale: select ran again since (redo `refusal sets`); not used"],
        ["ranks", ", ".join(map(str, best.get("ranks") or [])) or None], ["(pos, layer)", members or None],
        *([k, best.get(k)] for k in ("bypass", "induce", "kl") if k in best),
        ["search", ", ".join(f"{k} {v}" for k, v in opts.items() if v is not None) or None]]
    return [Sub("Saved set (refusal sets)"), Table(["", ""], [r for r in rows if r[1] is not None], kind="kv")]


def _scores_section(a: Artifacts, scores: dict | None, config: dict) -> Section:
    s = Section("scores", "Selection scores")
    if scores:
        from .plots import score_heatmaps

        sc = as_dict(config.get("select"))
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
