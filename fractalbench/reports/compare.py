"""Compare two runs metric by metric and say whether the candidate regressed (CI gating).

Either side is a run directory, a committed baseline file (JSON ``{"schema_version": 1,
"rows": [...]}`` as written by :func:`write_baseline`; a run's ``results.json`` has the same form)
or a list of rows. Rows are matched on model, variant, dataset, device, batch size, exit, policy,
threshold, split and metric (plus ``gate`` / ``layer`` + ``expert`` / ``cost_unit`` from detail for
gate_rate / expert_load / unit_macs rows). A baseline file written with a metric filter
(``fractalbench baseline`` keeps the machine-independent metrics by default) records it, and the
candidate's rows of other metrics (latency, memory, ...) are then left out rather than listed as new.

How a metric is compared follows its kind in the metric catalogue (:mod:`fractalbench.harness.catalogue`); the
sets below are derived from it, and a metric the catalogue does not know is information.

Rules (thresholds: suite ``compare`` section, then arguments; defaults in :class:`Thresholds`)
-------------------------------------------------------------------------------------------------
- Accuracy (kind ``accuracy``: top1, top5, policy_top1, top1_full; %) with P = ``accuracy_points``
  and alpha = ``p_value``. The difference d = candidate - baseline (points) is estimated with a
  confidence interval whose two limits are each one-sided bounds at level 1 - alpha, by the first
  of these that applies:

  * paired: both sides are run directories whose cells kept per-sample outcomes
    (:mod:`fractalbench.harness.outcomes`) on the same test samples (equal sample digests), each with the
    outcome of this row (and that outcome's accuracy equals the row's value). b = samples right in
    the baseline and wrong in the candidate, c = the reverse, n = the samples. McNemar's exact test:
    p = P(X >= b) with X ~ Binomial(b + c, 1/2) (p = 1 when b + c = 0); d = 100 (c - b) / n, its
    interval the Wilson interval of the share b / (b + c) mapped to d (conditional on b + c).
  * interval rule: not paired (the sample sets differ, or a side has no outcomes: a baseline file,
    a run made before outcomes existed) but both rows have n: Newcombe's hybrid score interval
    (method 10, from the two Wilson intervals) and the one-sided pooled two-proportion z-test.
  * fixed points (neither): regression when the candidate is more than P points lower, improved
    when more than P higher; no test, no p.
  * seed groups (either side holds the row for several seeds, ``seeds`` in the suite; this comes
    first): Welch's t-test on the per-seed accuracies when both sides have two or more seeds, else
    the single run against the group's prediction interval (t with k - 1 degrees of freedom); d is
    the difference of the means (:func:`fractalbench.reports._compare_stats.seed_group_test`).

  The Holm family is every accuracy row pair of one ``compare`` call that got a test (paired or
  interval rule): their "candidate lower" p-values are Holm-Bonferroni adjusted together (and,
  separately, their "candidate higher" p-values), so same-build noise flags some row of the whole
  family at most at rate alpha. Regression when the adjusted p < alpha AND the drop's upper limit
  reaches P AND the estimated drop exceeds P / 2; improved symmetrically. So a drop of exactly P is
  caught when the samples are enough (100 of 10,000 right answers turned wrong: McNemar p = 2^-100,
  upper limit exactly 1 point), and a significant drop of less than about P / 2 is not a regression:
  it stays ok with the note "significant drop below the threshold". A row's p is the adjusted p of
  the direction of its change (lower when d <= 0); its note names the test, b and c (or the two n),
  why it is unpaired, the size of the Holm family and the interval of d.
- Exact counts (kind ``count``: params, params_active, macs, flops, unit_macs, macs_fvcore,
  macs_oracle_error): any change is a regression.
- Latency (kind ``timing``: latency, latency_masked, latency_overhead; ms) with ``latency_ratio``
  and memory (kind ``memory``: memory_*; MiB) with ``memory_ratio``: the slowdown ratio
  candidate / baseline is estimated, then

  * with per-call samples on both sides (detail ``"samples"``, >= 3 each): the Mann-Whitney U test
    (one-sided, candidate slower) gives p; the ratio is the Hodges-Lehmann estimate (median of the
    pairwise log differences, exponentiated) with its distribution-free upper confidence limit at
    level 1 - p_value. Regression when p < ``p_value`` AND the upper limit reaches the ratio
    threshold AND the estimate is above the midpoint 1 + (threshold - 1) / 2. So a slowdown of
    exactly the threshold is flagged (a point-estimate rule would catch it only half the time),
    one that is clearly smaller is not, and noise alone is flagged at most at rate p_value.
  * without samples but with n >= 2 and std on both sides (rows always carry them; value = mean):
    the same rule with a one-sided z-test on the log ratio of means (Welch, delta method).
  * with neither (single numbers, e.g. memory peaks): ratio only. Regression when
    candidate / baseline > threshold, using p50 where both rows have it, else the value.

  Memory (MiB) that grows by less than ``MEMORY_FLOOR_MIB`` (0.5 MiB) is never a regression: the
  CPU peak (VmHWM) of a small model moves by a few hundred KiB between identical runs.
  Latency is only comparable between runs on the same, otherwise idle machine: on a loaded or
  shared machine the whole distribution shifts between runs (two runs of one build on a busy
  2-core VM differed by x0.6 to x2.1), which no test on the samples of each run can tell from a
  regression. Time baseline and candidate on the same runner, one after the other.

- Exit histograms (kind ``distribution``: the exit_fraction rows of one model/policy/threshold):
  chi-square test of homogeneity on the counts (detail ``count``, else fraction x n); a drift
  (p < ``exit_drift_p_value``) is a regression when the candidate pays for it: that policy point's
  expected MACs rose (without expected-MACs rows: its mean exit moved later) or its policy top-1
  dropped; a drift toward cheaper exits at no loss of accuracy is "changed", shown, not failing.
- A cell (model, variant, dataset, device) of the baseline that has no row in the candidate (a model
  that dropped out of the run) is a regression, unless ``allow_missing`` (``--allow-missing``).
- A cell that failed in the candidate but not in the baseline, or a measurement row that carries an
  error in the candidate only, is a regression. Metrics of kind ``info`` (training time and losses,
  expected MACs, gate rates, expert loads, predicted latency, ...) are shown as information.
  Metrics of a cell present on both sides but given on one side only are listed as missing / new.

The command lines are ``fractalbench compare`` and ``fractalbench baseline`` (:mod:`fractalbench.harness.cli`),
which call :func:`compare_main` and :func:`write_baseline`.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fractalbench.harness.catalogue import names
from fractalbench.harness.outcomes import CellOutcomes
from fractalbench.harness.results import detail_of
from fractalbench.reports._compare_result import (
    CHANGED,
    IMPROVED,
    INFO,
    MISSING,
    NEW,
    NOTABLE,
    OK,
    REGRESSION,
    SLOWER,
    Comparison,
    MetricComparison,
    Thresholds,
)
from fractalbench.reports._compare_sources import BASELINE_DETAIL_KEYS, Source, load_source, write_baseline
from fractalbench.reports._compare_stats import (
    MAX_PAIRWISE,
    MIN_SAMPLES,
    AccuracyTest,
    RatioVerdict,
    _num,
    accuracy_flag,
    compare_ratio,
    compare_samples,
    compare_summaries,
    exit_drift,
    holm,
    mcnemar_exact,
    paired_test,
    seed_group_test,
    unpaired_test,
)

__all__ = [
    "ACCURACY_METRICS", "AccuracyTest", "BASELINE_DETAIL_KEYS", "Comparison", "DETAIL_KEYS", "DRIFT_METRICS",
    "ERROR_METRICS", "EXACT_METRICS", "IMPROVED", "INFO", "INFO_METRICS", "KEY_FIELDS", "LATENCY_METRICS",
    "MACHINE_INDEPENDENT_METRICS", "MAX_PAIRWISE", "MEMORY_FLOOR_MIB", "MEMORY_METRICS", "MIN_SAMPLES", "MISSING",
    "MetricComparison", "NEW", "NOTABLE", "OK", "REGRESSION", "RatioVerdict", "SLOWER", "Source", "Thresholds",
    "compare", "compare_main", "compare_pair", "compare_ratio", "compare_samples", "compare_summaries", "exit_drift",
    "holm", "load_source", "mcnemar_exact", "row_key", "write_baseline",
]

# The metric sets of the rules, from the catalogue's kinds.
ACCURACY_METRICS = names(kinds=["accuracy"])
EXACT_METRICS = names(kinds=["count"])
LATENCY_METRICS = names(kinds=["timing"])
MEMORY_METRICS = names(kinds=["memory"])
DRIFT_METRICS = names(kinds=["distribution"])
INFO_METRICS = names(kinds=["info"])
ERROR_METRICS = names(kinds=["error"])
# What a committed baseline keeps by default (`fractalbench baseline`): numbers that do not depend on
# the machine that measured them. Latency and memory only compare between runs on one machine.
MACHINE_INDEPENDENT_METRICS = names(kinds=["accuracy", "count", "distribution", "error"], machine_dependent=False)
KEY_FIELDS = ("model", "variant", "dataset", "device", "batch_size", "exit", "policy", "threshold", "split", "metric")
DETAIL_KEYS = {"gate_rate": ("gate",), "expert_load": ("layer", "expert"), "tokens_dropped": ("layer",),
               "unit_macs": ("cost_unit",), "macs_at_length": ("length",), "latency_at_length": ("length",),
               "memory_at_length": ("length",), "latency_backend": ("backend",),
               "backend_outcome_mismatches": ("backend",)}
MEMORY_FLOOR_MIB = 0.5  # growth smaller than this is never a regression (RSS page and allocator noise)
_CELL_FIELDS = ("model", "variant", "dataset", "device")
_Outcomes = tuple[Mapping[str, CellOutcomes], Mapping[str, CellOutcomes]]  # (baseline's, candidate's)


# ----- matching rows ---------------------------------------------------------------------------------

def _norm(name: str, value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "" if name not in ("batch_size", "exit", "threshold") else None
    if name in ("batch_size", "exit"):
        return int(value)
    if name == "threshold":
        return round(float(value), 9)
    return str(value)


def row_key(row: Mapping[str, Any]) -> tuple:
    """The identity of a row across runs (see the module docstring)."""
    metric = str(row.get("metric", ""))
    key = tuple(_norm(f, row.get(f)) for f in KEY_FIELDS)
    extra = tuple(detail_of(row.get("detail")).get(k) for k in DETAIL_KEYS.get(metric, ()))
    return key + extra


def _groups(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, list[Mapping[str, Any]]]:
    """Rows by :func:`row_key`; a key holds several rows when a run has several seeds of it."""
    out: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(row_key(row), []).append(row)
    return out


def _seed_group_pair(bgroup: list[Mapping[str, Any]], cgroup: list[Mapping[str, Any]],
                     th: Thresholds) -> tuple[MetricComparison, AccuracyTest] | None:
    """An accuracy row of which a side holds several seeds: the seed-group test (None otherwise)."""
    if max(len(bgroup), len(cgroup)) < 2 or _kind(bgroup[0]) != "accuracy":
        return None
    values = [[float(r["value"]) for r in g if _num(r.get("value")) and not r.get("error")] for g in (bgroup, cgroup)]
    if not values[0] or not values[1] or max(len(values[0]), len(values[1])) < 2:
        return None
    test = seed_group_test(values[0], values[1], th.p_value)
    b, c = sum(values[0]) / len(values[0]), sum(values[1]) / len(values[1])
    return _accuracy_result(_key_dict(bgroup[0]), b, c, test, (test.p_worse, test.p_better), 1, th), test


def _key_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    key = {f: _norm(f, row.get(f)) for f in KEY_FIELDS}
    d = detail_of(row.get("detail"))
    for k in DETAIL_KEYS.get(str(row.get("metric", "")), ()):
        key[k] = d.get(k)
    if str(row.get("metric")) in DETAIL_KEYS:
        extra = ",".join(f"{k}={d.get(k)}" for k in DETAIL_KEYS[str(row["metric"])])
        key["metric"] = f"{row['metric']}[{extra}]"
    return key


def compare(baseline: Any, candidate: Any, thresholds: Thresholds | Mapping[str, Any] | None = None,
            *, allow_missing: bool = False, **overrides: Any) -> Comparison:
    """Compare ``candidate`` with ``baseline`` (run directories, baseline files or row lists).

    Thresholds: the defaults, updated by the baseline's then the candidate's suite ``compare``
    section, then ``thresholds``, then keyword ``overrides`` (e.g. ``latency_ratio=1.5``). A cell
    (model, variant, dataset, device) of the baseline with no row in the candidate is a regression
    unless ``allow_missing`` (then it is listed as missing)."""
    base, cand = load_source(baseline, "baseline"), load_source(candidate, "candidate")
    th = Thresholds().updated(base.compare).updated(cand.compare)
    th = th.updated(asdict(thresholds) if isinstance(thresholds, Thresholds) else thresholds).updated(overrides)
    warnings = []
    bd, cd = base.suite.get("digest"), cand.suite.get("digest")
    if bd and cd and bd != cd:
        warnings.append(f"the suites differ (baseline {base.suite.get('name')} {bd}, "
                        f"candidate {cand.suite.get('name')} {cd}); only matching rows are compared")
    cand_rows = cand.rows
    if base.metrics is not None:  # a filtered baseline: the candidate's other metrics are not compared
        kept = base.metrics | ERROR_METRICS
        cand_rows = [r for r in cand.rows if r.get("metric") in kept]
        if len(cand_rows) < len(cand.rows):
            warnings.append(f"the baseline keeps only {', '.join(sorted(base.metrics))}; "
                            f"{len(cand.rows) - len(cand_rows)} candidate rows of other metrics are not compared")
    results = _compare_rows(base.rows, cand_rows, th, (base.outcomes, cand.outcomes))
    results = _missing_cells(base.rows, cand.rows, allow_missing) + results
    if not any(r.status not in (MISSING, NEW) for r in results) and base.rows and cand.rows:
        warnings.append("no row of the candidate matches a row of the baseline "
                        "(different models, datasets or devices?)")
    return Comparison(base.label, cand.label, th, results, warnings)


def _compare_rows(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]], th: Thresholds,
                  outcomes: _Outcomes = ({}, {})) -> list[MetricComparison]:
    results = _compare_errors(base_rows, cand_rows)
    separate = DRIFT_METRICS | ERROR_METRICS  # compared per histogram / per cell
    bg = _groups(r for r in base_rows if r.get("metric") not in separate)
    cg = _groups(r for r in cand_rows if r.get("metric") not in separate)
    bi, ci = {k: g[0] for k, g in bg.items()}, {k: g[0] for k, g in cg.items()}
    tested: list[tuple[int, AccuracyTest]] = []  # the Holm family: (index in results, test)
    for key, brow in bi.items():
        crow = ci.get(key)
        if crow is None:
            results.append(MetricComparison(_key_dict(brow), _kind(brow), brow.get("value"), None, "", MISSING,
                                            note="not in candidate"))
            continue
        result, test = _seed_group_pair(bg[key], cg[key], th) or _pair(brow, crow, th, outcomes)
        if test is not None and test.p_worse is not None:
            tested.append((len(results), test))
        results.append(result)
    for key, crow in ci.items():
        if key not in bi:
            results.append(MetricComparison(_key_dict(crow), _kind(crow), None, crow.get("value"), "", NEW,
                                            note="not in baseline"))
    worse = holm([t.p_worse for _, t in tested])
    better = holm([t.p_better for _, t in tested])
    for (i, test), p_worse, p_better in zip(tested, worse, better):
        r = results[i]
        results[i] = _accuracy_result(r.key, r.baseline, r.candidate, test, (p_worse, p_better), len(tested), th)
    results.extend(_compare_histograms(base_rows, cand_rows, th))
    return results


def _kind(row: Mapping[str, Any]) -> str:
    """The rule of a row's metric: accuracy, exact, latency, memory or info."""
    m = row.get("metric")
    if m in ACCURACY_METRICS:
        return "accuracy"
    if m in EXACT_METRICS:
        return "exact"
    if m in LATENCY_METRICS:
        return "latency"
    if m in MEMORY_METRICS:
        return "memory"
    return "info"


def compare_pair(brow: Mapping[str, Any], crow: Mapping[str, Any], th: Thresholds,
                 outcomes: _Outcomes = ({}, {})) -> MetricComparison:
    """One matched pair of rows under the rules of the module docstring. ``outcomes``: the
    per-sample outcomes of the two runs (cell id -> CellOutcomes). An accuracy pair compared alone
    is a Holm family of one (its raw p); :func:`compare` adjusts all accuracy pairs together."""
    return _pair(brow, crow, th, outcomes)[0]


def _pair(brow: Mapping[str, Any], crow: Mapping[str, Any], th: Thresholds,
          outcomes: _Outcomes) -> tuple[MetricComparison, AccuracyTest | None]:
    """:func:`compare_pair`, with the accuracy test of an accuracy pair (None for other pairs)."""
    kind, key = _kind(brow), _key_dict(brow)
    b, c = brow.get("value"), crow.get("value")
    if crow.get("error") and not brow.get("error"):
        return MetricComparison(key, kind, b, None, "", REGRESSION if kind != "info" else INFO,
                                note=f"candidate measurement failed: {str(crow['error'])[:200]}"), None
    if not (_num(b) and _num(c)):
        return MetricComparison(key, kind, b, c, "", INFO, note="no value to compare"), None
    b, c = float(b), float(c)
    if kind == "accuracy":
        test = _accuracy_test(brow, crow, th, outcomes)
        return _accuracy_result(key, b, c, test, (test.p_worse, test.p_better), 1, th), test
    if kind == "exact":
        status = OK if c == b else REGRESSION
        return MetricComparison(key, kind, b, c, f"{c - b:+,.0f}" if c != b else "0", status,
                                note="exact count changed" if status == REGRESSION else ""), None
    if kind in ("latency", "memory"):
        return _compare_ratio_pair(brow, crow, key, kind, th), None
    change = f"{c - b:+.4g}" if c != b else "0"
    return MetricComparison(key, kind, b, c, change, INFO), None


# ----- accuracy --------------------------------------------------------------------------------------

def _paired_bits(brow: Mapping[str, Any], crow: Mapping[str, Any],
                 outcomes: _Outcomes) -> tuple[np.ndarray, np.ndarray] | str:
    """The right/wrong bits of the two rows when they pair (module docstring), else why not."""
    bcell = outcomes[0].get(str(brow.get("cell_id") or ""))
    ccell = outcomes[1].get(str(crow.get("cell_id") or ""))
    if bcell is None or ccell is None:
        side = ("either side" if bcell is None and ccell is None
                else "the baseline" if bcell is None else "the candidate")
        return f"no per-sample outcomes in {side}"
    if bcell.digest != ccell.digest:
        return f"the test samples differ (sample digests {bcell.digest}, {ccell.digest})"
    bout, cout = bcell.for_row(brow), ccell.for_row(crow)
    if bout is None or cout is None:
        return "no per-sample outcome of this row"
    if abs(bout.accuracy - float(brow["value"])) > 1e-6 or abs(cout.accuracy - float(crow["value"])) > 1e-6:
        return "the per-sample outcomes do not match the rows' accuracies"
    return bout.correct, cout.correct


def _accuracy_test(brow: Mapping[str, Any], crow: Mapping[str, Any], th: Thresholds,
                   outcomes: _Outcomes) -> AccuracyTest:
    """The test of an accuracy pair with finite values: paired, else interval rule, else fixed points."""
    b, c = float(brow["value"]), float(crow["value"])
    paired = _paired_bits(brow, crow, outcomes)
    if not isinstance(paired, str):
        return paired_test(paired[0], paired[1], th.p_value)
    nb, nc = brow.get("n"), crow.get("n")
    if _num(nb) and _num(nc) and nb >= 1 and nc >= 1:
        test = unpaired_test(b, int(nb), c, int(nc), th.p_value)
        return replace(test, detail=f"{test.detail}, unpaired: {paired}")
    return AccuracyTest(c - b, None, None, None, None, "fixed points", f"no n, {paired}")


def _accuracy_result(key: dict[str, Any], b: float, c: float, test: AccuracyTest,
                     p: tuple[float | None, float | None], family: int, th: Thresholds) -> MetricComparison:
    """The accuracy rule of the module docstring on one pair; ``p``: its (Holm-adjusted) one-sided
    p-values (candidate lower, candidate higher); ``family``: the number of rows adjusted together."""
    points, change = th.accuracy_points, f"{test.diff:+.2f} pts"
    p_worse, p_better = p
    if p_worse is None or p_better is None or test.low is None or test.high is None:  # fixed points
        status = REGRESSION if test.diff < -points else IMPROVED if test.diff > points else OK
        note = f"{test.method} ({test.detail})" + (f"; drop > {points:g} pts" if status == REGRESSION else "")
        return MetricComparison(key, "accuracy", b, c, change, status, note=note)
    regression = accuracy_flag(-test.diff, -test.low, p_worse, points, th.p_value)
    improved = accuracy_flag(test.diff, test.high, p_better, points, th.p_value)
    status = REGRESSION if regression else IMPROVED if improved else OK
    lower = test.diff <= 0
    shown = p_worse if lower else p_better
    note = (f"{test.method}, {test.detail}; Holm over {family} row{'s' if family != 1 else ''}; "
            f"difference {test.low:+.2f} to {test.high:+.2f} pts")
    if regression:
        note += f"; drop > {points / 2:g} pts with upper limit >= {points:g} pts"
    elif shown < th.p_value and status == OK:
        note += f"; significant {'drop' if lower else 'gain'} below the threshold"
    return MetricComparison(key, "accuracy", b, c, change, status, shown, note)


def _compare_ratio_pair(brow: Mapping[str, Any], crow: Mapping[str, Any], key: dict[str, Any], kind: str,
                        th: Thresholds) -> MetricComparison:
    """The latency / memory rule on a pair of rows with finite values."""
    b, c = float(brow["value"]), float(crow["value"])
    if b <= 0 or c <= 0:
        return MetricComparison(key, kind, b, c, "", INFO, note="non-positive value")
    limit = th.latency_ratio if kind == "latency" else th.memory_ratio
    v = compare_ratio(brow, crow, limit, th.p_value)
    status = (REGRESSION if v.regression else IMPROVED if v.improved
              else SLOWER if v.significant and v.ratio > 1 else OK)
    note = v.method
    if kind == "memory" and status == REGRESSION and str(brow.get("unit")) == "MiB" and c - b < MEMORY_FLOOR_MIB:
        status, note = OK, note + f"; growth {c - b:.2f} MiB is below the {MEMORY_FLOOR_MIB:g} MiB floor"
    if v.ratio_high is not None:
        note += f"; ratio upper limit {v.ratio_high:.3g}"
    if status == REGRESSION:
        note += f"; > x{limit:g}"
    return MetricComparison(key, kind, b, c, f"x{v.ratio:.3f}", status, v.p, note)


def _missing_cells(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]],
                   allow_missing: bool) -> list[MetricComparison]:
    """One row per cell of the baseline that has no row at all in the candidate (a model that dropped
    out of the run): a regression, or only missing with ``allow_missing``."""
    def cells(rows: list[dict[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
        return {tuple(_norm(f, r.get(f)) for f in _CELL_FIELDS): r for r in rows}

    base, cand = cells(base_rows), cells(cand_rows)
    out = []
    for key in sorted(base.keys() - cand.keys(), key=str):
        k = dict(zip(_CELL_FIELDS, key), metric="cell")
        if allow_missing:
            out.append(MetricComparison(k, "cell", "present", None, "", MISSING,
                                        note="not in candidate (allowed by --allow-missing)"))
        else:
            out.append(MetricComparison(k, "cell", "present", None, "", REGRESSION,
                                        note="the baseline has this cell, the candidate has no row of it "
                                             "(--allow-missing accepts that)"))
    return out


def _compare_errors(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]]) -> list[MetricComparison]:
    def cell(r: Mapping[str, Any]) -> tuple:
        return tuple(_norm(f, r.get(f)) for f in _CELL_FIELDS)

    def cells(rows: list[dict[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
        return {cell(r): r for r in rows if r.get("metric") in ERROR_METRICS}

    def present(rows: list[dict[str, Any]]) -> set[tuple]:
        return {cell(r) for r in rows if r.get("metric") not in ERROR_METRICS}

    berr, cerr, bok, cok = cells(base_rows), cells(cand_rows), present(base_rows), present(cand_rows)
    out = []
    for key, row in cerr.items():
        k = dict(zip(_CELL_FIELDS, key), metric="error")
        message = str(row.get("error") or "unknown error")[:300]
        if key in berr:
            out.append(MetricComparison(k, "error", "failed", "failed", "", INFO, note=f"failed in both: {message}"))
        else:
            out.append(MetricComparison(k, "error", "ok" if key in bok else "", "failed", "", REGRESSION,
                                        note=f"candidate cell failed: {message}"))
    for key in berr.keys() - cerr.keys():
        k = dict(zip(_CELL_FIELDS, key), metric="error")
        if key in cok:
            out.append(MetricComparison(k, "error", "failed", "ok", "", IMPROVED,
                                        note="failed in the baseline, runs now"))
        else:
            out.append(MetricComparison(k, "error", "failed", None, "", MISSING,
                                        note="failed in the baseline; not in candidate"))
    return out


def _histograms(rows: list[dict[str, Any]]) -> dict[tuple, dict[int, tuple[float, float | None]]]:
    out: dict[tuple, dict[int, tuple[float, float | None]]] = {}
    for row in rows:
        if row.get("metric") not in DRIFT_METRICS or not _num(row.get("value")) or row.get("exit") is None:
            continue
        key = tuple((f, _norm(f, row.get(f))) for f in KEY_FIELDS if f != "exit")
        count = detail_of(row.get("detail")).get("count")
        if not _num(count):
            count = float(row["value"]) * float(row["n"]) if _num(row.get("n")) else None
        out.setdefault(key, {})[int(row["exit"])] = (float(row["value"]), None if count is None else float(count))
    return out


def _compare_histograms(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]],
                        th: Thresholds) -> list[MetricComparison]:
    bh, ch = _histograms(base_rows), _histograms(cand_rows)
    out = []
    for key, bhist in bh.items():
        kd = dict(key)
        kd["metric"] = "exit histogram"
        chist = ch.get(key)
        exits = range(max(bhist) + 1)
        bfrac = "/".join(f"{bhist.get(k, (0.0, 0))[0]:.2f}" for k in exits)
        if chist is None:
            out.append(MetricComparison(kd, "exit_histogram", bfrac, None, "", MISSING, note="not in candidate"))
            continue
        exits = range(max(max(bhist), max(chist)) + 1)
        bfrac = "/".join(f"{bhist.get(k, (0.0, 0))[0]:.2f}" for k in exits)
        cfrac = "/".join(f"{chist.get(k, (0.0, 0))[0]:.2f}" for k in exits)
        bc = [bhist.get(k, (0.0, 0.0))[1] for k in exits]
        cc = [chist.get(k, (0.0, 0.0))[1] for k in exits]
        shift = max(abs(bhist.get(k, (0.0, 0))[0] - chist.get(k, (0.0, 0))[0]) for k in exits)
        if any(v is None for v in bc + cc):
            out.append(MetricComparison(kd, "exit_histogram", bfrac, cfrac, f"max {shift:+.3f}", INFO,
                                        note="no sample counts (n) to test drift"))
            continue
        p = exit_drift(bc, cc)
        status, note = OK, "chi-square"
        if p < th.exit_drift_p_value:
            worse = _drift_costs_or_loses(key, bhist, chist, base_rows, cand_rows)
            status = REGRESSION if worse else CHANGED
            note += "; exit histogram drifted: " + (worse or "toward cheaper exits at no loss of accuracy")
        out.append(MetricComparison(kd, "exit_histogram", bfrac, cfrac, f"max |d| {shift:.3f}", status, p, note))
    for key in ch.keys() - bh.keys():
        kd = dict(key)
        kd["metric"] = "exit histogram"
        out.append(MetricComparison(kd, "exit_histogram", None, "", "", NEW, note="not in baseline"))
    return out


def _matching_value(key: tuple, metric: str, rows: list[dict[str, Any]]) -> float | None:
    """The value of the ``metric`` row with the histogram's key (model, dataset, device, policy,
    threshold, ...; no exit), None when there is none."""
    want = {f: v for f, v in key if f not in ("metric", "exit", "split", "batch_size")}
    for row in rows:
        if row.get("metric") == metric and row.get("exit") is None and _num(row.get("value")) and all(
                _norm(f, row.get(f)) == v for f, v in want.items()):
            return float(row["value"])
    return None


def _drift_costs_or_loses(key: tuple, bhist: dict, chist: dict, base_rows: list[dict[str, Any]],
                          cand_rows: list[dict[str, Any]]) -> str:
    """Why a drifted exit histogram is a regression ("" when it is not): the candidate's expected
    MACs of that policy point rose, or its accuracy dropped; without expected-MACs rows, its mean exit
    moved later (exits are ordered by cost)."""
    why = []
    b_macs, c_macs = _matching_value(key, "expected_macs", base_rows), _matching_value(key, "expected_macs", cand_rows)
    if b_macs is not None and c_macs is not None:
        if c_macs > b_macs:
            why.append(f"expected MACs rose {b_macs:.4g} -> {c_macs:.4g}")
    else:
        mean = lambda h: sum(k * f for k, (f, _) in h.items())  # noqa: E731
        if mean(chist) > mean(bhist):
            why.append(f"mean exit moved later ({mean(bhist):.3f} -> {mean(chist):.3f})")
    b_acc, c_acc = _matching_value(key, "policy_top1", base_rows), _matching_value(key, "policy_top1", cand_rows)
    if b_acc is not None and c_acc is not None and c_acc < b_acc:
        why.append(f"accuracy dropped {b_acc:.2f} -> {c_acc:.2f} %")
    return "; ".join(why)


# ----- command line --------------------------------------------------------------------------------

def compare_main(baseline: Path | str, candidate: Path | str, markdown: Path | str | None = None, *,
                 thresholds: Mapping[str, Any] | None = None, verbose: bool = False,
                 stream: TextIO | None = None, allow_missing: bool = False) -> int:
    """Compare, print the table of notable differences (all with ``verbose``), optionally write the
    Markdown, and return 1 when there is a regression, 0 otherwise. Bad paths raise ValueError."""
    result = compare(baseline, candidate, thresholds, allow_missing=allow_missing)
    out = stream or sys.stdout
    print(result.format_text(notable_only=not verbose), file=out)
    if markdown is not None:
        from fractalbench.harness.results import atomic_write_text

        atomic_write_text(Path(markdown), result.to_markdown())
    return 1 if result.has_regression else 0
