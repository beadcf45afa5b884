"""The statistics of :mod:`reports.compare`: the latency/memory slowdown tests (Mann-Whitney U with
the Hodges-Lehmann ratio, a z-test on summary statistics, or the ratio alone) and the chi-square
test of two exit histograms. See the rules in the docstring of :mod:`reports.compare`."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.results import detail_of

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

