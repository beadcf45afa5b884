"""Operating points, the Pareto frontier, and measured vs predicted policy latency.

Definitions
-----------
- Operating point: (cost, accuracy) of one way to run a model, named by its ``policy`` and
  ``threshold`` (the same two fields on every row of that point: ``policy_top1``,
  ``expected_macs``, its latency stream). Dynamic models: one point per policy setting,
  ``policy_top1`` (%) with the ``expected_macs`` (MACs per image) of the same (policy, threshold).
  Static models: ``top1`` and ``macs`` of the last exit. A dynamic model without policy rows falls
  back to its forced exits (``top1`` and ``macs`` per exit). For latency the cost is the mean ms
  per call at batch 1: the ``latency`` row of the same (policy, threshold) for a policy point, the
  forced path's for an exit point.
- Chosen point: an operating point not chosen on test: its thresholds were fitted on validation
  (``detail.fitted_on == "validation"``, e.g. a budget fit) or it has no threshold at all (the
  learned decisions of a gated or routed model). Of several, the one most accurate on validation.
- Pareto frontier: the points no other point dominates, where a dominates b when a costs no more,
  is at least as accurate, and is strictly better in one of the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from harness.results import detail_of
from reports.frame import GROUP, STATIC_KINDS, batch_one, metric_rows, none_if_nan, threshold_key

POINT_COLUMNS = [*GROUP, "kind", "source", "policy", "threshold", "exit", "cost", "accuracy"]


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


def operating_points(frame: pd.DataFrame, cost: str = "macs") -> pd.DataFrame:
    """Accuracy-vs-cost points of every model (see the module docstring), with a ``pareto`` column
    marking the frontier over all shown runs and models per dataset (and per device for latency).
    ``cost``: "macs" (MACs per image) or "latency" (ms per call, batch 1)."""
    return _points_with_detail(frame, cost).drop(columns=["detail"])


def _points_with_detail(frame: pd.DataFrame, cost: str) -> pd.DataFrame:
    if cost not in ("macs", "latency"):
        raise ValueError(f"cost must be 'macs' or 'latency', got {cost!r}")
    records: list[dict[str, Any]] = []
    for key, sub in frame.groupby(GROUP, dropna=False, sort=True) if not frame.empty else ():
        base = {**dict(zip(GROUP, key)), "kind": sub["kind"].iloc[0]}
        points = _policy_points(sub, cost) or _exit_points(sub, cost, base["kind"])
        records.extend({**base, **p} for p in points)
    points = pd.DataFrame(records, columns=[*POINT_COLUMNS, "detail"])
    points["pareto"] = False
    groups = ["dataset"] if cost == "macs" else ["dataset", "device"]
    if not points.empty:
        for _, sel in points.groupby(groups, dropna=False):
            points.loc[sel.index, "pareto"] = pareto_mask(sel["cost"].to_numpy(), sel["accuracy"].to_numpy())
    return points


def _point_costs(sub: pd.DataFrame, cost: str) -> dict[tuple[str, float | None], float]:
    """(policy, threshold) -> the cost of that operating point."""
    if cost == "macs":
        rows = metric_rows(sub, "expected_macs")
    else:
        rows = batch_one(metric_rows(sub, "latency"))
        rows = rows[rows["policy"] != ""]
    return {(p, threshold_key(t)): float(v) for p, t, v in zip(rows["policy"], rows["threshold"], rows["value"])}


def _policy_points(sub: pd.DataFrame, cost: str) -> list[dict[str, Any]]:
    acc = metric_rows(sub, "policy_top1")
    acc = acc[acc["split"].isin(["test", ""])]
    if acc.empty:
        return []
    costs = _point_costs(sub, cost)
    out = []
    for policy, threshold, value, detail in zip(acc["policy"], acc["threshold"], acc["value"], acc["detail"]):
        c = costs.get((policy, threshold_key(threshold)))
        if c is None:
            continue
        out.append({"source": "policy", "policy": policy, "threshold": none_if_nan(threshold), "exit": None,
                    "cost": c, "accuracy": float(value), "detail": detail})
    return out


def _exit_points(sub: pd.DataFrame, cost: str, kind: str) -> list[dict[str, Any]]:
    acc = metric_rows(sub, "top1")
    acc = acc[(acc["policy"] == "") & acc["split"].isin(["test", ""])]
    c = metric_rows(sub, "macs") if cost == "macs" else batch_one(metric_rows(sub, "latency"))
    c = c[c["policy"] == ""]
    if acc.empty or c.empty:
        return []
    acc_by_exit = {int(e) if pd.notna(e) else 0: v for e, v in zip(acc["exit"], acc["value"])}
    cost_by_exit = {int(e) if pd.notna(e) else 0: v for e, v in zip(c["exit"], c["value"])}
    exits = sorted(set(acc_by_exit) & set(cost_by_exit))
    if kind in STATIC_KINDS and exits:
        exits = [max(exits)]
    source = "static" if kind in STATIC_KINDS or len(exits) == 1 else "exit"
    return [{"source": source, "policy": "", "threshold": None, "exit": k, "cost": float(cost_by_exit[k]),
             "accuracy": float(acc_by_exit[k]), "detail": ""} for k in exits]


def _validation_rank(detail: Any, cost: float) -> tuple[float, float]:
    d = detail_of(detail)
    val = d.get("validation_top1")
    val = float(val) if isinstance(val, (int, float)) and math.isfinite(val) else -math.inf
    val_cost = d.get("validation_expected_macs")
    val_cost = float(val_cost) if isinstance(val_cost, (int, float)) else cost
    return val, -val_cost


def is_chosen(policy: str, threshold: Any, detail: Any) -> bool:
    """Whether a policy point was chosen without looking at test (see the module docstring)."""
    fitted_on = detail_of(detail).get("fitted_on")
    learned = none_if_nan(threshold) is None and fitted_on in (None, "train")  # a model's own gates or router
    return bool(policy) and (fitted_on == "validation" or learned)


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
