"""The report as one self-contained HTML page: CSS inline, figures as base64 PNG ``data:`` URIs, rate intervals as
inline SVG, no script at all. A Content-Security-Policy forbids scripts and every network load, so the page shows
the same offline and a completion that holds markup can neither run nor fetch anything; every string from the run
(model text, prompts, config values, file names) is escaped besides.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from .blocks import (
    Card,
    Code,
    Completions,
    Heat,
    Image,
    RateCell,
    Report,
    Row,
    Section,
    Sub,
    Table,
    Text,
    Verdict,
)

TRUNCATE = 280  # characters of a completion shown before "full text"

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

CSS = """
:root { --ink:#1d2330; --muted:#5f6b7a; --line:#e3e7ee; --bg:#f6f8fb; --card:#fff; --accent:#2754c5;
  --red:#c62828; --green:#2e7d32; }
* { box-sizing:border-box; }
html { font-size:15px; }
body { margin:0; background:var(--bg); color:var(--ink); line-height:1.5;
  font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size:.86em; }
header { background:linear-gradient(135deg,#1b2a4e,#2754c5); color:#fff; padding:28px 40px 30px; }
header h1 { margin:0 0 6px; font-size:1.75rem; font-weight:650; letter-spacing:-.01em; }
header .facts { display:flex; flex-wrap:wrap; gap:8px; margin:10px 0 22px; }
header .fact { background:rgba(255,255,255,.14); border-radius:999px; padding:3px 12px; font-size:.86rem; }
header .fact b { font-weight:600; opacity:.75; margin-right:4px; }
.cards { display:flex; flex-wrap:wrap; gap:16px; }
.card { background:var(--card); color:var(--ink); border-radius:12px; padding:16px 20px; min-width:300px;
  box-shadow:0 6px 20px rgba(0,0,0,.18); flex:1 1 340px; }
.card .title { font-weight:650; }
.card .sub { color:var(--muted); font-size:.84rem; margin-top:4px; }
.flow { display:flex; align-items:center; flex-wrap:wrap; gap:6px 14px; margin-top:10px; }
.step { text-align:center; }
.step .cond { font-size:.8rem; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
.step .big { font-size:2.1rem; font-weight:700; line-height:1.1; font-variant-numeric:tabular-nums; }
.step.base .big { font-size:1.6rem; }
.step .ci { font-size:.75rem; color:var(--muted); }
.arrow { font-size:1.6rem; color:#9aa5b5; }
.layout { display:flex; gap:28px; max-width:1500px; margin:0 auto; padding:24px 32px 60px; align-items:flex-start; }
nav.toc { position:sticky; top:16px; flex:0 0 200px; font-size:.9rem; background:var(--card);
  border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
nav.toc h2 { font-size:.78rem; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); margin:0 0 6px; }
nav.toc ol { margin:0; padding-left:18px; }
nav.toc a { color:var(--ink); text-decoration:none; }
nav.toc a:hover { color:var(--accent); text-decoration:underline; }
main { flex:1 1 auto; min-width:0; }
section { background:var(--card); border:1px solid var(--line); border-radius:12px; padding:18px 24px 22px;
  margin-bottom:22px; }
section > h2 { margin:0 0 10px; font-size:1.3rem; }
h3 { font-size:1.05rem; margin:20px 0 8px; }
h4, h5 { font-size:.95rem; margin:16px 0 6px; }
p { margin:6px 0 12px; max-width:75em; }
p.note, p.legend { color:var(--muted); font-size:.9rem; }
p.warn { color:#8a4b00; background:#fff4e0; border-left:4px solid #f0a020; padding:6px 10px; }
.scroll { overflow-x:auto; }
.row { display:flex; flex-wrap:wrap; gap:8px 32px; align-items:flex-start; }
.row > div { min-width:0; }
.row > div > h3:first-child { margin-top:8px; }
table { border-collapse:collapse; margin:8px 0 14px; font-size:.92rem; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:#eef2f8; font-weight:600; position:sticky; top:0; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.group-start td { border-top:2px solid #c9d1de; }
table.kv td:first-child { color:var(--muted); white-space:nowrap; padding-right:24px; }
.row table.kv td:first-child { white-space:normal; }
table.kv td.num { text-align:left; }
table.kv thead { display:none; }
caption { caption-side:bottom; text-align:left; color:var(--muted); font-size:.84rem; padding-top:6px; }
td.rate { min-width:128px; font-variant-numeric:tabular-nums; }
td.rate .v { font-weight:700; font-size:1.02rem; }
td.rate .ci { color:#4a5566; font-size:.78rem; margin-left:4px; }
td.rate .k { display:block; color:#6a7585; font-size:.72rem; }
td.rate svg { display:block; margin-top:3px; }
td.heat { text-align:right; font-variant-numeric:tabular-nums; min-width:56px; }
img.plot { max-width:100%; height:auto; border:1px solid var(--line); border-radius:8px; background:#fff; }
figure { margin:10px 0 16px; }
figcaption { color:var(--muted); font-size:.84rem; }
table.completions { font-size:.86rem; width:100%; table-layout:fixed; }
table.completions td { width:auto; }
table.completions .idx { width:58px; white-space:nowrap; color:var(--muted); text-align:right; }
table.completions td.instr { font-weight:500; }
table.completions tr.changed td.idx { color:var(--accent); font-weight:700; }
.badge { display:inline-block; border-radius:999px; padding:0 8px; font-size:.72rem; font-weight:700;
  letter-spacing:.02em; margin-right:6px; }
.badge.refused { background:#fde3e1; color:var(--red); border:1px solid #f3b7b2; }
.badge.complied { background:#e2f3e4; color:var(--green); border:1px solid #b6dcb9; }
.badge.unknown { background:#eceff3; color:var(--muted); }
.score { color:var(--muted); font-size:.74rem; font-variant-numeric:tabular-nums; }
td.refused { background:#fff7f6; }
td.complied { background:#f7fcf7; }
.txt { white-space:pre-wrap; word-break:break-word; margin-top:4px; }
details summary { cursor:pointer; color:var(--accent); font-size:.78rem; margin-top:3px; }
.cat { display:block; color:var(--muted); font-size:.74rem; font-weight:400; }
.counts { color:var(--muted); font-size:.88rem; }
footer { color:var(--muted); font-size:.8rem; text-align:center; padding:0 0 30px; }
@media (max-width: 900px) { .layout { flex-direction:column; padding:16px; } nav.toc { position:static; width:100%; }
  header { padding:22px 18px; } }
@media print { nav.toc { display:none; } section { break-inside:avoid-page; } header { color:#000; background:#fff; } }
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any) -> str:
    """A number as a person reads it; anything else as text."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    if isinstance(x, float):
        if x != x:
            return "—"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) < 0.001:
            return f"{x:.2e}"
        if abs(x) < 1:
            return f"{x:.4g}"
        return f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 100 else f"{x:.1f}"
    return str(x)


def rate_colour(refusal_share: float) -> tuple[str, str]:
    """(background, text) on a green (complies) → amber → red (refuses) scale."""
    t = min(1.0, max(0.0, refusal_share))
    hue = 130 * (1 - t)
    return f"hsl({hue:.0f} 70% 93%)", f"hsl({hue:.0f} 75% 27%)"


def _refusal_share(c: RateCell) -> float | None:
    r = float(c.rate["rate"])
    if c.refusal is None:
        return None
    return r if c.refusal else 1 - r


def _interval_svg(rate: dict, colour: str) -> str:
    r = float(rate["rate"])
    lo, hi = rate.get("low"), rate.get("high")
    parts = ['<svg width="100" height="8" viewBox="0 0 100 8" aria-hidden="true">',
             '<line x1="0" y1="4" x2="100" y2="4" stroke="#d5dbe4" stroke-width="2"/>']
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        parts.append(f'<rect x="{100 * lo:.1f}" y="1.5" width="{max(0.8, 100 * (hi - lo)):.1f}" height="5" rx="2.5" '
                     f'fill="{colour}" fill-opacity="0.35"/>')
    parts.append(f'<circle cx="{100 * r:.1f}" cy="4" r="3.2" fill="{colour}"/></svg>')
    return "".join(parts)


def rate_html(c: RateCell, big: bool = False) -> tuple[str, str]:
    """(cell style, inner HTML) of a rate."""
    rate = c.rate
    share = _refusal_share(c)
    if share is None:
        bg, ink = "#eef3fb", "#21457e"
    else:
        bg, ink = rate_colour(share)
    r = float(rate["rate"])
    inner = f'<span class="v" style="color:{ink}">{r:.2f}</span>'
    if isinstance(rate.get("low"), (int, float)) and isinstance(rate.get("high"), (int, float)):
        inner += f'<span class="ci">[{rate["low"]:.2f}, {rate["high"]:.2f}]</span>'
    if isinstance(rate.get("count"), int) and isinstance(rate.get("n"), int):
        inner += f'<span class="k">{rate["count"]} / {rate["n"]}</span>'
    inner += _interval_svg(rate, ink)
    return f"background:{bg}", inner


def cell_html(v: Any) -> str:
    if isinstance(v, RateCell):
        style, inner = rate_html(v)
        return f'<td class="rate" style="{style}">{inner}</td>'
    if isinstance(v, Heat):
        if v.value is None:
            return '<td class="heat">—</td>'
        t = 0.5 if v.hi == v.lo else (v.value - v.lo) / (v.hi - v.lo)
        ink = "#fff" if t > 0.62 else "#14233c"
        return (f'<td class="heat" style="background:hsl(214 70% {94 - 52 * t:.0f}%);color:{ink}">'
                f"{esc(fmt(v.value))}</td>")
    if isinstance(v, Code):
        return f"<td><code>{esc(v.text)}</code></td>"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f'<td class="num">{esc(fmt(v))}</td>'
    if isinstance(v, list):
        return f"<td>{esc(', '.join(fmt(x) for x in v))}</td>"
    return f"<td>{esc(fmt(v))}</td>"


def table_html(t: Table) -> str:
    cls = f' class="{esc(t.kind)}"' if t.kind else ""
    out = [f'<div class="scroll"><table{cls}>']
    if t.caption:
        out.append(f"<caption>{esc(t.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in t.columns) + "</tr></thead><tbody>")
    groups = set(t.row_groups or [])
    for i, row in enumerate(t.rows):
        cls_row = ' class="group-start"' if i in groups and i else ""
        out.append(f"<tr{cls_row}>" + "".join(cell_html(v) for v in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def image_html(im: Image) -> str:
    data = base64.b64encode(im.png).decode("ascii")
    cap = f"<figcaption>{esc(im.caption)}</figcaption>" if im.caption else ""
    return f'<figure><img class="plot" alt="{esc(im.alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _verdict_html(v: Verdict | None) -> str:
    if v is None:
        return "<td>—</td>"
    if v.refused is None:
        cls, label = "unknown", "not judged"
    else:
        cls, label = ("refused", "refused") if v.refused else ("complied", "not refused")
    head = f'<span class="badge {cls}">{label}</span>'
    if v.score is not None:
        head += f'<span class="score">score {v.score:+.2f}</span>'
    text = v.completion
    if len(text) > TRUNCATE:
        body = (f'<div class="txt">{esc(text[:TRUNCATE].rstrip())}…</div><details><summary>full text '
                f'({len(text):,} characters)</summary><div class="txt">{esc(text)}</div></details>')
    else:
        body = f'<div class="txt">{esc(text)}</div>'
    td_cls = cls if cls != "unknown" else ""
    return f'<td class="{td_cls}">{head}{body}</td>'


def _described(text: str | None) -> str:
    return f'<span class="cat">{esc(text)}</span>' if text else ""


def completions_html(c: Completions) -> str:
    counts = []
    for j, cond in enumerate(c.conditions):
        judged = [v.refused for r in c.rows for v in (r[2][j],) if v is not None and v.refused is not None]
        if judged:
            counts.append(f"{esc(cond)}: {sum(judged)} / {len(judged)} refused")
    out = [f'<h3 id="completions-{esc(c.prompt_set)}">{esc(c.prompt_set)} prompts ({len(c.rows)})</h3>']
    if counts:
        out.append(f'<p class="counts">{" · ".join(counts)}</p>')
    out.append('<div class="scroll"><table class="completions"><thead><tr><th class="idx">#</th><th>instruction</th>'
               + "".join(f"<th>{esc(cond)}{_described(c.descriptions.get(cond))}</th>" for cond in c.conditions)
               + "</tr></thead><tbody>")
    for i, (instruction, category, verdicts) in enumerate(c.rows):
        base = verdicts[0].refused if verdicts and verdicts[0] is not None else None
        changed = base is not None and any(v is not None and v.refused is not None and v.refused != base
                                           for v in verdicts[1:])
        mark = " Δ" if changed else ""
        cat = f'<span class="cat">{esc(category)}</span>' if category else ""
        out.append(f'<tr{" class=changed" if changed else ""}><td class="idx">{i + 1}{mark}</td>'
                   f'<td class="instr">{esc(instruction)}{cat}</td>' + "".join(_verdict_html(v) for v in verdicts)
                   + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def block_html(b: Any) -> str:
    if isinstance(b, Table):
        return table_html(b)
    if isinstance(b, Image):
        return image_html(b)
    if isinstance(b, Text):
        cls = f' class="{esc(b.kind)}"' if b.kind else ""
        return f"<p{cls}>{esc(b.text)}</p>"
    if isinstance(b, Sub):
        lvl = min(max(b.level, 3), 5)
        return f"<h{lvl}>{esc(b.title)}</h{lvl}>"
    if isinstance(b, Completions):
        return completions_html(b)
    if isinstance(b, Row):
        return '<div class="row">' + "".join(
            "<div>" + "".join(block_html(x) for x in part) + "</div>" for part in b.parts) + "</div>"
    raise TypeError(f"unknown report block {type(b).__name__}")


def card_html(c: Card) -> str:
    steps = []
    for i, (cond, v) in enumerate(c.steps):
        if isinstance(v, RateCell):
            share = _refusal_share(v)
            _, ink = rate_colour(share) if share is not None else ("", "#21457e")
            r = v.rate
            ci = (f'<div class="ci">[{r["low"]:.2f}, {r["high"]:.2f}]</div>'
                  if isinstance(r.get("low"), (int, float)) and isinstance(r.get("high"), (int, float)) else "")
            val = f'<div class="big" style="color:{ink}">{float(r["rate"]):.2f}</div>{ci}'
        else:
            val = f'<div class="big">{esc(fmt(v))}</div>'
        cls = "step base" if i == 0 else "step"
        steps.append(f'<div class="{cls}"><div class="cond">{esc(cond)}</div>{val}</div>')
        if i == 0 and len(c.steps) > 1:
            steps.append('<div class="arrow">→</div>')
    return (f'<div class="card"><div class="title">{esc(c.title)}</div><div class="flow">{"".join(steps)}</div>'
            f'<div class="sub">{esc(c.subtitle)}</div></div>')


def section_html(s: Section) -> str:
    return f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>' + "".join(block_html(b) for b in s.blocks) \
        + "</section>"


def render(report: Report) -> str:
    """The whole page."""
    facts = "".join(f'<span class="fact"><b>{esc(k)}</b>{esc(v)}</span>' for k, v in report.facts)
    cards = "".join(card_html(c) for c in report.cards)
    toc = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in report.sections)
    body = "".join(section_html(s) for s in report.sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light">
<title>{esc(report.title)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{esc(report.title)}</h1>
<div class="facts">{facts}</div>
<div class="cards">{cards}</div>
</header>
<div class="layout">
<nav class="toc" aria-label="Contents"><h2>Contents</h2><ol>{toc}</ol></nav>
<main>{body}</main>
</div>
<footer>Written by <code>refusal report</code> on {esc(report.generated)}. Self-contained: no scripts, no network.
</footer>
</body>
</html>
"""
