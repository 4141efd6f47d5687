"""The run report: a tiny run made through the CLI, its report written by ``refusal report``, the Markdown checked,
and the HTML opened in a real headless browser (Debian's chromium; skipped where none is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import yaml
from conftest import build_model
from typer.testing import CliRunner

from refusal import io
from refusal.cli import app
from refusal.errors import RefusalError
from refusal.report import write_report

runner = CliRunner()

# model text is untrusted: each of these must reach the page as text, never as markup
PAYLOAD = ('<script>document.body.setAttribute("data-pwned","1")</script><img src=x onerror="document.body.'
           'setAttribute(\'data-pwned\',\'2\')"> | **bold** [link](javascript:alert(1))')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A complete tiny run (every artifact of `refusal run`), with an untrusted completion and optional files."""
    from refusal.data import builtin

    tmp = tmp_path_factory.mktemp("report")
    model_dir = tmp / "tiny-qwen2"
    build_model("qwen2", len(tokenizer), n_layers=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    h, b = tmp / "harmful.json", tmp / "harmless.jsonl"
    h.write_text(json.dumps(builtin("harmful")[:12]))
    b.write_text("\n".join(json.dumps({"prompt": r["instruction"]}) for r in builtin("harmless")[:12]))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"n_train": 4, "n_val": 3, "n_test": 3, "filter": False},
                                   "select": {"kl_threshold": 1e9, "induce_threshold": -1e9},
                                   "generate": {"max_new_tokens": 4}, "device": "cpu", "preset": "paper"}))
    r = runner.invoke(app, ["run", "--model", str(model_dir), "--harmful", str(h), "--harmless", str(b),
                            "--config", str(cfg), "--output", str(tmp / "runs")])
    assert r.exit_code == 0, r.output
    d = tmp / "runs" / "tiny-qwen2"

    judged = io.read_json(d / "judgements.json")
    judged["harmful"]["ablation"][0]["completion"] = PAYLOAD
    judged["harmful"]["baseline"][1]["completion"] = "long " * 200 + "END-OF-LONG-TEXT"
    io.write_json(d / "judgements.json", judged)
    rate = {"count": 2, "n": 3, "rate": 0.6667, "low": 0.2077, "high": 0.9385}
    io.write_json(d / "ce.json", {"pile": {"baseline": {"loss": 2.31, "perplexity": 10.07, "tokens": 4096},
                                           "ablation": {"loss": 2.35, "perplexity": 10.49, "tokens": 4096}}})
    io.write_json(d / "judges.json", {"harmful": {
        "baseline": {"substring": {"n": 3, "failed": 0, "rates": {"refusal": rate}}, "guard": rate},
        "ablation": {"substring": {"n": 3, "failed": 0, "rates": {"refusal": rate}}, "guard": 0.5}}})
    (d / "crosslingual").mkdir()
    io.write_json(d / "crosslingual" / "transfer.json", {"title": "Direction transfer", "rows": ["en", "fr"],
                                                         "cols": ["en", "fr"], "values": [[0.9, 0.4], [0.3, None]],
                                                         "metric": "non-refusal rate"})
    io.write_bytes(d / "crosslingual" / "transfer.png", (d / "scores.png").read_bytes())
    (d / "benchmarks.json").write_text("{ not json")  # a broken optional file: listed, never fatal
    return d


def test_report_command_writes_html_and_markdown(run_dir, tmp_path):
    r = runner.invoke(app, ["report", str(run_dir)])
    assert r.exit_code == 0, r.output
    html_path, md_path = run_dir / "report" / "report.html", run_dir / "report" / "report.md"
    assert html_path.is_file() and md_path.is_file()

    md = md_path.read_text(encoding="utf-8")
    summary = io.read_json(run_dir / "summary.json")
    sel = io.read_json(run_dir / "scores.json")["selected"]
    assert md.startswith("# Refusal direction report: ")
    assert f"position {sel['pos']}, layer {sel['layer']} of 3" in md
    # headline: harmful non-refusal and harmless refusal, baseline → the interventions
    assert re.search(r"\*\*Harmful prompts: non-refusal rate\*\*: baseline [\d.]+ \[[\d.]+, [\d.]+\] → ablation",
                     md)
    assert "**Harmless prompts: refusal rate**: baseline" in md
    # one row per prompt set × condition, with 95 % intervals
    for kind, conds in summary["results"].items():
        for cond, m in conds.items():
            row = next(line for line in md.splitlines() if line.startswith(f"| {kind} | {cond} | 3 |"))
            assert f"{m['refusal']['rate']:.2f} [{m['refusal']['low']:.2f}, {m['refusal']['high']:.2f}]" in row
    for title in ("## Refusal rates", "## Selected direction", "## Selection scores", "## Judges side by side",
                  "## Cross-entropy", "## Cross-lingual", "## Completions side by side",
                  "## Configuration and provenance", "## Unreadable files"):
        assert title in md, title
    assert "guard · " not in md and "| condition | substring · refusal | guard |" in md
    assert "| pile |" not in md and "### pile" in md and "| baseline | 2.31 | 10.07 | 4096 |" in md
    assert "benchmarks.json" in md and "## Benchmarks" not in md
    assert "| stage | digest | seconds | finished at | status |" in md
    for stage, dg in io.read_yaml(run_dir / "config.yaml")["digests"].items():
        assert re.search(rf"\| {stage} \| `{dg}` \| [\d.]+ \| .+ \| finished \|", md), stage
    # model text is escaped: no raw markup, no table-breaking pipe, no link
    assert "<script>" not in md and "<img" not in md and "[link](javascript" not in md
    assert "&lt;script&gt;" in md and "\\| \\*\\*bold\\*\\* \\[link\\]" in md

    # --out elsewhere; the Python API writes the same files
    other = tmp_path / "elsewhere"
    r = runner.invoke(app, ["report", str(run_dir), "--out", str(other)])
    assert r.exit_code == 0, r.output
    assert (other / "report.html").is_file() and (other / "report.md").is_file()
    assert write_report(run_dir, tmp_path / "api") == (tmp_path / "api" / "report.html", tmp_path / "api" / "report.md")


def test_html_is_self_contained_and_escaped(run_dir, tmp_path):
    html_path, _ = write_report(run_dir, tmp_path)
    page = html_path.read_text(encoding="utf-8")
    assert "<script" not in page.lower().replace("&lt;script", "")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert page.count('src="data:image/png;base64,') == 3  # heatmaps, scores.png, crosslingual/transfer.png
    assert "&lt;script&gt;document.body.setAttribute(&quot;data-pwned&quot;" in page
    assert "<details>" in page and "END-OF-LONG-TEXT" in page


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_report_in_headless_chromium(run_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    html_path, _ = write_report(run_dir, tmp_path)
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    p = _Dom()
    p.feed(dom.stdout)
    tags = [t for t, _ in p.tags]
    body = next(a for t, a in p.tags if t == "body")
    assert "data-pwned" not in body  # the payload did not run
    assert "script" not in tags and sum(1 for t, a in p.tags if t == "img") == 3  # only our three figures
    assert tags.count("table") >= 8 and tags.count("details") >= 1
    ids = {a.get("id") for _, a in p.tags}
    assert {"results", "direction", "scores", "judges", "ce", "crosslingual", "completions", "config"} <= ids
    toc = [a["href"] for t, a in p.tags if t == "a" and a.get("href", "").startswith("#")]
    assert toc[:2] == ["#results", "#direction"] and all(h[1:] in ids for h in toc)
    text = "".join(p.text)
    assert PAYLOAD.split("<img")[0] in text  # shown as text, verbatim
    assert text.count("not refused") + text.count("refused") >= 15  # 5 conditions x 3 prompts

    shot = tmp_path / "shot.png"
    r = subprocess.run([*flags, "--hide-scrollbars", "--window-size=1280,2000", f"--screenshot={shot}",
                        html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000  # a rendered page, not a blank one


def test_folder_without_summary_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("model: x\n")
    with pytest.raises(RefusalError, match="no summary.json") as e:
        write_report(tmp_path)
    assert "refusal run" in e.value.fix
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "refusal run" in r.output
    with pytest.raises(RefusalError, match="No run folder"):
        write_report(tmp_path / "missing")


def test_summary_alone_and_old_flat_summary(tmp_path):
    """Only summary.json (an older one, with flat rates and no intervals): every optional section is left out."""
    io.write_json(tmp_path / "summary.json", {
        "model": "m", "device": "cpu", "selected": {"pos": -1, "layer": 2},
        "harmful": {"baseline": 0.25, "ablation": 1.0}, "harmless": {"baseline": 0.0, "actadd": 0.8333},
        "n_harmful": 12, "n_harmless": 12, "stage_seconds": {"extract": 1.5, "evaluate": 0.0}})
    html_path, md_path = write_report(tmp_path)
    md = md_path.read_text(encoding="utf-8")
    assert "baseline 0.25 → ablation **1.00**" in md and "actadd **0.83**" in md
    assert "| harmful | ablation | 12 | 0.00 | 1.00 |" in md
    for absent in ("Selection scores", "Completions", "Judges", "Cross-entropy", "Unreadable"):
        assert absent not in md
    assert "<section id=\"results\">" in html_path.read_text(encoding="utf-8")
