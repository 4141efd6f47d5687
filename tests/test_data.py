"""Dataset loaders and seeded splits."""

from __future__ import annotations

import json

import pytest

from refusal.data import builtin, load_source, make_splits
from refusal.errors import RefusalError


def test_builtin_sets_are_large_labelled_and_distinct():
    harmful, harmless = builtin("harmful"), builtin("harmless")
    assert len(harmful) >= 200 and len(harmless) >= 200
    assert all(r["category"] for r in harmful)
    assert len({r["category"] for r in harmful}) >= 5
    assert not {r["instruction"].lower() for r in harmful} & {r["instruction"].lower() for r in harmless}


def test_file_formats(tmp_path):
    rows = ["Write a poem", "Explain gravity", "Sort a list in Python"]
    (tmp_path / "a.txt").write_text("\n".join(rows) + "\n\n")
    (tmp_path / "a.csv").write_text("instruction,category\n" + "\n".join(f'"{r}",x' for r in rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"goal": r}) for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    for ext in ("txt", "csv", "jsonl", "json"):
        got = load_source(str(tmp_path / f"a.{ext}"), "harmless").splits["all"]
        assert [r["instruction"] for r in got] == rows, ext
    (tmp_path / "a.xml").write_text("<x/>")
    with pytest.raises(RefusalError, match="Unsupported dataset file type"):
        load_source(str(tmp_path / "a.xml"), "harmless")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RefusalError, match="not valid JSON"):
        load_source(str(tmp_path / "bad.json"), "harmless")


def test_paper_style_folder(tmp_path):
    d = tmp_path / "splits"
    d.mkdir()
    for split, n in (("train", 10), ("val", 4), ("test", 6)):
        (d / f"harmful_{split}.json").write_text(json.dumps([{"instruction": f"{split} {i}"} for i in range(n)]))
    src = load_source(str(tmp_path), "harmful")
    assert src.is_split
    s = make_splits(src, {"train": 5, "val": 4, "test": 6}, seed=1, kind="harmful")
    assert all(r["instruction"].startswith("train") for r in s["train"]) and len(s["val"]) == 4
    with pytest.raises(RefusalError, match="asks for 5 prompts but only 4"):
        make_splits(src, {"train": 5, "val": 5, "test": 6}, seed=1, kind="harmful")
    with pytest.raises(RefusalError, match="has no harmless_train.json"):
        load_source(str(tmp_path), "harmless")


def test_splits_are_seeded_and_disjoint():
    src = load_source("builtin", "harmful")
    sizes = {"train": 50, "val": 20, "test": 30}
    a, b = make_splits(src, sizes, 7, "harmful"), make_splits(src, sizes, 7, "harmful")
    c = make_splits(src, sizes, 8, "harmful")
    assert a == b and a != c
    seen = [r["instruction"] for s in a.values() for r in s]
    assert len(seen) == len(set(seen)) == 100
