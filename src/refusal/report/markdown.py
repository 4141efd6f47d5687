"""The report as a Markdown summary: the headline, every table of the HTML page, and the first few completions of
each prompt set (the figures and the full completions are in the HTML page beside it).

Every string from the run is escaped for Markdown: ``& < >`` become entities (Markdown passes raw HTML through),
``\\ ` * _ [ ] | #`` are backslash-escaped and line breaks become spaces, so model text cannot add markup, links,
table cells or headings.
"""

from __future__ import annotations

from typing import Any

from .blocks import Card, Code, Completions, Heat, Image, RateCell, Report, Row, Section, Sub, Table, Text
from .html import fmt

EXAMPLES = 3  # completions shown per prompt set
TRUNCATE = 160


def esc(x: Any) -> str:
    s = str(x).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_[]|#":
        s = s.replace(ch, "\\" + ch)
    return " ".join(s.split())


def rate_md(c: RateCell, bold: bool = False) -> str:
    r = c.rate
    v = f"{float(r['rate']):.2f}"
    v = f"**{v}**" if bold else v
    if isinstance(r.get("low"), (int, float)) and isinstance(r.get("high"), (int, float)):
        v += f" [{r['low']:.2f}, {r['high']:.2f}]"
    return v


def cell_md(v: Any) -> str:
    if isinstance(v, RateCell):
        return rate_md(v)
    if isinstance(v, Heat):
        return fmt(v.value)
    if isinstance(v, Code):
        return f"`{v.text}`" if "`" not in v.text and "|" not in v.text and "\n" not in v.text else esc(v.text)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt(v)
    if isinstance(v, list):
        return esc(", ".join(fmt(x) for x in v))
    return esc(fmt(v))


def table_md(t: Table) -> str:
    cols = t.columns
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in t.rows:
        lines.append("| " + " | ".join(cell_md(v) for v in row) + " |")
    out = "\n".join(lines)
    if t.caption:
        out += f"\n\n_{esc(t.caption)}_"
    return out


def completions_md(c: Completions) -> str:
    out = [f"### {esc(c.prompt_set)} prompts ({len(c.rows)})"]
    counts = []
    for j, cond in enumerate(c.conditions):
        judged = [v.refused for r in c.rows for v in (r[2][j],) if v is not None and v.refused is not None]
        if judged:
            counts.append(f"{esc(cond)}: {sum(judged)} / {len(judged)} refused")
    if counts:
        out.append("; ".join(counts) + ".")
    lines = ["| instruction | " + " | ".join(esc(cond) for cond in c.conditions) + " |",
             "|---|" + "---|" * len(c.conditions)]
    for instruction, _, verdicts in c.rows[:EXAMPLES]:
        cells = []
        for v in verdicts:
            if v is None:
                cells.append("—")
                continue
            mark = "not judged" if v.refused is None else ("**refused**" if v.refused else "not refused")
            text = v.completion if len(v.completion) <= TRUNCATE else v.completion[:TRUNCATE].rstrip() + "…"
            cells.append(f"{mark}: {esc(text)}")
        lines.append(f"| {esc(instruction)} | " + " | ".join(cells) + " |")
    out.append("\n".join(lines))
    if len(c.rows) > EXAMPLES:
        out.append(f"_First {EXAMPLES} of {len(c.rows)} prompts; all of them are in report.html._")
    return "\n\n".join(out)


def block_md(b: Any) -> str:
    if isinstance(b, Table):
        return table_md(b)
    if isinstance(b, Image):
        return f"_Figure: {esc(b.alt)} (in report.html)._"
    if isinstance(b, Text):
        return f"> {esc(b.text)}" if b.kind == "warn" else esc(b.text)
    if isinstance(b, Sub):
        return "#" * min(max(b.level, 3), 5) + " " + esc(b.title)
    if isinstance(b, Completions):
        return completions_md(b)
    if isinstance(b, Row):
        return "\n\n".join(block_md(x) for part in b.parts for x in part)
    raise TypeError(f"unknown report block {type(b).__name__}")


def card_md(c: Card) -> str:
    steps = []
    for i, (cond, v) in enumerate(c.steps):
        val = rate_md(v, bold=i > 0) if isinstance(v, RateCell) else esc(fmt(v))
        steps.append(f"{esc(cond)} {val}")
    flow = steps[0] + (" → " + ", ".join(steps[1:]) if len(steps) > 1 else "")
    return f"- **{esc(c.title)}**: {flow}"


def section_md(s: Section) -> str:
    blocks = [b for b in s.blocks if not (isinstance(b, Text) and b.kind == "legend")]
    return f"## {esc(s.title)}\n\n" + "\n\n".join(block_md(b) for b in blocks)


def render(report: Report) -> str:
    parts = [f"# {esc(report.title)}",
             " · ".join(f"**{esc(k)}**: {esc(v)}" for k, v in report.facts)]
    if report.cards:
        parts.append("\n".join(card_md(c) for c in report.cards))
    parts.append("Sections: " + ", ".join(esc(s.title) for s in report.sections)
                 + ". Figures and every completion: `report.html`.")
    parts += [section_md(s) for s in report.sections]
    parts.append(f"_Written by `refusal report` on {esc(report.generated)}._")
    return "\n\n".join(parts) + "\n"
