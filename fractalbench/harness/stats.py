"""Statistics of accuracies (pure functions, no harness imports).

- :func:`wilson_interval`: the Wilson score interval of a proportion (Wilson 1927; Brown, Cai and
  DasGupta, "Interval Estimation for a Binomial Proportion", Statistical Science 2001, recommend it
  over the normal (Wald) interval, which undercovers near 0 and 1 and for small n). Every accuracy
  row of a run carries it (``ci_low``/``ci_high``, 95 %), computed from the row's value and ``n``.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for ``successes`` out of ``n`` (as proportions in
    [0, 1]); ``z`` = 1.96 gives 95 %. n = 0 gives (0, 1): nothing is known."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 0, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(percent: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson interval, in percent, of an accuracy given in percent over ``n`` samples (the
    number right is recovered as round(percent * n / 100), exact for accuracies computed on n)."""
    right = min(n, max(0, round(percent * n / 100.0)))
    low, high = wilson_interval(right, n, z)
    return 100.0 * low, 100.0 * high
