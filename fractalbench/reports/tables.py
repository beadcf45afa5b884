"""Tables from stored results: summary per model, per exit, latency, memory, errors, histograms,
gate rates, expert loads, pattern analysis and rows of any other metric.

Everything here reads rows written by ``fractalbench.harness.results`` and returns pandas DataFrames; nothing
measures or prints. Any subset of metrics may be present (older or smaller runs); a table whose
metrics are absent comes back empty. Which metric goes in which table comes from the metric
catalogue (:mod:`fractalbench.harness.catalogue`), by group and kind.

Definitions
-----------
- Last exit: the highest ``exit`` of a model's ``top1``/``macs`` rows (the full network; a static
  model's only exit, 0).
- Operating points, their selection, chosen points, the Pareto frontier and the near-frontier
  marks: see :mod:`fractalbench.reports.points`.

Loading (:mod:`fractalbench.reports.frame`), operating points (:mod:`fractalbench.reports.points`), reference numbers
(:mod:`fractalbench.reports.reference`) and formatting (:mod:`fractalbench.reports.formatting`) are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fractalbench.harness.catalogue import in_any, names
from fractalbench.harness.results import RunData, check_run_dir, detail_of
from fractalbench.reports.formatting import format_value, formatted, to_markdown, write_table
from fractalbench.reports.frame import (
    GROUP,
    STATIC_KINDS,
    batch_one,
    combined_rows,
    drop_empty,
    first_value,
    last_exit_values,
    load_runs,
    merge_all,
    metric_rows,
    model_kinds,
    none_if_nan,
    run_label,
    threshold_key,
)
from fractalbench.reports.points import (
    chosen_points,
    grid_points,
    latency_vs_predicted,
    near_frontier_mask,
    operating_points,
    pareto_mask,
    point_selection,
    preserved_accuracy,
)
from fractalbench.reports.reference import measured_for, reference_table

__all__ = [
    "GROUP", "STATIC_KINDS", "RunData", "check_run_dir", "detail_of", "load_runs", "combined_rows", "model_kinds",
    "last_exit_values", "operating_points", "grid_points", "pareto_mask", "near_frontier_mask", "point_selection",
    "chosen_points", "latency_vs_predicted", "preserved_accuracy",
    "reference_table", "measured_for", "format_value", "formatted", "to_markdown", "write_table",
    "summary_table", "brief_summary", "cost_decomposition",
    "routed_compute", "length_scaling", "energy_table", "serving_table", "backend_table", "per_exit_table",
    "latency_table", "memory_table",
    "error_table",
    "exit_histograms", "skip_rates", "expert_loads", "pattern_table", "rows_table", "other_metrics_table",
]

ACCURACY_METRICS = names(kinds=["accuracy"])
MEMORY_METRICS = names(groups=["memory"])
TIMING_METRICS = names(kinds=["timing"])
ROW_COLUMNS = [*GROUP, "batch_size", "exit", "policy", "threshold", "split", "metric", "unit", "value", "n"]

# The summary's columns (title -> what it holds), and the few of them the brief summary keeps.
MEMORY_COLUMNS = {"memory_peak_activations": "peak activations MiB", "memory_weights": "weights MiB",
                  "memory_peak_reserved": "GPU peak reserved MiB"}
BRIEF_COLUMNS = ("label", "kind", "top1 %", "top1 95% CI", "top1 sd over seeds", "MACs (last exit)", "chosen point",
                 "its top1 %", "its expected MACs", "params", "latency p50 ms (b=1)", "peak activations MiB", "status")


# ----- summary -------------------------------------------------------------------------------------

def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model, dataset and device: accuracy and MACs of the last exit, the chosen
    operating point (:func:`fractalbench.reports.points.chosen_points`), parameters total/active, latency
    p50/p90/p99 (ms, forced last exit) per batch size, memory (MiB, largest over exits) and the
    cell status."""
    if frame.empty:
        return pd.DataFrame()
    keys = frame[GROUP + ["kind"]].drop_duplicates(GROUP).reset_index(drop=True)
    parts = [
        last_exit_values(frame, "top1", "test").rename(columns={"top1": "top1 %"}),
        _last_exit_interval(frame),
        _seed_spread(frame),
        last_exit_values(frame, "top5", "test").rename(columns={"top5": "top5 %"}),
        last_exit_values(frame, "macs").rename(columns={"macs": "MACs (last exit)"}),
        chosen_points(frame).rename(columns={"policy": "chosen point", "accuracy": "its top1 %",
                                             "cost": "its expected MACs"}),
        first_value(frame, "params"),
        first_value(frame, "params_active").rename(columns={"params_active": "params active"}),
        _latency_wide(frame),
        *(first_value(frame, m, "max").rename(columns={m: title}) for m, title in MEMORY_COLUMNS.items()),
    ]
    table = merge_all(keys, parts)
    errors = frame[(frame["metric"] == "error")].groupby(GROUP, dropna=False).size().rename("failed").reset_index()
    table = table.merge(errors, on=GROUP, how="left")
    table["status"] = np.where(table["failed"].fillna(0) > 0, "failed", "ok")
    table = table.drop(columns=["failed"])
    return drop_empty(table).sort_values(["run", "dataset", "device", "label"]).reset_index(drop=True)


def _last_exit_interval(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model: the 95 % Wilson interval of the last exit's test top-1 as text ("85.9-87.3");
    empty for rows written before intervals were stored."""
    last = last_exit_values(frame, "top1", "test", extra=("ci_low", "ci_high"))
    text = [f"{lo:.1f}-{hi:.1f}" if pd.notna(lo) and pd.notna(hi) else ""
            for lo, hi in zip(last["ci_low"], last["ci_high"])]
    return last[GROUP].assign(**{"top1 95% CI": text})


def _seed_spread(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model run with several seeds: the standard deviation over seeds of the last exit's test
    top-1 ("0.21 (3 seeds)"); no column when no model has several seeds."""
    if "seed_std" not in frame or not frame["seed_std"].notna().any():
        return pd.DataFrame(columns=GROUP)
    last = last_exit_values(frame, "top1", "test", extra=("seed_std", "seeds"))
    text = [f"{sd:.2f} ({int(k)} seeds)" if pd.notna(sd) else "" for sd, k in zip(last["seed_std"], last["seeds"])]
    return last[GROUP].assign(**{"top1 sd over seeds": text})


def brief_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The few columns of :func:`summary_table` that answer "how good, how costly": model (its
    label), kind, top-1 % and MACs at the last exit, the chosen point with its top-1 % and expected
    MACs, parameters, batch-1 latency p50, peak activations and status. Dataset and device are kept
    only when the runs hold more than one."""
    if summary.empty:
        return summary
    extra = [c for c in ("dataset", "device") if c in summary and summary[c].nunique() > 1]
    columns = [c for c in BRIEF_COLUMNS[:1] + tuple(extra) + BRIEF_COLUMNS[1:] if c in summary]
    return summary[columns].rename(columns={"label": "model"})


def _latency_wide(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model: p50/p90/p99 latency (ms) of the forced path to the last exit, per batch size."""
    lat = metric_rows(frame, "latency")
    lat = lat[lat["policy"] == ""]
    if lat.empty:
        return pd.DataFrame(columns=GROUP)
    lat = lat.assign(_exit=lat["exit"].fillna(0))
    lat = lat.loc[lat.groupby(GROUP + ["batch_size"], dropna=False)["_exit"].idxmax()]
    wide = pd.DataFrame(columns=GROUP)
    for b in sorted(lat["batch_size"].dropna().unique()):
        part = lat[lat["batch_size"] == b][GROUP + ["p50", "p90", "p99"]]
        part = part.rename(columns={c: f"latency {c} ms (b={int(b)})" for c in ("p50", "p90", "p99")})
        wide = part if wide.empty else wide.merge(part, on=GROUP, how="outer")
    return wide


# ----- per exit, latency, memory -----------------------------------------------------------------------

def _per_exit_column(frame: pd.DataFrame, metric: str, title: str, col: str = "value",
                     batch1: bool = False) -> pd.DataFrame:
    key = GROUP + ["exit"]
    sub = metric_rows(frame, metric)
    sub = sub[(sub["policy"] == "") & sub["exit"].notna()]
    if batch1:
        sub = batch_one(sub)
    if sub.empty:
        return pd.DataFrame(columns=[*key, title])
    return sub.groupby(key, dropna=False)[col].first().rename(title).reset_index()


def per_exit_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model and exit: top-1/top-5 (%), MACs and FLOPs of the forced path, and its latency
    (ms, batch 1: mean and p50)."""
    if metric_rows(frame, "top1").empty and metric_rows(frame, "macs").empty:
        return pd.DataFrame()
    parts = [_per_exit_column(frame, "top1", "top1 %"), _per_exit_column(frame, "top5", "top5 %"),
             _per_exit_column(frame, "macs", "MACs"), _per_exit_column(frame, "flops", "FLOPs"),
             _per_exit_column(frame, "latency", "latency mean ms (b=1)", batch1=True),
             _per_exit_column(frame, "latency", "latency p50 ms (b=1)", "p50", batch1=True)]
    table = None
    for part in parts:
        if not part.empty:
            table = part if table is None else table.merge(part, on=GROUP + ["exit"], how="outer")
    if table is None:
        return pd.DataFrame()
    table["exit"] = table["exit"].astype(int)
    return drop_empty(table, ["exit"]).sort_values(["run", "dataset", "device", "label", "exit"]).reset_index(drop=True)


def latency_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every timing row (``latency``, ``latency_masked``, ``latency_overhead``): model, device,
    metric, batch size, path (forced exit k or the operating point policy/threshold), mean,
    p50/p90/p99 (ms) and the number of timed calls. p99 is empty below 100 calls."""
    sub = frame[frame["metric"].isin(TIMING_METRICS) & (frame["error"] == "") & frame["value"].notna()]
    if sub.empty:
        return pd.DataFrame()
    out = sub[GROUP + ["metric", "batch_size", "exit", "policy", "threshold", "value", "p50", "p90", "p99", "n"]].copy()
    out["path"] = np.where(out["policy"] == "", "forced", "policy")
    out = out.rename(columns={"batch_size": "batch size", "value": "mean ms", "p50": "p50 ms", "p90": "p90 ms",
                              "p99": "p99 ms"})
    cols = GROUP + ["metric", "batch size", "path", "exit", "policy", "threshold", "mean ms", "p50 ms", "p90 ms",
                    "p99 ms", "n"]
    order = ["run", "device", "label", "metric", "batch size", "path", "exit", "policy", "threshold"]
    return drop_empty(out[cols].sort_values(order), ["mean ms"]).reset_index(drop=True)


def memory_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Memory rows (MiB): weights apart from peak activations; GPU peaks where measured."""
    sub = frame[frame["metric"].isin(MEMORY_METRICS) & (frame["error"] == "") & frame["value"].notna()]
    if sub.empty:
        return pd.DataFrame()
    out = sub[GROUP + ["batch_size", "exit", "metric", "value"]].rename(columns={"batch_size": "batch size",
                                                                                  "value": "MiB"})
    return out.sort_values(["run", "device", "label", "metric", "exit"]).reset_index(drop=True)


def error_table(runs: Sequence[RunData]) -> pd.DataFrame:
    """Failed cells (status error) and rows of finished cells that carry an error."""
    records = []
    multi = len(runs) > 1
    for run in runs:
        for cell in run.cells:
            models = [r.get("model") for r in cell.rows if r.get("model")]
            label = run_label(models[0] if models else (cell.meta or {}).get("model", "?"), run, multi)
            base = {"run": run.name, "cell": cell.cell_id, "label": label}
            if cell.status != "ok":
                records.append({**base, "metric": "(cell failed)", "error": cell.error or "unknown error",
                                "traceback": (cell.meta or {}).get("traceback", "")})
            for row in cell.rows:
                if row.get("error") and row.get("metric") != "error":
                    records.append({**base, "metric": row.get("metric", ""), "error": row["error"], "traceback": ""})
    return pd.DataFrame(records, columns=["run", "cell", "label", "metric", "error", "traceback"])


# ----- histograms ------------------------------------------------------------------------------

def exit_histograms(frame: pd.DataFrame) -> pd.DataFrame:
    """exit_fraction rows: label, policy, threshold, exit, fraction (policy streams and sweeps)."""
    sub = metric_rows(frame, "exit_fraction")
    if sub.empty:
        return pd.DataFrame()
    out = sub[GROUP + ["policy", "threshold", "exit", "value", "n"]].rename(columns={"value": "fraction"})
    return out.sort_values(["run", "label", "policy", "threshold", "exit"]).reset_index(drop=True)


def skip_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of samples skipping each gated block: 1 - ``gate_rate`` (block in detail ``gate``,
    else in ``exit``)."""
    records = []
    for row in metric_rows(frame, "gate_rate").itertuples():
        block = detail_of(row.detail).get("gate", row.exit)
        records.append({**{g: getattr(row, g) for g in GROUP}, "policy": row.policy, "block": block,
                        "skip rate": 1.0 - row.value})
    out = pd.DataFrame(records, columns=[*GROUP, "policy", "block", "skip rate"])
    if out.empty:
        return out
    out["block"] = pd.to_numeric(out["block"], errors="coerce")
    out = out.drop_duplicates(GROUP + ["policy", "block"])
    return out.sort_values(GROUP + ["policy", "block"]).reset_index(drop=True)


def expert_loads(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of routed tokens per layer and expert (``expert_load`` rows; layer and expert from
    detail, else layer from ``exit`` and expert in row order)."""
    records = []
    counters: dict[tuple, int] = {}
    for row in metric_rows(frame, "expert_load").itertuples():
        d = detail_of(row.detail)
        layer = d.get("layer", row.exit if pd.notna(row.exit) else 0)
        key = tuple(getattr(row, g) for g in GROUP) + (row.policy, layer)
        expert = d.get("expert", counters.get(key, 0))
        counters[key] = counters.get(key, 0) + 1
        records.append({**{g: getattr(row, g) for g in GROUP}, "policy": row.policy, "layer": layer, "expert": expert,
                        "load": row.value})
    out = pd.DataFrame(records, columns=[*GROUP, "policy", "layer", "expert", "load"])
    return out.sort_values(GROUP + ["policy", "layer", "expert"]).reset_index(drop=True) if not out.empty else out


DECOMPOSITION_PARTS = {"expected_macs": "MACs", "expected_macs_backbone": "backbone MACs",
                       "expected_macs_heads": "heads MACs", "expected_macs_gating": "gates/routers MACs",
                       "macs_avoided_fraction": "share of full network avoided"}


def cost_decomposition(frame: pd.DataFrame) -> pd.DataFrame:
    """Per headline operating point (not the test grid): expected MACs and their parts (backbone
    that ran, exit heads and gates/routers evaluated) and the share of the full network avoided;
    ``vs forward()``: the share avoided relative to the plain backbone path, where it is fixed."""
    from fractalbench.reports.points import TEST_GRID

    wide: dict[tuple, dict[str, Any]] = {}
    for row in frame[frame["metric"].isin(list(DECOMPOSITION_PARTS))].itertuples():
        key = (*(getattr(row, g) for g in GROUP), row.policy, threshold_key(row.threshold))
        entry = wide.setdefault(key, {**{g: getattr(row, g) for g in GROUP}, "policy": row.policy,
                                      "threshold": none_if_nan(row.threshold)})
        entry[DECOMPOSITION_PARTS[row.metric]] = row.value
        if row.metric == "macs_avoided_fraction":
            entry["avoided vs forward()"] = detail_of(row.detail).get("avoided_vs_forward")
    accuracy = metric_rows(frame, "policy_top1")
    chosen = {(*(getattr(r, g) for g in GROUP), r.policy, threshold_key(r.threshold))
              for r in accuracy.itertuples() if point_selection("policy", r.threshold, r.detail) != TEST_GRID}
    columns = [*GROUP, "policy", "threshold", *DECOMPOSITION_PARTS.values(), "avoided vs forward()"]
    out = pd.DataFrame([v for k, v in wide.items() if k in chosen and "backbone MACs" in v], columns=columns)
    return out.sort_values([*GROUP, "MACs"]).reset_index(drop=True) if not out.empty else out


ROUTED_PARTS = {"expert_macs_useful": "useful expert MACs", "expert_macs_padded": "padded expert MACs",
                "expert_utilization": "utilization"}


def routed_compute(frame: pd.DataFrame) -> pd.DataFrame:
    """Routed models, per operating point: useful against padded expert MACs per image and their
    ratio (``expert_macs_*`` / ``expert_utilization`` rows), the share of assignments dropped per
    layer (``tokens_dropped``, as ``layer: share`` text) and the busiest expert's share per layer
    with its per-sample p90 (``expert_load``)."""
    wide: dict[tuple, dict[str, Any]] = {}

    def entry(row: Any) -> dict[str, Any]:
        key = (*(getattr(row, g) for g in GROUP), row.policy, threshold_key(row.threshold))
        return wide.setdefault(key, {**{g: getattr(row, g) for g in GROUP}, "policy": row.policy,
                                     "threshold": none_if_nan(row.threshold)})

    for row in frame[frame["metric"].isin(list(ROUTED_PARTS))].itertuples():
        entry(row)[ROUTED_PARTS[row.metric]] = row.value
    if not wide:
        return pd.DataFrame()
    for row in metric_rows(frame, "tokens_dropped").itertuples():
        entry(row).setdefault("dropped per layer", [])
        entry(row)["dropped per layer"].append(f"{detail_of(row.detail).get('layer')}: {row.value:.3f}")
    for row in metric_rows(frame, "expert_load").itertuples():
        layer = detail_of(row.detail).get("layer")
        per_layer = entry(row).setdefault("_busiest", {})
        if layer not in per_layer or row.value > per_layer[layer][0]:
            per_layer[layer] = (row.value, row.p90)
    records = []
    for v in wide.values():
        if "useful expert MACs" not in v:
            continue
        v = dict(v)
        v["dropped per layer"] = ", ".join(v.get("dropped per layer", []))
        v["busiest expert share (p90)"] = ", ".join(
            f"{layer}: {share:.3f} ({p90:.3f})" if p90 == p90 else f"{layer}: {share:.3f}"
            for layer, (share, p90) in sorted(v.pop("_busiest", {}).items(), key=lambda kv: str(kv[0])))
        records.append(v)
    columns = [*GROUP, "policy", "threshold", *ROUTED_PARTS.values(), "dropped per layer", "busiest expert share (p90)"]
    out = pd.DataFrame(records, columns=columns)
    return out.sort_values([*GROUP, "useful expert MACs"]).reset_index(drop=True) if not out.empty else out


def energy_table(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measured, skipped): ``energy_per_sample`` rows with their path, batch, gross and idle-net
    joules per sample and seconds measured; and per cell whose ``energy_meter`` read nothing, the
    reason."""
    records = []
    for row in metric_rows(frame, "energy_per_sample").itertuples():
        d = detail_of(row.detail)
        records.append({**{g: getattr(row, g) for g in GROUP}, "path": d.get("path"),
                        "exit": none_if_nan(row.exit), "policy": row.policy, "threshold": none_if_nan(row.threshold),
                        "batch": none_if_nan(row.batch_size), "J per sample": row.value,
                        "net J per sample": d.get("net_j_per_sample"), "idle W": d.get("idle_w"),
                        "seconds": d.get("seconds"), "source": d.get("source")})
    columns = [*GROUP, "path", "exit", "policy", "threshold", "batch", "J per sample", "net J per sample", "idle W",
               "seconds", "source"]
    measured = pd.DataFrame(records, columns=columns)
    skipped = [{**{g: getattr(row, g) for g in GROUP}, "source": detail_of(row.detail).get("source"),
                "reason": detail_of(row.detail).get("reason")}
               for row in metric_rows(frame, "energy_meter").itertuples() if not row.value]
    skipped_frame = pd.DataFrame(skipped, columns=[*GROUP, "source", "reason"]).drop_duplicates()
    return measured, skipped_frame.reset_index(drop=True)


def serving_table(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per rate, per point): the Server runs (offered and completed rate, p50/p99 latency, whether
    the rate passed) and per operating point the highest passing rate, the bound, the SingleStream
    p90 and the outcome mismatches."""
    runs = []
    for row in metric_rows(frame, "serving_latency").itertuples():
        d = detail_of(row.detail)
        runs.append({**{g: getattr(row, g) for g in GROUP}, "policy": row.policy,
                     "threshold": none_if_nan(row.threshold), "offered /s": d.get("offered"),
                     "completed /s": d.get("completed"), "p50 ms": none_if_nan(row.p50), "p99 ms": row.value,
                     "bound ms": d.get("bound_ms"), "passed": d.get("passed"), "queries": none_if_nan(row.n)})
    per_rate = pd.DataFrame(runs, columns=[*GROUP, "policy", "threshold", "offered /s", "completed /s", "p50 ms",
                                           "p99 ms", "bound ms", "passed", "queries"])
    points: dict[tuple, dict[str, Any]] = {}
    names_ = {"serving_max_rate": "max rate /s", "serving_single_stream": "single stream p90 ms",
              "serving_outcome_mismatches": "outcome mismatches"}
    for row in frame[frame["metric"].isin(list(names_))].itertuples():
        key = (*(getattr(row, g) for g in GROUP), row.policy, threshold_key(row.threshold))
        entry = points.setdefault(key, {**{g: getattr(row, g) for g in GROUP}, "policy": row.policy,
                                        "threshold": none_if_nan(row.threshold)})
        entry[names_[row.metric]] = row.value
        if row.metric == "serving_max_rate":
            d = detail_of(row.detail)
            entry.update({"bound ms": d.get("bound_ms"), "max batch": d.get("max_batch"),
                          "max wait ms": d.get("max_wait_ms")})
    per_point = pd.DataFrame(list(points.values()), columns=[*GROUP, "policy", "threshold", "max rate /s",
                                                             "bound ms", "single stream p90 ms",
                                                             "outcome mismatches", "max batch", "max wait ms"])
    sort = [*GROUP, "policy"]
    return (per_rate.sort_values([*sort, "offered /s"]).reset_index(drop=True) if not per_rate.empty else per_rate,
            per_point.sort_values(sort).reset_index(drop=True) if not per_point.empty else per_point)


def backend_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model, backend and streamed operating point: batch-1 latency through the backend, its saving
    against the same backend's forced last exit, the point's MACs saving (expected MACs against the
    last exit's), and the outcome mismatches against eager; unsupported models with their reason."""
    rows = metric_rows(frame, "latency_backend")
    records = []
    if not rows.empty:
        forced: dict[tuple, float] = {}
        for r in rows.itertuples():
            d = detail_of(r.detail)
            if d.get("path") == "forced":
                key = (*(getattr(r, g) for g in GROUP), d.get("backend"))
                if pd.notna(r.exit) and (key not in forced or r.exit > forced[key][0]):
                    forced[key] = (r.exit, r.value)
        macs = {(*(getattr(r, g) for g in GROUP), r.policy, threshold_key(r.threshold)): r.value
                for r in metric_rows(frame, "expected_macs").itertuples()}
        full = {tuple(getattr(r, g) for g in GROUP): r.value for r in metric_rows(frame, "macs").itertuples()
                if pd.notna(r.exit)}
        mismatch = {}
        for r in metric_rows(frame, "backend_outcome_mismatches").itertuples():
            d = detail_of(r.detail)
            mismatch[(*(getattr(r, g) for g in GROUP), d.get("backend"), r.policy, threshold_key(r.threshold))] = (
                r.value, d.get("near_ties"), d.get("exit_mismatches"))
        for r in rows.itertuples():
            d = detail_of(r.detail)
            if d.get("path") != "policy stream":
                continue
            group = tuple(getattr(r, g) for g in GROUP)
            last = forced.get((*group, d.get("backend")))
            point_macs = macs.get((*group, r.policy, threshold_key(r.threshold)))
            full_macs = full.get(group)
            m = mismatch.get((*group, d.get("backend"), r.policy, threshold_key(r.threshold)), (None, None, None))
            records.append({**dict(zip(GROUP, group)), "backend": d.get("backend"), "export": d.get("export"),
                            "policy": r.policy, "threshold": none_if_nan(r.threshold), "ms (b=1)": r.value,
                            "latency saving": 1 - r.value / last[1] if last and last[1] else None,
                            "MACs saving": 1 - point_macs / full_macs if point_macs and full_macs else None,
                            "outcome mismatches": m[0], "near ties": m[1], "exit mismatches": m[2]})
    for r in metric_rows(frame, "backend_unsupported").itertuples():
        d = detail_of(r.detail)
        records.append({**{g: getattr(r, g) for g in GROUP}, "backend": ", ".join(d.get("backends", [])),
                        "export": "not exported: " + str(d.get("reason", ""))})
    columns = [*GROUP, "backend", "export", "policy", "threshold", "ms (b=1)", "latency saving", "MACs saving",
               "outcome mismatches", "near ties", "exit mismatches"]
    out = pd.DataFrame(records, columns=columns)
    return out.sort_values([*GROUP, "policy", "backend"], na_position="first").reset_index(drop=True) \
        if not out.empty else out


LENGTH_PARTS = {"macs_at_length": "MACs", "latency_at_length": "latency ms", "memory_at_length": "peak MiB"}


def length_scaling(frame: pd.DataFrame) -> pd.DataFrame:
    """Sequence models against sequence length (``*_at_length`` rows): per model, attention variant
    and length, MACs (and the attention products' share), median latency and peak memory, and for a
    sparse variant its saving against full attention of the same size at that length
    (1 - sparse / full)."""
    wide: dict[tuple, dict[str, Any]] = {}
    for row in frame[frame["metric"].isin(list(LENGTH_PARTS))].itertuples():
        d = detail_of(row.detail)
        key = (*(getattr(row, g) for g in GROUP), d.get("attention", row.policy), d.get("length"))
        entry = wide.setdefault(key, {**{g: getattr(row, g) for g in GROUP}, "attention": key[-2],
                                      "length": d.get("length")})
        entry[LENGTH_PARTS[row.metric]] = row.value
        if row.metric == "macs_at_length":
            entry["attention MACs"] = d.get("attention_macs")
    if not wide:
        return pd.DataFrame()
    for (*group, attention, length), entry in wide.items():
        full = wide.get((*group, "full", length))
        if attention == "full" or full is None:
            continue
        for part in LENGTH_PARTS.values():
            mine, theirs = entry.get(part), full.get(part)
            if mine is not None and theirs:
                entry[f"{part} saving"] = 1.0 - mine / theirs
    columns = [*GROUP, "attention", "length", "MACs", "attention MACs", "latency ms", "peak MiB",
               *(f"{p} saving" for p in LENGTH_PARTS.values())]
    out = pd.DataFrame(list(wide.values()), columns=columns)
    return out.sort_values([*GROUP, "attention", "length"]).reset_index(drop=True)


def pattern_table(frame: pd.DataFrame) -> pd.DataFrame:
    """FractalBrainNet pattern analysis: complexity per level (``exit`` = level) and hierarchy score."""
    sub = frame[frame["metric"].isin(names(groups=["patterns"])) & frame["value"].notna()]
    if sub.empty:
        return pd.DataFrame()
    out = sub[GROUP + ["metric", "exit", "unit", "value"]].rename(columns={"exit": "level"})
    return out.sort_values(GROUP + ["metric", "level"]).reset_index(drop=True)


# ----- rows of any metric ---------------------------------------------------------------------------

def rows_table(frame: pd.DataFrame, metrics: Iterable[str]) -> pd.DataFrame:
    """Rows (with a value) of the given catalogue names (families ending in ``*`` match by prefix),
    in the row schema's own columns; columns empty in every row are left out."""
    selected = frozenset(metrics)
    sub = frame[[in_any(m, selected) for m in frame["metric"]]] if not frame.empty else frame
    sub = sub[sub["value"].notna()] if not sub.empty else sub
    return _rows(sub)


def _rows(sub: pd.DataFrame) -> pd.DataFrame:
    if sub.empty:
        return pd.DataFrame()
    table = drop_empty(sub[ROW_COLUMNS], ["metric", "value"])
    return table.sort_values(["run", "label", "metric"]).reset_index(drop=True)


def other_metrics_table(frame: pd.DataFrame, known: Iterable[str]) -> pd.DataFrame:
    """Rows of metrics no other table shows (``known``: the catalogue names the other tables
    cover; families match by prefix), so nothing is hidden."""
    known = frozenset(known)
    sub = frame[[not in_any(m, known) and m != "error" for m in frame["metric"]]] if not frame.empty else frame
    return _rows(sub)
