"""percentile() against numpy.percentile (linear interpolation) on fresh random samples."""
from __future__ import annotations

import numpy as np
import pytest

from lumen.load.stats import distribution, percentile


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_matches_numpy(n):
    rng = np.random.default_rng()
    values = rng.lognormal(size=n).tolist()
    for q in [0, 1, 25, 50, 90, 99, 99.9, 100, *rng.uniform(0, 100, size=5).tolist()]:
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-12)


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_distribution():
    d = distribution([4.0, 1.0, 3.0, 2.0])
    assert d == {"count": 4, "mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97),
                 "max": 4.0}
    assert distribution([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
