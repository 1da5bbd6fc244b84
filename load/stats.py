"""Order statistics for latency samples: percentiles and a fixed summary shape.

Percentiles use linear interpolation between closest ranks, the same rule as
numpy.percentile's default, so figures compare with other tools' reports.
"""
from __future__ import annotations

import math
from typing import Sequence

REPORTED_PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of values, linearly interpolated."""
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 and max; every figure is None for an empty sample."""
    out: dict[str, float | int | None] = {"count": len(values)}
    keys = ["mean", *(f"p{q}" for q in REPORTED_PERCENTILES), "max"]
    if not values:
        return out | dict.fromkeys(keys)
    out["mean"] = sum(values) / len(values)
    for q in REPORTED_PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["max"] = max(values)
    return out
