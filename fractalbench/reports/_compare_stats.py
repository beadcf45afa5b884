"""The statistics of :mod:`fractalbench.reports.compare`: the latency/memory slowdown tests (Mann-Whitney U with
the Hodges-Lehmann ratio, a z-test on summary statistics, or the ratio alone), the chi-square
test of two exit histograms, and the accuracy tests (McNemar's exact test on paired per-sample
outcomes, Newcombe's interval with a two-proportion z-test on two independent sample sets, and the
Holm-Bonferroni correction). See the rules in the docstring of :mod:`fractalbench.reports.compare`."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fractalbench.harness.results import detail_of
from fractalbench.harness.stats import Z95, wilson_interval

MIN_SAMPLES = 3
MAX_PAIRWISE = 2_000_000


def _num(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


@dataclass(frozen=True)
class RatioVerdict:
    """Outcome of a latency/memory comparison. ratio: candidate / baseline estimate; ratio_high:
    its upper confidence limit (None for ratio-only); p: one-sided p-value for "candidate larger"."""

    ratio: float
    ratio_high: float | None
    p: float | None
    method: str
    regression: bool
    improved: bool
    significant: bool


def _finite(values: Any) -> np.ndarray | None:
    if not isinstance(values, (list, tuple)):
        return None
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return None
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return arr if arr.size >= MIN_SAMPLES else None


def _pairwise_log_differences(cand: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, int, int]:
    """All log(c_i) - log(b_j) (sorted) and the two sample sizes used."""
    lc, lb = np.log(cand), np.log(base)
    if lc.size * lb.size > MAX_PAIRWISE:  # subsample deterministically; the estimate barely moves
        rng = np.random.default_rng(0)
        side = int(math.sqrt(MAX_PAIRWISE))
        lc = rng.choice(lc, min(side, lc.size), replace=False)
        lb = rng.choice(lb, min(side, lb.size), replace=False)
    return np.sort((lc[:, None] - lb[None, :]).ravel()), lc.size, lb.size


def compare_samples(baseline: Sequence[float], candidate: Sequence[float], ratio_threshold: float,
                    p_value: float) -> RatioVerdict:
    """Mann-Whitney U (one-sided) + Hodges-Lehmann ratio with its upper confidence limit."""
    from scipy.stats import mannwhitneyu, norm

    base, cand = np.asarray(baseline, dtype=float), np.asarray(candidate, dtype=float)
    p_greater = float(mannwhitneyu(cand, base, alternative="greater").pvalue)
    p_less = float(mannwhitneyu(cand, base, alternative="less").pvalue)
    diffs, m, n = _pairwise_log_differences(cand, base)
    total = diffs.size
    ratio = float(np.exp(np.median(diffs)))
    # Distribution-free confidence limits of the shift: order statistics of the pairwise
    # differences at mn/2 -/+ z sigma_U (normal approximation of the U distribution).
    spread = norm.ppf(1 - p_value) * math.sqrt(m * n * (m + n + 1) / 12.0)
    hi_index = min(total - 1, int(math.ceil(total / 2 + spread)))
    lo_index = max(0, int(math.floor(total / 2 - spread)))
    high, low = float(np.exp(diffs[hi_index])), float(np.exp(diffs[lo_index]))
    regression = _flag(ratio, high, p_greater, ratio_threshold, p_value)
    improved = _flag(1 / ratio, 1 / low, p_less, ratio_threshold, p_value)
    return RatioVerdict(ratio, high, p_greater, "Mann-Whitney U", regression, improved, p_greater < p_value)


def compare_summaries(base: tuple[float, float, int], cand: tuple[float, float, int], ratio_threshold: float,
                      p_value: float) -> RatioVerdict:
    """(mean, std, n) on both sides: one-sided z-test on the log ratio of means (delta method)."""
    from scipy.stats import norm

    (mb, sb, nb), (mc, sc, nc) = base, cand
    ratio = mc / mb
    se = math.sqrt((sb / mb) ** 2 / nb + (sc / mc) ** 2 / nc)
    if se == 0:
        p = 0.0 if ratio > 1 else 1.0
        high = low = ratio
    else:
        z = math.log(ratio) / se
        p = float(norm.sf(z))
        high = ratio * math.exp(norm.ppf(1 - p_value) * se)
        low = ratio * math.exp(-norm.ppf(1 - p_value) * se)
    regression = _flag(ratio, high, p, ratio_threshold, p_value)
    improved = _flag(1 / ratio, 1 / low, 1 - p, ratio_threshold, p_value)
    return RatioVerdict(ratio, high, p, "z-test on mean (n, std)", regression, improved, p < p_value)


def _flag(ratio: float, high: float, p: float, threshold: float, p_value: float) -> bool:
    return p < p_value and high >= threshold and ratio > 1 + (threshold - 1) / 2


def compare_ratio(base_row: Mapping[str, Any], cand_row: Mapping[str, Any], ratio_threshold: float,
                  p_value: float) -> RatioVerdict:
    """Choose the test by what the rows carry (samples, n/std, or neither) and apply it."""
    bs = _finite(detail_of(base_row.get("detail")).get("samples"))
    cs = _finite(detail_of(cand_row.get("detail")).get("samples"))
    if bs is not None and cs is not None:
        return compare_samples(bs, cs, ratio_threshold, p_value)
    stats = [_summary(base_row), _summary(cand_row)]
    if stats[0] and stats[1]:
        return compare_summaries(stats[0], stats[1], ratio_threshold, p_value)
    use_p50 = _num(base_row.get("p50")) and _num(cand_row.get("p50"))
    b = float(base_row["p50"] if use_p50 else base_row["value"])
    c = float(cand_row["p50"] if use_p50 else cand_row["value"])
    ratio = c / b if b else math.inf
    return RatioVerdict(ratio, None, None, f"ratio only ({'p50' if use_p50 else 'value'})", ratio > ratio_threshold,
                        ratio < 1 / ratio_threshold, False)


def _summary(row: Mapping[str, Any]) -> tuple[float, float, int] | None:
    if not (_num(row.get("value")) and _num(row.get("std")) and _num(row.get("n"))):
        return None
    mean, std, n = float(row["value"]), float(row["std"]), int(row["n"])
    return (mean, std, n) if n >= 2 and mean > 0 and std >= 0 else None


def exit_drift(base_counts: Sequence[float], cand_counts: Sequence[float]) -> float:
    """p-value of the chi-square test of homogeneity of two exit histograms (counts per exit);
    exits empty on both sides are dropped; 1.0 when fewer than two exits remain."""
    from scipy.stats import chi2_contingency

    k = max(len(base_counts), len(cand_counts))
    b = np.zeros(k)
    c = np.zeros(k)
    b[: len(base_counts)], c[: len(cand_counts)] = base_counts, cand_counts
    used = (b + c) > 0
    if used.sum() < 2 or b.sum() == 0 or c.sum() == 0:
        return 1.0
    return float(chi2_contingency(np.vstack([b[used], c[used]]), correction=False).pvalue)



# ----- accuracy: paired (McNemar), unpaired (Newcombe) and the Holm correction ---------------------------

ACCURACY_EPS = 1e-9  # points: "reaches the threshold" forgives float rounding (1.0 computed as 0.99999...)


@dataclass(frozen=True)
class AccuracyTest:
    """The test of one accuracy row pair (before the Holm adjustment).

    diff: candidate - baseline in percentage points; low / high: its confidence limits, each a
    one-sided bound at level 1 - p_value (None for the fixed-points rule); p_worse / p_better: the
    one-sided p-values for "candidate lower" / "candidate higher" (None: no test); method: the test's
    name; detail: what it counted (b and c, or the two n), for the note."""

    diff: float
    low: float | None
    high: float | None
    p_worse: float | None
    p_better: float | None
    method: str
    detail: str


def mcnemar_exact(b: int, c: int) -> tuple[float, float]:
    """McNemar's exact test on the discordant pairs of two paired right/wrong vectors.

    b: samples right in the baseline and wrong in the candidate; c: the reverse. Under "no
    difference" each of the m = b + c discordant samples is a fair coin, so X ~ Binomial(m, 1/2) and
    the one-sided p-values are (P(X >= b) for "candidate worse", P(X >= c) for "candidate better");
    (1, 1) when m = 0. Example: b = 5, c = 0 gives 1/32 and 1."""
    from scipy.stats import binom

    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0, 1.0
    return float(binom.sf(b - 1, m, 0.5)), float(binom.sf(c - 1, m, 0.5))


def paired_difference(b: int, c: int, n: int, z: float) -> tuple[float, float, float]:
    """(diff, low, high) of the paired accuracy difference candidate - baseline, in points.

    diff = 100 (c - b) / n. The interval is conditional on the discordant count m = b + c: with
    s = b / m the share of discordant samples the candidate lost, diff = 100 m (1 - 2 s) / n, so the
    Wilson interval (s_low, s_high) of s at ``z`` maps to (100 m (1 - 2 s_high) / n, 100 m (1 - 2 s_low) / n).
    It ignores the sampling variation of m itself; m = 0 gives the point (0, 0, 0)."""
    if n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need 0 <= b, c and b + c <= n > 0, got b={b}, c={c}, n={n}")
    m = b + c
    s_low, s_high = wilson_interval(b, m, z)
    scale = 100.0 * m / n
    return 100.0 * (c - b) / n, scale * (1 - 2 * s_high), scale * (1 - 2 * s_low)


def newcombe_interval(x1: float, n1: int, x2: float, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (1998, method 10) for p1 - p2 of two independent proportions
    x1 / n1 and x2 / n2 (as proportions): with (l_i, u_i) the Wilson interval of p_i at ``z``,
    low = d - sqrt((p1 - l1)^2 + (u2 - p2)^2) and high = d + sqrt((u1 - p1)^2 + (p2 - l2)^2), d = p1 - p2.
    Newcombe's Table II example: 56/70 - 48/80 at 95 % gives (0.0524, 0.3339)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, z)
    l2, u2 = wilson_interval(x2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def two_proportion_z(x_base: float, n_base: int, x_cand: float, n_cand: int) -> tuple[float, float]:
    """One-sided p-values (candidate lower, candidate higher) of the pooled two-proportion z-test:
    z = (p_cand - p_base) / sqrt(q (1 - q) (1 / n_base + 1 / n_cand)), q = the pooled proportion;
    (Phi(z), 1 - Phi(z)). (1, 1) when q is 0 or 1 (both sides all wrong or all right)."""
    from scipy.stats import norm

    q = (x_base + x_cand) / (n_base + n_cand)
    se = math.sqrt(q * (1 - q) * (1 / n_base + 1 / n_cand))
    if se == 0:
        return 1.0, 1.0
    z = (x_cand / n_cand - x_base / n_base) / se
    return float(norm.cdf(z)), float(norm.sf(z))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the order given: with p_(1) <= ... <= p_(m)
    sorted, adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where the
    adjusted p < alpha keeps the family-wise error rate at most alpha. Example: (0.01, 0.04, 0.03)
    gives (0.03, 0.06, 0.06)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out = [1.0] * len(pvalues)
    running, m = 0.0, len(pvalues)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def paired_test(base_correct: np.ndarray, cand_correct: np.ndarray, p_value: float) -> AccuracyTest:
    """McNemar's exact test and the paired interval of two right/wrong vectors of the same samples."""
    from scipy.stats import norm

    base_correct, cand_correct = np.asarray(base_correct, bool), np.asarray(cand_correct, bool)
    b = int(np.count_nonzero(base_correct & ~cand_correct))
    c = int(np.count_nonzero(~base_correct & cand_correct))
    n = int(base_correct.size)
    diff, low, high = paired_difference(b, c, n, float(norm.ppf(1 - p_value)))
    p_worse, p_better = mcnemar_exact(b, c)
    return AccuracyTest(diff, low, high, p_worse, p_better, "McNemar exact", f"b={b} c={c} of n={n}")


def unpaired_test(base: float, n_base: int, cand: float, n_cand: int, p_value: float) -> AccuracyTest:
    """Two accuracies (%) of independent sample sets: Newcombe's interval (Wilson at level
    1 - p_value per side, counts = accuracy x n / 100) and the one-sided two-proportion z-test."""
    from scipy.stats import norm

    xb = min(n_base, max(0.0, base * n_base / 100.0))
    xc = min(n_cand, max(0.0, cand * n_cand / 100.0))
    low, high = newcombe_interval(xc, n_cand, xb, n_base, float(norm.ppf(1 - p_value)))
    p_worse, p_better = two_proportion_z(xb, n_base, xc, n_cand)
    return AccuracyTest(cand - base, 100.0 * low, 100.0 * high, p_worse, p_better, "Newcombe interval + z-test",
                        f"n={n_base}/{n_cand}")


def accuracy_flag(change: float, limit: float, p: float, points: float, p_value: float) -> bool:
    """The accuracy rule in one direction: ``change`` (the drop, or the gain, in points) with the
    confidence limit on its far side ``limit`` and its adjusted p. True when p < p_value AND
    limit >= points (within ACCURACY_EPS) AND change > points / 2."""
    return p < p_value and limit >= points - ACCURACY_EPS and change > points / 2


def seed_group_test(base: Sequence[float], cand: Sequence[float], p_value: float) -> AccuracyTest:
    """Accuracies (%) of seed groups (one value per seed). Both sides with >= 2 seeds: Welch's t-test
    on the means (Welch-Satterthwaite degrees of freedom). One side with a single run: where that
    run falls in the other group's prediction interval, t = (x - mean) / (sd sqrt(1 + 1/k)) with
    k - 1 degrees of freedom (a single run is compared with the spread a new seed would show).
    diff = candidate mean - baseline mean; limits at level 1 - p_value each."""
    from scipy.stats import t as student

    b, c = np.asarray(base, dtype=float), np.asarray(cand, dtype=float)
    diff = float(c.mean() - b.mean())
    if b.size >= 2 and c.size >= 2:
        vb, vc = b.var(ddof=1) / b.size, c.var(ddof=1) / c.size
        se = math.sqrt(vb + vc)
        df = (vb + vc) ** 2 / (vb ** 2 / (b.size - 1) + vc ** 2 / (c.size - 1)) if se > 0 else 1.0
        method = f"Welch t-test over seeds ({b.size} vs {c.size} seeds)"
    else:
        group = b if b.size >= 2 else c
        se = float(group.std(ddof=1)) * math.sqrt(1 + 1 / group.size)
        df = group.size - 1.0
        method = f"prediction interval of {group.size} seeds vs a single run"
    if se == 0:
        p_worse, p_better = (0.0 if diff < 0 else 1.0), (0.0 if diff > 0 else 1.0)
        return AccuracyTest(diff, diff, diff, p_worse, p_better, method, "no spread across seeds")
    z = diff / se
    half = float(student.ppf(1 - p_value, df)) * se
    return AccuracyTest(diff, diff - half, diff + half, float(student.cdf(z, df)), float(student.sf(z, df)), method,
                        f"means {b.mean():.2f}/{c.mean():.2f}, sd {b.std(ddof=1) if b.size > 1 else 0:.2f}/"
                        f"{c.std(ddof=1) if c.size > 1 else 0:.2f}")
