"""Refusal per harm category: a table (category × condition, each rate with its 95 % Wilson interval) and a figure
with one panel per category, from ``summary.json``'s ``results[prompt_set][condition]["by_category"]``.

With ``select.keep_refusal`` the summary's ``keep_refusal`` names the kept and released categories: the table marks
each category's role and the figure is drawn; the first-token KL of every condition on the harmless prompts is given
beside the table; with the conditional method, a second table gives the keep condition's routing per category.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .blocks import Image, RateCell, Section, Sub, Table, Text
from .values import is_rate


def per_category(results: dict, kind: str = "harmful") -> dict[str, dict[str, dict]]:
    """``{condition: {category: {"refusal": rate, ...}}}`` of one prompt set (conditions without categories left
    out), baseline first."""
    conds = results.get(kind) if isinstance(results, dict) else None
    if not isinstance(conds, dict):
        return {}
    out = {c: m["by_category"] for c, m in conds.items()
           if isinstance(m, dict) and isinstance(m.get("by_category"), dict) and m["by_category"]}
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "baseline"))


def roles(summary: dict) -> dict[str, str]:
    """``{category: "kept" | "released"}`` from the summary's ``keep_refusal`` (empty without it)."""
    keep = summary.get("keep_refusal")
    if not isinstance(keep, dict):
        keep = {}
    out = {str(c): "released" for c in keep.get("released") or []}
    out.update({str(c): "kept" for c in keep.get("kept") or []})
    return out


def ordered(categories: Iterable[str], role: dict[str, str] | None = None) -> list[str]:
    """Categories in order of first appearance, released ones first, then kept ones, then the rest."""
    rank = {"released": 0, "kept": 1}
    cats = list(dict.fromkeys(categories))
    return sorted(cats, key=lambda c: rank.get((role or {}).get(c, ""), 2))


def category_plot(by_cond: dict[str, dict[str, dict]], role: dict[str, str] | None = None, *, title: str = "",
                  kl: dict[str, float | None] | None = None, path: str | Path | None = None,
                  routing: dict[str, dict] | None = None) -> bytes | None:
    """PNG: one panel per category, one bar per condition (its refusal rate, with the 95 % Wilson interval as an
    error bar); a kept category's panel title says so. ``kl``: each condition's first-token KL on harmless prompts,
    written under its name. ``routing``: the conditional gate's rate of routing to release per category
    (``summary["keep_refusal"]["routing"]``), drawn as a last, hatched grey bar. Written to ``path`` too, if given.
    None if there is nothing to draw."""
    cats = ordered((c for v in by_cond.values() for c in v), role)
    if not cats:
        return None
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(by_cond)
    role = role or {}
    ncol = min(4, len(cats))
    nrow = -(-len(cats) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.9 * nrow + 0.6), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [c if not kl or kl.get(c) is None else f"{c}\nKL {kl[c]:.3f}" for c in conds]
    if routing is not None:
        labels.append("gate:\nrouted to\nrelease")
    for ax, cat in zip(axes.flat, cats):
        for i, c in enumerate(conds + (["(routing)"] if routing is not None else [])):
            r = (routing or {}).get(cat) if c == "(routing)" else (by_cond[c].get(cat) or {}).get("refusal")
            if not is_rate(r):
                continue
            if c == "(routing)":
                ax.bar(i, r["rate"], color="lightgrey", hatch="//", edgecolor="grey")
            else:
                ax.bar(i, r["rate"], color=colours[i % len(colours)])
            ax.errorbar(i, r["rate"], yerr=[[r["rate"] - r["low"]], [r["high"] - r["rate"]]], color="black",
                        capsize=3, lw=1)
            ax.text(i, min(r["high"] + 0.03, 1.02), f"{r['count']}/{r['n']}", ha="center", fontsize=7)
        tag = f" ({role[cat]})" if cat in role else ""
        ax.set_title(textwrap.fill(f"{cat}{tag}", 34), fontsize=9,
                     color="tab:red" if role.get(cat) == "kept" else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.1)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(cats):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("refusal rate")
    fig.suptitle(title or "Refusal rate per category (95 % Wilson intervals)", fontsize=10)
    fig.tight_layout()
    from .. import io

    png = io.png_bytes(fig)
    if path is not None:
        io.write_bytes(Path(path), png)
    return png


def categories_section(summary: dict, results: dict) -> Section | None:
    """The per-category section of the report, or None when no test record carries a category."""
    role = roles(summary)
    s = Section("categories", "Refusal per category")
    for kind in [k for k in results if isinstance(results.get(k), dict)]:
        by_cond = per_category(results, kind)
        if not by_cond:
            continue
        conds = list(by_cond)
        cats = ordered((c for v in by_cond.values() for c in v), role)
        rows: list[list[Any]] = []
        for cat in cats:
            n = next(((by_cond[c].get(cat) or {}).get("refusal", {}).get("n") for c in conds
                      if (by_cond[c].get(cat) or {}).get("refusal")), None)
            cells = [RateCell(r, True) if is_rate(r := (by_cond[c].get(cat) or {}).get("refusal")) else "—"
                     for c in conds]
            rows.append([cat] + ([role.get(cat, "—")] if role else []) + [n] + cells)
        s.blocks += [Sub(f"{kind} prompts"),
                     Table(["category"] + (["role"] if role else []) + ["n"] + [f"{c} · refusal" for c in conds],
                           rows, kind="results")]
        kl = {c: (results[kind].get(c) or {}).get("kl_harmless") for c in conds}
        if any(v is not None for v in kl.values()):
            s.blocks.append(Text("First-token KL(baseline ‖ condition) on the harmless test prompts: "
                                 + ", ".join(f"{c} {v:.4f}" for c, v in kl.items() if v is not None) + "."))
        # the figure with select.keep_refusal (the table alone otherwise: a run on categorised data without it)
        routing = (summary.get("keep_refusal") or {}).get("routing") if kind == "harmful" else None
        png = category_plot(by_cond, role, kl=kl, title=f"{kind} prompts: refusal rate per category",
                            routing=routing if isinstance(routing, dict) else None) if role else None
        if png:
            s.blocks.append(Image(png, f"refusal rate per category ({kind} prompts)"))
    if not s.blocks:
        return None
    intro = ("The substring judge's refusal rate of each test category under each condition, with its 95 % Wilson "
             "interval.")
    if role:
        keep = summary.get("keep_refusal") or {}
        if keep.get("method") == "conditional":
            cond = keep.get("condition") or {}
            oof = cond.get("out_of_fold") or {}
            fit = (f"out of fold it released {oof.get('released_recall')} of the released train and val prompts "
                   f"and {oof.get('kept_released')} of the kept ones" if oof else
                   f"val balanced accuracy {cond.get('val_balanced_accuracy')}")  # a run saved before
            how = ("conditional: a classifier on each prompt's activations at layer "
                   f"{cond.get('layer')} ({fit}) routes it; "
                   "the prompts routed to release get the selected direction ablated, the others nothing")
        else:
            how = "the released categories' direction made orthogonal to the kept categories' directions, ablated"
        intro += (f" Refusal kept for {', '.join(keep.get('kept') or [])}; released for "
                  f"{', '.join(keep.get('released') or [])} (condition keep_refusal: {how}; docs/keep-refusal.md). "
                  "A kept category should stay near its baseline; a released one should fall like under ablation.")
        routing = routing_table(summary)
        if routing is not None:
            s.blocks += [Sub("routing by the keep condition"), routing]
    s.blocks.insert(0, Text(intro))
    return s


def routing_table(summary: dict) -> Table | None:
    """The conditional method's routing: per test category, the share of its prompts the keep condition sent to
    release (with the 95 % Wilson interval; a released category should be near 1, a kept one near 0), and the
    harmless prompts' share (their KL is measured under the same routing). None for the orthogonal method."""
    keep = summary.get("keep_refusal")
    if not isinstance(keep, dict) or not isinstance(keep.get("routing"), dict):
        return None
    role = roles(summary)
    rows: list[list[Any]] = []
    for cat in ordered(keep["routing"], role):
        r = keep["routing"][cat]
        rows.append([cat, role.get(cat, "—"), r.get("n"), RateCell(r, None) if is_rate(r) else "—"])
    h = keep.get("routing_harmless")
    if is_rate(h):
        rows.append(["(harmless test prompts)", "—", h.get("n"), RateCell(h, None)])
    return Table(["category", "role", "n", "routed to release"], rows, kind="results")
