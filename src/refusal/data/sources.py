"""Instruction datasets: the built-in sets, loaders for files, folders and hub datasets, and seeded splits.

A dataset is a list of ``{"instruction": str, "category": str | None}``. A source is one of:

* ``builtin`` — the sets shipped with refusal (``builtin:harmful`` / ``builtin:harmless`` explicitly);
* a ``.json`` (list of strings or objects), ``.jsonl``, ``.csv`` or ``.txt`` (one instruction per line) file;
* a folder laid out like the paper's splits (``splits/harmful_train.json`` …, as in ``refusal_direction``);
* ``hf:ORG/NAME[:split]`` — a hub dataset (needs the ``datasets`` package and a reachable hub).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import RefusalError

FIELDS = ("instruction", "prompt", "goal", "behavior", "text", "question")
SPLITS = ("train", "val", "test")


def _records(rows: list, where: str) -> list[dict]:
    out: list[dict] = []
    for i, r in enumerate(rows):
        if isinstance(r, str):
            out.append({"instruction": r, "category": None})
            continue
        if not isinstance(r, dict):
            raise RefusalError(f"Row {i} of {where} is neither a string nor an object.",
                               "Use a list of strings or of objects with an 'instruction' field.")
        field = next((f for f in FIELDS if isinstance(r.get(f), str)), None)
        if field is None:
            raise RefusalError(
                f"{where} has no instruction field in row {i} (keys: {sorted(r)}).",
                f"Give each row an 'instruction' field (also accepted: {', '.join(FIELDS[1:])}).",
            )
        out.append({"instruction": r[field], "category": r.get("category")})
    out = [r for r in out if r["instruction"].strip()]
    if not out:
        raise RefusalError(f"{where} holds no instructions.", "Point to a file with at least one instruction.")
    return out


def builtin(kind: str) -> list[dict]:
    if kind not in ("harmful", "harmless"):
        raise RefusalError(f"Unknown built-in set '{kind}'.", "Use builtin:harmful or builtin:harmless.")
    text = resources.files("refusal").joinpath(f"data/builtin/{kind}.json").read_text("utf-8")
    return _records(json.loads(text), f"the built-in {kind} set")


def load_file(path: str | Path) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise RefusalError(f"The dataset file '{path}' does not exist.", "Check the path (or use 'builtin').")
    suffix = p.suffix.lower()
    text = p.read_text("utf-8")
    if not text.strip():
        raise RefusalError(f"The dataset file '{path}' is empty.", "Point to a file with at least one instruction.")
    try:
        if suffix == ".json":
            rows = json.loads(text)
            if isinstance(rows, dict):
                rows = next((v for v in rows.values() if isinstance(v, list)), None)
            if not isinstance(rows, list):
                raise RefusalError(f"'{path}' is not a JSON list.", "Use a list of strings or of objects.")
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif suffix == ".txt":
            rows = [line for line in text.splitlines() if line.strip()]
        else:
            raise RefusalError(f"Unsupported dataset file type '{suffix}' ({path}).",
                               "Use .json, .jsonl, .csv or .txt.")
    except json.JSONDecodeError as exc:
        raise RefusalError(f"'{path}' is not valid JSON ({exc}).",
                           "Fix the file or convert it to .txt lines.") from None
    return _records(rows, f"'{path}'")


def hub_dataset(spec: str, instead: str = "a local file") -> Any:  # a datasets.Dataset
    """The hub dataset ``hf:ORG/NAME[:split]`` (needs the optional ``datasets`` package); clear errors otherwise."""
    name, _, split = spec[3:].partition(":")
    try:
        import datasets  # optional dependency
    except ImportError:
        raise RefusalError(f"Loading '{spec}' needs the 'datasets' package.",
                           f"pip install datasets, or pass {instead}.") from None
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise RefusalError(f"Could not load the hub dataset '{name}' ({exc.__class__.__name__}: {exc}).",
                           f"Check the name and your network, or pass {instead}.") from None


def load_hub(spec: str) -> list[dict]:
    name = spec[3:].partition(":")[0]
    ds = hub_dataset(spec, "a local file with the instructions")
    return _records(list(ds), f"hub dataset '{name}'")


@dataclass
class Source:
    """Loaded instructions for one kind (harmful or harmless), with any predefined splits."""

    splits: dict[str, list[dict]]  # "all" for an unsplit source, or some of train/val/test

    @property
    def is_split(self) -> bool:
        return "all" not in self.splits


def load_source(spec: str, kind: str) -> Source:
    """Load a harmful or harmless source (see module docs). Raises before any model is loaded."""
    if spec in ("builtin", f"builtin:{kind}"):
        return Source({"all": builtin(kind)})
    if spec.startswith("builtin:"):
        return Source({"all": builtin(spec.split(":", 1)[1])})
    if spec.startswith("hf:"):
        return Source({"all": load_hub(spec)})
    p = Path(spec).expanduser()
    if p.is_dir():
        folder = p / "splits" if (p / "splits").is_dir() else p
        found = {s: folder / f"{kind}_{s}.json" for s in SPLITS if (folder / f"{kind}_{s}.json").is_file()}
        if not found:
            raise RefusalError(
                f"The folder '{spec}' has no {kind}_train.json / {kind}_val.json / {kind}_test.json.",
                "Lay the folder out like the paper's splits, or pass a single file.",
            )
        return Source({s: load_file(f) for s, f in found.items()})
    return Source({"all": load_file(p)})


def take(rows: list[dict], n: int, seed: int, what: str) -> list[dict]:
    if n > len(rows):
        raise RefusalError(
            f"The {what} split asks for {n} prompts but only {len(rows)} are available.",
            f"Lower the split size (for example --n-{what.split()[-1]} {len(rows)}) or give a larger dataset.",
        )
    return random.Random(seed).sample(rows, n)


def make_splits(source: Source, sizes: dict[str, int], seed: int, kind: str,
                test_source: Source | None = None) -> dict[str, list[dict]]:
    """Seeded train/val/test splits of ``sizes`` prompts each.

    An unsplit source is shuffled once and cut into disjoint parts; a split source is sampled per split. A separate
    ``test_source`` replaces the test split.
    """
    out: dict[str, list[dict]] = {}
    need = {s: n for s, n in sizes.items() if not (s == "test" and test_source is not None)}
    if source.is_split:
        for s, n in need.items():
            if s not in source.splits:
                raise RefusalError(f"The {kind} folder has no {kind}_{s}.json.", f"Add it, or give --{kind} a file.")
            out[s] = take(source.splits[s], n, seed, f"{kind} {s}")
    else:
        rows = list(source.splits["all"])
        total = sum(need.values())
        if total > len(rows):
            raise RefusalError(
                f"The {kind} set has {len(rows)} prompts, fewer than the {total} its splits ask for "
                f"({', '.join(f'{s} {n}' for s, n in need.items())}).",
                "Lower n_train / n_val / n_test, or give a larger dataset.",
            )
        random.Random(seed).shuffle(rows)
        i = 0
        for s, n in need.items():
            out[s] = rows[i:i + n]
            i += n
    if test_source is not None and "test" in sizes:
        test_rows = test_source.splits.get("test") or test_source.splits.get("all") or []
        out["test"] = test_rows[: sizes["test"]] if len(test_rows) >= sizes["test"] else take(
            test_rows, sizes["test"], seed, f"{kind} test")
    return out
