"""Wilson intervals against published values (Newcombe 1998, Stat. Med. 17:857, Table I, method 3)."""

from __future__ import annotations

import json
import math

import pytest

from refusal.evaluation.stats import Rate, wilson


@pytest.mark.parametrize("k,n,low,high", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_closed_forms():
    # k = 0: upper bound z^2 / (n + z^2); k = n mirrors it; k = n/2 is centred on 1/2
    z = 1.96
    assert wilson(0, 10) == (0.0, pytest.approx(z * z / (10 + z * z)))
    assert wilson(10, 10) == (pytest.approx(10 / (10 + z * z)), 1.0)
    lo, hi = wilson(5, 10)
    assert (lo + hi) / 2 == pytest.approx(0.5)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    # a wider z widens the interval; z = 0 collapses it to the point estimate
    assert wilson(3, 10, z=2.576)[0] < wilson(3, 10)[0]
    assert wilson(3, 10, z=0) == (pytest.approx(0.3), pytest.approx(0.3))


def test_wilson_edge_cases():
    assert wilson(0, 0) == (0.0, 1.0)
    for k, n in [(-1, 5), (6, 5), (0, -1)]:
        with pytest.raises(ValueError):
            wilson(k, n)


def test_rate_to_json():
    r = Rate.of(81, 263)
    assert (r.count, r.n) == (81, 263)
    assert r.rate == pytest.approx(81 / 263)
    assert r.low <= r.rate <= r.high
    j = r.to_json()
    assert j == {"count": 81, "n": 263, "rate": 0.308, "low": 0.2553, "high": 0.3662}
    assert json.loads(json.dumps(j)) == j
    assert r.to_json(digits=None)["rate"] == r.rate
    empty = Rate.of(0, 0)
    assert math.isnan(empty.rate)
    assert empty.to_json() == {"count": 0, "n": 0, "rate": None, "low": 0.0, "high": 1.0}
    json.dumps(empty.to_json(), allow_nan=False)
    assert str(Rate.of(3, 10)) == "3/10 = 30.0% [10.8%, 60.3%]"
