"""Operating points, the Pareto frontier, and measured vs predicted policy latency.

Definitions
-----------
- Operating point: (cost, accuracy) of one way to run a model, named by its ``policy`` and
  ``threshold`` (the same two fields on every row of that point: ``policy_top1``,
  ``expected_macs``, its latency stream). Dynamic models: one point per policy setting,
  ``policy_top1`` (%) with the ``expected_macs`` (MACs per image) of the same (policy, threshold).
  Static models: ``top1`` and ``macs`` of the last exit. Every dynamic model also has its forced
  exits (``top1`` and ``macs`` per exit; a gated or routed model's one exit is its full network):
  fixed ways to run it, the ends its policy points lie between. For latency the cost is the mean
  ms per call at batch 1: the ``latency`` row of the same (policy, threshold) for a policy point,
  the forced path's for an exit point. Every point carries the ``n``, ``ci_low`` and ``ci_high``
  (95 % Wilson interval, %) of its accuracy row (NaN for rows written before intervals were stored).
- Selection (the ``selection`` column): where a point's setting came from.
  "validation": its thresholds were fitted on validation (``detail.fitted_on == "validation"``,
  e.g. a budget fit); "learned": the model's own decisions or a trained attribute value
  (``fitted_on == "train"``, or no ``fitted_on`` and no threshold: the learned gates or router of
  older rows); "fixed": a static model or a forced exit (nothing to choose); "test grid": every
  other policy point, i.e. a threshold grid point scored on test (``fitted_on == "none (grid
  point)"``, or a threshold of unknown origin). A test-grid point is a view of the trade-off;
  picking one by its test score is choosing on test (an oracle).
- Headline points: the operating points whose selection is not "test grid". The Pareto frontier,
  the near-frontier marks, the headline plots and the points tables use only these;
  :func:`grid_points` holds the rest.
- Chosen point: per model, a policy point whose selection is "validation", or "learned" without a
  threshold, or a trained attribute value whose validation accuracy was recorded (SkipNet's alpha
  points; older rows without it are one of several that nothing outside test ranks). Of several,
  the one most accurate on validation (``detail.validation_top1``; ties: the cheaper on
  validation).
- Cost at preserved accuracy (:func:`preserved_accuracy`): per dynamic model, the cheapest of its
  points chosen without test (selection "validation" or "learned") whose test top-1 is within
  ``points`` of the full network's (its most expensive forced exit), as the papers' claims are
  put ("x % fewer MACs at no more than 1 point lost"). Which fitted point that is is read off the
  test numbers, so it describes the measured curve; it is not a choice made without test.
- Pareto frontier: the headline points no other headline point dominates, where a dominates b
  when a costs no more, is at least as accurate, and is strictly better in one of the two; per
  dataset for MACs, per dataset and device for latency.
- Near the frontier (``near_frontier``): a headline point p not on the frontier whose interval
  reaches the frontier at its cost: ``ci_high(p) >= F(p)``, where F(p) is the largest accuracy of
  a frontier point (same dataset, and device for latency) that costs no more than p (the height of
  the frontier's step line at p's cost). Such a point cannot be told apart from the frontier on
  this test set. False for points on the frontier and for points without an interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from fractalbench.harness.results import detail_of
from fractalbench.reports.frame import GROUP, STATIC_KINDS, batch_one, metric_rows, none_if_nan, threshold_key

POINT_COLUMNS = [*GROUP, "kind", "source", "selection", "policy", "threshold", "exit", "cost", "accuracy", "n",
                 "ci_low", "ci_high", "seed_std"]
TEST_GRID = "test grid"
SELECTIONS = ("validation", "learned", "fixed", TEST_GRID)


def pareto_mask(costs: Sequence[float], accuracies: Sequence[float]) -> np.ndarray:
    """True for each point on the Pareto frontier (lower cost and higher accuracy are better):
    no other point costs no more and is at least as accurate with one of the two strictly better.
    Equal points are all kept. NaN points are never on the frontier."""
    c = np.asarray(costs, dtype=float)
    a = np.asarray(accuracies, dtype=float)
    if c.shape != a.shape:
        raise ValueError(f"pareto_mask needs as many costs as accuracies, got {c.shape} and {a.shape}")
    mask = np.zeros(c.shape, dtype=bool)
    valid = np.flatnonzero(np.isfinite(c) & np.isfinite(a))
    order = valid[np.lexsort((-a[valid], c[valid]))]  # by cost ascending, then accuracy descending
    best_acc, best_cost = -np.inf, np.nan
    for i in order:
        if a[i] > best_acc:
            mask[i], best_acc, best_cost = True, a[i], c[i]
        elif a[i] == best_acc and c[i] == best_cost:
            mask[i] = True
    return mask


def near_frontier_mask(costs: Sequence[float], accuracies: Sequence[float], ci_high: Sequence[float],
                       on_frontier: Sequence[bool]) -> np.ndarray:
    """True for each point off the frontier whose interval's upper end ``ci_high`` reaches F, the
    largest accuracy of a frontier point (``on_frontier``) that costs no more than it (see the
    module docstring). Points with a NaN cost, accuracy or ``ci_high`` are never marked."""
    c, a, hi = (np.asarray(x, dtype=float) for x in (costs, accuracies, ci_high))
    front = np.asarray(on_frontier, dtype=bool)
    if not c.shape == a.shape == hi.shape == front.shape:
        raise ValueError(f"near_frontier_mask needs equal lengths, got {c.shape}, {a.shape}, {hi.shape}, "
                         f"{front.shape}")
    mask = np.zeros(c.shape, dtype=bool)
    front_cost, front_acc = c[front], a[front]
    for i in np.flatnonzero(~front & np.isfinite(c) & np.isfinite(a) & np.isfinite(hi)):
        cheaper = front_acc[front_cost <= c[i]]
        mask[i] = bool(cheaper.size) and hi[i] >= cheaper.max()
    return mask


def point_selection(source: str, threshold: Any, detail: Any) -> str:
    """Where a point's setting came from: "validation", "learned", "fixed" or "test grid" (see
    the module docstring). ``source``: "policy", "exit" or "static"."""
    if source != "policy":
        return "fixed"
    fitted_on = detail_of(detail).get("fitted_on")
    if fitted_on == "validation":
        return "validation"
    if fitted_on == "train" or (fitted_on is None and none_if_nan(threshold) is None):
        return "learned"
    return TEST_GRID


def operating_points(frame: pd.DataFrame, cost: str = "macs") -> pd.DataFrame:
    """The headline points of every model (selection not "test grid"; see the module docstring),
    with ``pareto`` (on the frontier over all shown runs and models per dataset, and per device for
    latency) and ``near_frontier``. ``cost``: "macs" (MACs per image) or "latency" (ms per call,
    batch 1)."""
    points = _points_with_detail(frame, cost)
    points = points[points["selection"] != TEST_GRID].reset_index(drop=True)
    points["pareto"], points["near_frontier"] = False, False
    groups = ["dataset"] if cost == "macs" else ["dataset", "device"]
    for _, sel in points.groupby(groups, dropna=False) if not points.empty else ():
        front = pareto_mask(sel["cost"].to_numpy(), sel["accuracy"].to_numpy())
        points.loc[sel.index, "pareto"] = front
        points.loc[sel.index, "near_frontier"] = near_frontier_mask(sel["cost"], sel["accuracy"], sel["ci_high"],
                                                                    front)
    return points.drop(columns=["detail"])


def grid_points(frame: pd.DataFrame, cost: str = "macs") -> pd.DataFrame:
    """The test-grid points of every model (threshold grid points scored on test; see the module
    docstring), same columns as :func:`operating_points` without the frontier marks: a view of
    the trade-off, not for model selection."""
    points = _points_with_detail(frame, cost)
    return points[points["selection"] == TEST_GRID].reset_index(drop=True).drop(columns=["detail"])


def _points_with_detail(frame: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Every operating point (test grid included) with its ``selection`` and accuracy ``detail``."""
    if cost not in ("macs", "latency"):
        raise ValueError(f"cost must be 'macs' or 'latency', got {cost!r}")
    records: list[dict[str, Any]] = []
    for key, sub in frame.groupby(GROUP, dropna=False, sort=True) if not frame.empty else ():
        base = {**dict(zip(GROUP, key)), "kind": sub["kind"].iloc[0]}
        points = _policy_points(sub, cost) + _exit_points(sub, cost, base["kind"])
        records.extend({**base, **p} for p in points)
    return pd.DataFrame(records, columns=[*POINT_COLUMNS, "detail"])


def _point_costs(sub: pd.DataFrame, cost: str) -> dict[tuple[str, float | None], float]:
    """(policy, threshold) -> the cost of that operating point."""
    if cost == "macs":
        rows = metric_rows(sub, "expected_macs")
    else:
        rows = batch_one(metric_rows(sub, "latency"))
        rows = rows[rows["policy"] != ""]
    return {(p, threshold_key(t)): float(v) for p, t, v in zip(rows["policy"], rows["threshold"], rows["value"])}


def _interval(row: Any) -> dict[str, float]:
    """``n``, ``ci_low``, ``ci_high`` and ``seed_std`` (spread over seeds, :mod:`fractalbench.reports.seeds`) of an
    accuracy row (NaN where absent)."""
    return {k: float(getattr(row, k)) if pd.notna(getattr(row, k, np.nan)) else np.nan
            for k in ("n", "ci_low", "ci_high", "seed_std")}


def _policy_points(sub: pd.DataFrame, cost: str) -> list[dict[str, Any]]:
    acc = metric_rows(sub, "policy_top1")
    acc = acc[acc["split"].isin(["test", ""])]
    if acc.empty:
        return []
    costs = _point_costs(sub, cost)
    out = []
    for row in acc.itertuples(index=False):
        c = costs.get((row.policy, threshold_key(row.threshold)))
        if c is None:
            continue
        out.append({"source": "policy", "selection": point_selection("policy", row.threshold, row.detail),
                    "policy": row.policy, "threshold": none_if_nan(row.threshold), "exit": None, "cost": c,
                    "accuracy": float(row.value), **_interval(row), "detail": row.detail})
    return out


def _exit_points(sub: pd.DataFrame, cost: str, kind: str) -> list[dict[str, Any]]:
    acc = metric_rows(sub, "top1")
    acc = acc[(acc["policy"] == "") & acc["split"].isin(["test", ""])]
    c = metric_rows(sub, "macs") if cost == "macs" else batch_one(metric_rows(sub, "latency"))
    c = c[c["policy"] == ""]
    if acc.empty or c.empty:
        return []
    acc_by_exit = {int(r.exit) if pd.notna(r.exit) else 0: r for r in acc.itertuples(index=False)}
    cost_by_exit = {int(e) if pd.notna(e) else 0: v for e, v in zip(c["exit"], c["value"])}
    exits = sorted(set(acc_by_exit) & set(cost_by_exit))
    if kind in STATIC_KINDS and exits:
        exits = [max(exits)]
    source = "static" if kind in STATIC_KINDS else "exit"
    return [{"source": source, "selection": "fixed", "policy": "", "threshold": None, "exit": k,
             "cost": float(cost_by_exit[k]), "accuracy": float(acc_by_exit[k].value), **_interval(acc_by_exit[k]),
             "detail": ""} for k in exits]


def _validation_rank(detail: Any, cost: float) -> tuple[float, float]:
    d = detail_of(detail)
    val = d.get("validation_top1")
    val = float(val) if isinstance(val, (int, float)) and math.isfinite(val) else -math.inf
    val_cost = d.get("validation_expected_macs")
    val_cost = float(val_cost) if isinstance(val_cost, (int, float)) else cost
    return val, -val_cost


def is_chosen(policy: str, threshold: Any, detail: Any) -> bool:
    """Whether a policy point may be a model's chosen point (see the module docstring): selection
    "validation", or "learned" without a threshold, or "learned" with its validation accuracy
    recorded (a trained attribute value, ranked on validation like the fitted points)."""
    selection = point_selection("policy", threshold, detail) if policy else "fixed"
    if selection == "validation" or (selection == "learned" and none_if_nan(threshold) is None):
        return True
    return selection == "learned" and detail_of(detail).get("validation_top1") is not None


def chosen_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model, its chosen point (see the module docstring) by MACs: ``policy``, ``cost``
    (expected MACs), ``accuracy`` (test top-1 %). Models without one are absent."""
    points = _points_with_detail(frame, "macs")
    points = points[points["source"] == "policy"]
    records = []
    for key, sub in points.groupby(GROUP, dropna=False, sort=True):
        sub = sub[[is_chosen(p, t, d) for p, t, d in zip(sub["policy"], sub["threshold"], sub["detail"])]]
        if sub.empty:
            continue
        ranks = [_validation_rank(d, c) for d, c in zip(sub["detail"], sub["cost"])]
        best = sub.iloc[max(range(len(ranks)), key=lambda i: ranks[i])]
        records.append({**dict(zip(GROUP, key)), "policy": best["policy"], "cost": best["cost"],
                        "accuracy": best["accuracy"]})
    return pd.DataFrame(records, columns=[*GROUP, "policy", "cost", "accuracy"])


def latency_vs_predicted(frame: pd.DataFrame) -> pd.DataFrame:
    """Measured policy latency at batch 1 (``latency`` rows with a policy) beside its prediction
    (``latency_predicted`` of the same model, policy and threshold), in ms, with the number of
    timed calls and measured / predicted: one row per predicted operating point (the measured side
    empty where it has no stream)."""
    columns = [*GROUP, "kind", "policy", "threshold", "measured mean ms", "measured p50 ms", "n", "predicted ms",
               "measured / predicted"]
    measured = batch_one(metric_rows(frame, "latency"))
    measured = measured[measured["policy"] != ""]
    predicted = batch_one(metric_rows(frame, "latency_predicted"))
    if predicted.empty:
        return pd.DataFrame(columns=columns)
    keys = [*GROUP, "kind", "policy", "_thr"]
    measured = measured.assign(_thr=[threshold_key(t) for t in measured["threshold"]]).drop_duplicates(keys)
    predicted = predicted.assign(_thr=[threshold_key(t) for t in predicted["threshold"]]).drop_duplicates(keys)
    pairs = measured[keys + ["value", "p50", "n"]].merge(predicted[keys + ["value"]], on=keys, how="right",
                                                         suffixes=("", "_predicted"))
    pairs = pairs.rename(columns={"value": "measured mean ms", "p50": "measured p50 ms",
                                  "value_predicted": "predicted ms", "_thr": "threshold"})
    pairs["measured / predicted"] = pairs["measured mean ms"] / pairs["predicted ms"]
    return pairs[columns].sort_values([*GROUP, "policy", "threshold"]).reset_index(drop=True)


PRESERVED_COLUMNS = [*GROUP, "kind", "full top1 %", "full MACs", "point", "its top1 %", "its MACs", "MACs avoided %",
                     "full ms (b=1)", "its ms (b=1)", "speed-up (b=1)"]


def preserved_accuracy(frame: pd.DataFrame, points: float = 1.0) -> pd.DataFrame:
    """Per dynamic model: the full network (its most expensive forced exit) and the cheapest point
    chosen without test within ``points`` of its test top-1 (see the module docstring), with MACs
    avoided and the batch-1 latency speed-up where both were timed. A model with no such point has
    an empty point (its fitted points all lose more)."""
    macs = _points_with_detail(frame, "macs")
    if macs.empty:
        return pd.DataFrame(columns=PRESERVED_COLUMNS)
    lat = _points_with_detail(frame, "latency")
    latency = {(*k, p, threshold_key(t), none_if_nan(e)): c for *k, p, t, e, c in
               lat[[*GROUP, "policy", "threshold", "exit", "cost"]].itertuples(index=False)} if not lat.empty else {}
    records = []
    for key, sub in macs.groupby(GROUP, dropna=False, sort=True):
        fixed = sub[sub["source"] == "exit"]
        if fixed.empty:
            continue
        full = fixed.loc[fixed["cost"].idxmax()]
        fitted = sub[sub["selection"].isin(["validation", "learned"]) & (sub["cost"] < full["cost"])
                     & (sub["accuracy"] >= full["accuracy"] - points)]
        record = {**dict(zip(GROUP, key)), "kind": full["kind"], "full top1 %": full["accuracy"],
                  "full MACs": full["cost"], "full ms (b=1)": latency.get((*key, "", None, none_if_nan(full["exit"])))}
        if not fitted.empty:
            best = fitted.loc[fitted["cost"].idxmin()]
            its_ms = latency.get((*key, best["policy"], threshold_key(best["threshold"]), None))
            threshold = none_if_nan(best["threshold"])
            record.update({"point": best["policy"] + ("" if threshold is None else f" {threshold:g}"),
                           "its top1 %": best["accuracy"], "its MACs": best["cost"],
                           "MACs avoided %": 100 * (1 - best["cost"] / full["cost"]), "its ms (b=1)": its_ms})
            if its_ms and record["full ms (b=1)"]:
                record["speed-up (b=1)"] = record["full ms (b=1)"] / its_ms
        records.append(record)
    return pd.DataFrame(records, columns=PRESERVED_COLUMNS)
