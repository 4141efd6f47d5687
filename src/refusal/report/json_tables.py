"""Any JSON value as report blocks: mappings of mappings as tables, deeper mappings as one sub-heading per key,
lists of records as tables, matrices as colour-coded grids and ``{count, n, rate, low, high}`` as rates."""

from __future__ import annotations

import json
from typing import Any, TypeGuard

from .blocks import Heat, RateCell, Sub, Table, Text
from .values import _leaf, _num, _points_to_refusal, is_rate

MAX_RECORD_ROWS = 200


def _depth(x: Any) -> int:
    if _leaf(x):
        return 0
    if isinstance(x, dict):
        return 1 + max((_depth(v) for v in x.values()), default=0)
    return 1


def _matrix(x: Any) -> TypeGuard[list[list[Any]]]:
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
