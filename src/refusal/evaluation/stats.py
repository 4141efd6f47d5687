"""Rates with confidence intervals: the Wilson score interval for a binomial proportion.

The Wilson interval stays inside [0, 1] and behaves well at rates near 0 or 1 and for small ``n`` (where the
normal-approximation interval collapses to a point or spills outside [0, 1]), which is where refusal rates live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``k`` successes in ``n`` trials (``z=1.96``: 95%).

    With ``n == 0`` nothing is known, and the interval is the whole of ``[0, 1]``.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if z < 0:
        raise ValueError(f"wilson needs z >= 0, got {z}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact at the ends (the formula gives 0 and 1 only up to rounding)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """``count`` of ``n`` items, their ``rate`` and its Wilson interval ``[low, high]``."""

    count: int
    n: int
    rate: float
    low: float
    high: float

    @classmethod
    def of(cls, count: int, n: int, z: float = 1.96) -> Rate:
        low, high = wilson(count, n, z)
        return cls(count, n, count / n if n else float("nan"), low, high)

    def to_json(self, digits: int | None = 4) -> dict:
        """A JSON-safe dict (``rate`` is ``None`` when ``n == 0``, since JSON has no NaN)."""

        def r(x: float) -> float | None:
            if math.isnan(x):
                return None
            return round(x, digits) if digits is not None else x

        return {"count": self.count, "n": self.n, "rate": r(self.rate), "low": r(self.low), "high": r(self.high)}

    def __str__(self) -> str:
        if not self.n:
            return "0/0"
        return f"{self.count}/{self.n} = {self.rate:.1%} [{self.low:.1%}, {self.high:.1%}]"
