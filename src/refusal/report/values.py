"""Small readers of the run's JSON values: finite numbers, rates ``{count, n, rate, low, high}``, nested keys, and
which way a rate points (towards refusal or away from it)."""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from .blocks import RateCell


def as_dict(x: Any) -> dict:
    """``x`` if it is a JSON object, else an empty one."""
    return x if isinstance(x, dict) else {}


def is_rate(x: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(x, dict) and "rate" in x and isinstance(x.get("rate"), (int, float))


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (str, int, float, bool))


def _leaf(x: Any) -> bool:
    return _scalar(x) or is_rate(x) or (isinstance(x, list) and all(_scalar(v) for v in x) and len(x) <= 12)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _round(x: Any, digits: int) -> float | None:
    v = _num(x)
    return None if v is None else round(v, digits)


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _rate_cell(metric: str, value: Any) -> Any:
    if is_rate(value):
        return RateCell(value, None if metric not in ("refusal", "non_refusal", "refusal_score_positive")
                        else metric != "non_refusal")
    return value


def _points_to_refusal(label: str) -> bool | None:
    label = label.lower()
    if "non" in label or "comply" in label or "complied" in label:
        return False
    if "refus" in label:
        return True
    return None
