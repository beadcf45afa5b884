"""Sample statistics of measurements: mean, standard deviation and linear-interpolated percentiles."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_SAMPLES_P99 = 100
MiB = float(2**20)


@dataclass(frozen=True)
class Summary:
    """Sample statistics. std is the sample standard deviation (n - 1); p99 is None below 100 samples."""

    n: int
    mean: float
    std: float
    p50: float
    p90: float
    p99: float | None
    min: float
    max: float

    def row_stats(self) -> dict[str, float | int | None]:
        """The statistics fields of a result row (value = mean)."""
        return {"n": self.n, "std": self.std, "p50": self.p50, "p90": self.p90, "p99": self.p99}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values; q in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def summarize(values: Sequence[float]) -> Summary:
    """Summary statistics of a non-empty sequence of numbers."""
    vals = sorted(float(v) for v in values)
    n = len(vals)
    if n == 0:
        raise ValueError("cannot summarize an empty sample")
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return Summary(n, mean, std, percentile(vals, 50), percentile(vals, 90),
                   percentile(vals, 99) if n >= MIN_SAMPLES_P99 else None, vals[0], vals[-1])
