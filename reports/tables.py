"""Tables from stored results: loading runs, summary per model, per exit, latency, memory,
reference numbers, accuracy-vs-cost operating points and their Pareto frontier.

Everything here reads rows written by ``harness.results`` and returns pandas DataFrames; nothing
measures or prints. Any subset of metrics may be present (older or smaller runs); a table whose
metrics are absent comes back empty.

Definitions
-----------
- Last exit: the highest ``exit`` of a model's ``top1``/``macs`` rows (the full network; a static
  model's only exit, 0).
- Operating point: (cost, accuracy) of one way to run a model. Dynamic models: one point per policy
  setting, ``policy_top1`` (%) with the ``expected_macs`` (MACs per image) of the same policy and
  threshold. Static models: ``top1`` and ``macs`` of the last exit. A dynamic model without policy
  rows falls back to its forced exits (``top1`` and ``macs`` per exit). For latency the cost is the
  mean ms per call at batch 1: the policy stream's ``latency`` row for a policy point (matched by the
  policy's description, e.g. ``confidence[0.9]``), the forced path's for an exit point.
- Pareto frontier: the points no other point dominates, where a dominates b when a costs no more,
  is at least as accurate, and is strictly better in one of the two.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from harness.results import ROW_FIELDS, CellRecord, RunStore

ACCURACY_METRICS = ("top1", "top5", "policy_top1")
MEMORY_METRICS = ("memory_peak_activations", "memory_weights", "memory_peak_allocated", "memory_peak_reserved")
STATIC_KINDS = ("static",)


# ----- loading -------------------------------------------------------------------------------------

@dataclass
class RunData:
    """One run directory as read back: rows, cell records, suite and environment."""

    path: Path
    rows: pd.DataFrame
    cells: list[CellRecord]
    suite: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)


def check_run_dir(path: Path | str) -> Path:
    """``path`` as a Path; ValueError naming it when it is not a run directory."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"run directory {path} does not exist")
    if not (path / "cells").is_dir() and not (path / "suite.json").is_file():
        raise ValueError(f"{path} is not a fractalbench run directory (no cells/ folder or suite.json inside)")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def load_runs(runs: Sequence[Path | str]) -> list[RunData]:
    """Read every run directory (ValueError for a path that is not one)."""
    out = []
    for run in runs:
        path = check_run_dir(run)
        store = RunStore(path)
        cells = store.read_cells()
        frame = pd.DataFrame([r for c in cells for r in c.rows], columns=list(ROW_FIELDS))
        out.append(RunData(path, frame, cells, _read_json(path / "suite.json"), _read_json(path / "environment.json")))
    return out


def model_kinds(runs: Sequence[RunData]) -> dict[tuple[str, str], str]:
    """(run name, model label as stored) -> dynamic kind from the model card in the cell meta."""
    kinds: dict[tuple[str, str], str] = {}
    for run in runs:
        for cell in run.cells:
            card = (cell.meta or {}).get("card") or {}
            models = {r.get("model") for r in cell.rows if r.get("model")}
            for model in models:
                if card.get("dynamic_kind"):
                    kinds[(run.name, model)] = str(card["dynamic_kind"])
    return kinds


def combined_rows(runs: Sequence[RunData]) -> pd.DataFrame:
    """All runs' rows in one frame with ``run``, ``label`` (model, plus the run when several runs
    are shown) and ``kind`` (dynamic kind from the card; inferred from the rows when absent)."""
    frames = []
    multi = len(runs) > 1
    kinds = model_kinds(runs)
    for run in runs:
        f = run.rows.copy()
        f["run"] = run.name
        f["label"] = [(f"{m} [{run.name}]" if multi else str(m)) for m in f["model"].fillna("?")]
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=[*ROW_FIELDS, "run", "label", "kind"])
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    for col in ("value", "n", "std", "p50", "p90", "p99", "threshold", "batch_size", "exit"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    for col in ("policy", "variant", "split", "error", "detail", "metric", "unit", "dataset", "device", "model"):
        frame[col] = frame[col].fillna("").astype(str)
    frame["kind"] = [_kind(kinds, run, model, frame) for run, model in zip(frame["run"], frame["model"])]
    return frame


def _kind(kinds: Mapping[tuple[str, str], str], run: str, model: str, frame: pd.DataFrame) -> str:
    if (run, model) in kinds:
        return kinds[(run, model)]
    sub = frame[(frame["run"] == run) & (frame["model"] == model)]
    if (sub["metric"] == "expert_load").any():
        return "routed"
    if sub["metric"].isin(["gate_rate", "skip_rate"]).any():
        return "gated"
    if (sub["metric"] == "policy_top1").any() or sub.loc[sub["metric"] == "top1", "exit"].nunique() > 1:
        return "early_exit"
    return "static"


def detail_of(value: Any) -> dict[str, Any]:
    """A row's ``detail`` as a dict ({} when empty or not JSON)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.strip():
        return {}
    try:
        data = json.loads(value)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _metric(frame: pd.DataFrame, metric: str, ok_only: bool = True) -> pd.DataFrame:
    sub = frame[frame["metric"] == metric]
    if ok_only:
        sub = sub[(sub["error"] == "") & sub["value"].notna()]
    return sub


GROUP = ["run", "label", "model", "dataset", "device"]


# ----- summary -------------------------------------------------------------------------------------

def last_exit_values(frame: pd.DataFrame, metric: str, split: str | None = None) -> pd.DataFrame:
    """Per (run, label, dataset, device): the value of ``metric`` at the model's last exit
    (forced path, no policy; batch size 1 where rows carry one)."""
    sub = _metric(frame, metric)
    sub = sub[sub["policy"] == ""]
    if split is not None:
        sub = sub[sub["split"].isin([split, ""])]
    if sub.empty:
        return pd.DataFrame(columns=[*GROUP, metric])
    sub = sub.assign(_exit=sub["exit"].fillna(0))
    if sub["batch_size"].notna().any():
        sub = sub[sub["batch_size"].isna() | (sub["batch_size"] == 1)]
    idx = sub.groupby(GROUP, dropna=False)["_exit"].idxmax()
    return sub.loc[idx, GROUP + ["value"]].rename(columns={"value": metric}).reset_index(drop=True)


def _first_value(frame: pd.DataFrame, metric: str, how: str = "first") -> pd.DataFrame:
    sub = _metric(frame, metric)
    if sub.empty:
        return pd.DataFrame(columns=[*GROUP, metric])
    g = sub.groupby(GROUP, dropna=False)["value"]
    return (g.max() if how == "max" else g.first()).rename(metric).reset_index()


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model, dataset and device: accuracy and MACs of the last exit, best policy
    accuracy, parameters total/active, latency p50/p90/p99 (ms, forced last exit) per batch size,
    peak memory (MiB, largest over exits) and the cell status."""
    if frame.empty:
        return pd.DataFrame()
    keys = frame[GROUP + ["kind"]].drop_duplicates(GROUP).reset_index(drop=True)
    parts = [
        last_exit_values(frame, "top1", "test").rename(columns={"top1": "top1 %"}),
        last_exit_values(frame, "top5", "test").rename(columns={"top5": "top5 %"}),
        _best_policy(frame),
        last_exit_values(frame, "macs").rename(columns={"macs": "MACs (last exit)"}),
        _first_value(frame, "params").rename(columns={"params": "params"}),
        _first_value(frame, "params_active").rename(columns={"params_active": "params active"}),
    ]
    table = keys
    for part in parts:
        table = table.merge(part, on=GROUP, how="left")
    table = table.merge(_latency_wide(frame), on=GROUP, how="left")
    for metric, title in (("memory_peak_activations", "peak activations MiB"), ("memory_weights", "weights MiB"),
                          ("memory_peak_allocated", "GPU peak allocated MiB"), ("memory_peak_reserved", "GPU peak reserved MiB")):
        table = table.merge(_first_value(frame, metric, "max").rename(columns={metric: title}), on=GROUP, how="left")
    errors = frame[(frame["metric"] == "error")].groupby(GROUP, dropna=False).size().rename("failed").reset_index()
    table = table.merge(errors, on=GROUP, how="left")
    table["status"] = np.where(table["failed"].fillna(0) > 0, "failed", "ok")
    table = table.drop(columns=["failed"])
    return _drop_empty(table).sort_values(["run", "dataset", "device", "label"]).reset_index(drop=True)


def _best_policy(frame: pd.DataFrame) -> pd.DataFrame:
    points = operating_points(frame, "macs")
    points = points[points["source"] == "policy"]
    if points.empty:
        return pd.DataFrame(columns=[*GROUP, "best policy top1 %", "its expected MACs"])
    idx = points.groupby(GROUP, dropna=False)["accuracy"].idxmax()
    best = points.loc[idx, GROUP + ["accuracy", "cost"]]
    return best.rename(columns={"accuracy": "best policy top1 %", "cost": "its expected MACs"})


def _latency_wide(frame: pd.DataFrame) -> pd.DataFrame:
    lat = latency_table(frame)
    if lat.empty:
        return pd.DataFrame(columns=GROUP)
    lat = lat[lat["path"] == "forced"]
    if lat.empty:
        return pd.DataFrame(columns=GROUP)
    lat = lat.loc[lat.groupby(GROUP + ["batch size"], dropna=False)["exit"].idxmax()]
    wide = None
    for b in sorted(lat["batch size"].dropna().unique()):
        part = lat[lat["batch size"] == b][GROUP + ["p50 ms", "p90 ms", "p99 ms"]]
        part = part.rename(columns={c: f"latency {c.split()[0]} ms (b={int(b)})" for c in ("p50 ms", "p90 ms", "p99 ms")})
        wide = part if wide is None else wide.merge(part, on=GROUP, how="outer")
    return wide if wide is not None else pd.DataFrame(columns=GROUP)


def _drop_empty(table: pd.DataFrame, keep: Iterable[str] = ()) -> pd.DataFrame:
    keep = set(keep) | set(GROUP)
    drop = [c for c in table.columns if c not in keep and table[c].isna().all()]
    return table.drop(columns=drop)


# ----- per exit, latency, memory -----------------------------------------------------------------------

def per_exit_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model and exit: top-1/top-5 (%), MACs of the forced path, latency (ms, batch 1, forced
    path: mean and p50) and the share of samples leaving there under the streamed/first policy."""
    acc = _metric(frame, "top1")
    if acc.empty and _metric(frame, "macs").empty:
        return pd.DataFrame()
    key = GROUP + ["exit"]

    def pick(metric: str, col: str = "value", title: str | None = None, batch1: bool = False) -> pd.DataFrame:
        sub = _metric(frame, metric)
        sub = sub[(sub["policy"] == "") & sub["exit"].notna()]
        if batch1:
            sub = sub[sub["batch_size"].isna() | (sub["batch_size"] == 1)]
        if sub.empty:
            return pd.DataFrame(columns=[*key, title or metric])
        return sub.groupby(key, dropna=False)[col].first().rename(title or metric).reset_index()

    parts = [pick("top1", title="top1 %"), pick("top5", title="top5 %"), pick("macs", title="MACs"),
             pick("latency", title="latency mean ms (b=1)", batch1=True), pick("latency", "p50", "latency p50 ms (b=1)", batch1=True)]
    table = None
    for part in parts:
        if part.empty:
            continue
        table = part if table is None else table.merge(part, on=key, how="outer")
    if table is None:
        return pd.DataFrame()
    table["exit"] = table["exit"].astype(int)
    return _drop_empty(table, ["exit"]).sort_values(["run", "dataset", "device", "label", "exit"]).reset_index(drop=True)


def latency_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every latency row: model, device, batch size, path (forced exit k or policy), mean,
    p50/p90/p99 (ms) and the number of timed calls. p99 is empty below 100 calls."""
    sub = _metric(frame, "latency")
    if sub.empty:
        return pd.DataFrame()
    out = sub[GROUP + ["batch_size", "exit", "policy", "value", "p50", "p90", "p99", "n"]].copy()
    out["path"] = np.where(out["policy"] == "", "forced", "policy")
    out = out.rename(columns={"batch_size": "batch size", "value": "mean ms", "p50": "p50 ms", "p90": "p90 ms",
                              "p99": "p99 ms", "n": "n"})
    cols = GROUP + ["batch size", "path", "exit", "policy", "mean ms", "p50 ms", "p90 ms", "p99 ms", "n"]
    return out[cols].sort_values(["run", "device", "label", "batch size", "path", "exit", "policy"]).reset_index(drop=True)


def memory_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Memory rows (MiB): weights apart from peak activations; GPU peaks where measured."""
    sub = frame[frame["metric"].isin(MEMORY_METRICS) & (frame["error"] == "") & frame["value"].notna()]
    if sub.empty:
        return pd.DataFrame()
    out = sub[GROUP + ["batch_size", "exit", "metric", "value"]].rename(columns={"batch_size": "batch size", "value": "MiB"})
    return out.sort_values(["run", "device", "label", "metric", "exit"]).reset_index(drop=True)


def error_table(runs: Sequence[RunData]) -> pd.DataFrame:
    """Failed cells (status error) and rows of finished cells that carry an error."""
    records = []
    multi = len(runs) > 1
    for run in runs:
        for cell in run.cells:
            models = [r.get("model") for r in cell.rows if r.get("model")]
            label = models[0] if models else (cell.meta or {}).get("model", "?")
            label = f"{label} [{run.name}]" if multi else label
            if cell.status != "ok":
                records.append({"run": run.name, "cell": cell.cell_id, "label": label, "metric": "(cell failed)",
                                "error": cell.error or "unknown error", "traceback": (cell.meta or {}).get("traceback", "")})
            for row in cell.rows:
                if row.get("error") and row.get("metric") != "error":
                    records.append({"run": run.name, "cell": cell.cell_id, "label": label, "metric": row.get("metric", ""),
                                    "error": row["error"], "traceback": ""})
    return pd.DataFrame(records, columns=["run", "cell", "label", "metric", "error", "traceback"])


# ----- reference numbers ---------------------------------------------------------------------------

def reference_table(runs: Sequence[RunData], frame: pd.DataFrame) -> pd.DataFrame:
    """Published numbers from each model card (cell meta ``card.reference``) beside the measured
    ones where the key names a measured metric: ``params``, ``params_active``;
    ``macs``/``flops`` (last exit), ``macs_<size>`` and ``macs_<size>_exit_<k>`` (only when measured
    at that input size); ``top1``/``top5`` (last exit; ``top1_<dataset>`` only when the run's dataset
    label starts with that name). Other keys are shown with the measured column empty;
    ``measured at`` says the input (MACs) or dataset (accuracy) of the measurement."""
    records = []
    multi = len(runs) > 1
    for run in runs:
        for cell in run.cells:
            meta = cell.meta or {}
            card = meta.get("card") or {}
            ref = card.get("reference") or {}
            if not ref:
                continue
            model = next((r.get("model") for r in cell.rows if r.get("model")), meta.get("model", "?"))
            label = f"{model} [{run.name}]" if multi else str(model)
            rows = frame[(frame["run"] == run.name) & (frame["cell_id"] == cell.cell_id)]
            dataset = str(meta.get("dataset", ""))
            for key, published in sorted(ref.items()):
                measured, where = measured_for(key, rows, dataset)
                ratio = measured / published if _num(measured) and _num(published) and published else None
                records.append({"run": run.name, "label": label, "dataset": dataset, "device": meta.get("device", ""),
                                "quantity": key, "published": published, "measured": measured, "measured at": where,
                                "measured / published": ratio, "source": card.get("reference_source", "")})
    return pd.DataFrame(records, columns=["run", "label", "dataset", "device", "quantity", "published", "measured",
                                          "measured at", "measured / published", "source"])


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_COST_KEY = re.compile(r"^(macs|flops)(?:_(\d+))?(?:_exit_(\d+))?$")
_ACC_KEY = re.compile(r"^(top1|top5)(?:_(.+))?$")


def _input_side(detail: Any) -> int | None:
    shape = detail_of(detail).get("input_shape")
    return int(shape[-1]) if isinstance(shape, list) and shape and isinstance(shape[-1], (int, float)) else None


def measured_for(key: str, rows: pd.DataFrame, dataset: str) -> tuple[float | None, str]:
    """(measured value, where it was measured) for a model-card reference key; (None, '') when the
    key names nothing measured here or the measurement is at another input size / dataset."""
    if key in ("params", "params_active"):
        sub = _metric(rows, key)
        return (float(sub["value"].iloc[0]), "") if not sub.empty else (None, "")
    cost = _COST_KEY.match(key)
    if cost:
        metric, size, exit_ = cost.group(1), cost.group(2), cost.group(3)
        sub = _metric(rows, metric)
        sub = sub[sub["policy"] == ""]
        if sub.empty:
            return None, ""
        sides = [_input_side(d) for d in sub["detail"]]
        if size is not None:
            sub = sub[[s == int(size) for s in sides]]
        if exit_ is not None:
            sub = sub[sub["exit"] == int(exit_)]
        if sub.empty:
            return None, ""
        row = sub.loc[sub["exit"].fillna(0).idxmax()]
        side = _input_side(row["detail"])
        return float(row["value"]), (f"{side}x{side}" if side else "")
    acc = _ACC_KEY.match(key)
    if acc and (acc.group(2) is None or dataset.lower().startswith(acc.group(2).lower())):
        vals = last_exit_values(rows, acc.group(1))
        return (float(vals[acc.group(1)].iloc[0]), dataset) if not vals.empty else (None, "")
    return None, ""


# ----- operating points and the Pareto frontier ------------------------------------------------------

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


def policy_description(policy: str, threshold: float | None, detail: Mapping[str, Any]) -> str:
    """The label a latency stream row carries for this policy point (``ExitPolicy.describe()``:
    ``name[t1,t2]`` with 4 significant digits); '' when it cannot be formed."""
    name = policy.split("@", 1)[0]
    if threshold is not None and not (isinstance(threshold, float) and math.isnan(threshold)):
        return f"{name}[{float(threshold):.4g}]"
    thresholds = detail.get("thresholds")
    if isinstance(thresholds, list) and thresholds:
        return f"{name}[{','.join(f'{float(t):.4g}' for t in thresholds)}]"
    return ""


def operating_points(frame: pd.DataFrame, cost: str = "macs") -> pd.DataFrame:
    """Accuracy-vs-cost points of every model (see the module docstring), with a ``pareto`` column
    marking the frontier over all shown runs and models per dataset (and per device for latency). ``cost``: "macs" (MACs per
    image) or "latency" (ms per call, batch 1)."""
    if cost not in ("macs", "latency"):
        raise ValueError(f"cost must be 'macs' or 'latency', got {cost!r}")
    cols = GROUP + ["kind", "source", "policy", "threshold", "exit", "cost", "accuracy"]
    records: list[dict[str, Any]] = []
    if frame.empty:
        return pd.DataFrame(columns=[*cols, "pareto"])
    for key, sub in frame.groupby(GROUP, dropna=False, sort=True):
        base = dict(zip(GROUP, key))
        kind = sub["kind"].iloc[0]
        policy_points = _policy_points(sub, cost)
        if policy_points:
            records.extend({**base, "kind": kind, **p} for p in policy_points)
        else:
            records.extend({**base, "kind": kind, **p} for p in _exit_points(sub, cost, kind))
    points = pd.DataFrame(records, columns=cols)
    points["pareto"] = False
    groups = ["dataset"] if cost == "macs" else ["dataset", "device"]
    if not points.empty:
        for _, sel in points.groupby(groups, dropna=False):
            points.loc[sel.index, "pareto"] = pareto_mask(sel["cost"].to_numpy(), sel["accuracy"].to_numpy())
    return points


def _policy_points(sub: pd.DataFrame, cost: str) -> list[dict[str, Any]]:
    acc = _metric(sub, "policy_top1")
    acc = acc[acc["split"].isin(["test", ""])]
    if acc.empty:
        return []
    if cost == "macs":
        costs = _metric(sub, "expected_macs")
        lookup = {(p, _thr(t)): v for p, t, v in zip(costs["policy"], costs["threshold"], costs["value"])}
    else:
        lat = _metric(sub, "latency")
        lat = lat[(lat["policy"] != "") & (lat["batch_size"].isna() | (lat["batch_size"] == 1))]
        lookup = {p: v for p, v in zip(lat["policy"], lat["value"])}
        defaults = [v for p, v in lookup.items() if p == "default"]
    out = []
    no_threshold = acc[acc["threshold"].isna() & ~acc["policy"].str.contains("@")]
    for policy, threshold, value, detail in zip(acc["policy"], acc["threshold"], acc["value"], acc["detail"]):
        if cost == "macs":
            c = lookup.get((policy, _thr(threshold)))
        else:
            c = lookup.get(policy_description(policy, _none(threshold), detail_of(detail)))
            if c is None:
                c = lookup.get(policy)
            if c is None and defaults and len(no_threshold) == 1 and policy == no_threshold["policy"].iloc[0]:
                c = defaults[0]  # gated/routed models: the learned decisions are streamed as "default"
        if c is None:
            continue
        out.append({"source": "policy", "policy": policy, "threshold": _none(threshold), "exit": None,
                    "cost": float(c), "accuracy": float(value)})
    return out


def _exit_points(sub: pd.DataFrame, cost: str, kind: str) -> list[dict[str, Any]]:
    acc = _metric(sub, "top1")
    acc = acc[(acc["policy"] == "") & acc["split"].isin(["test", ""])]
    if cost == "macs":
        c = _metric(sub, "macs")
    else:
        c = _metric(sub, "latency")
        c = c[c["batch_size"].isna() | (c["batch_size"] == 1)]
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
             "accuracy": float(acc_by_exit[k])} for k in exits]


def _thr(t: Any) -> float | None:
    t = _none(t)
    return None if t is None else round(float(t), 9)


def _none(t: Any) -> Any:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return None
    return t


# ----- histograms ------------------------------------------------------------------------------

def exit_histograms(frame: pd.DataFrame) -> pd.DataFrame:
    """exit_fraction rows: label, policy, threshold, exit, fraction (policy streams and sweeps)."""
    sub = _metric(frame, "exit_fraction")
    if sub.empty:
        return pd.DataFrame()
    out = sub[GROUP + ["policy", "threshold", "exit", "value", "n"]].rename(columns={"value": "fraction"})
    return out.sort_values(["run", "label", "policy", "threshold", "exit"]).reset_index(drop=True)


def skip_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of samples skipping each gated block: ``skip_rate`` rows (block in ``exit``) or,
    from ``gate_rate`` rows (block in detail ``gate``), 1 - gate rate."""
    records = []
    for row in _metric(frame, "skip_rate").itertuples():
        records.append({**{g: getattr(row, g) for g in GROUP}, "policy": row.policy, "block": row.exit, "skip rate": row.value})
    for row in _metric(frame, "gate_rate").itertuples():
        block = detail_of(row.detail).get("gate", row.exit)
        records.append({**{g: getattr(row, g) for g in GROUP}, "policy": row.policy, "block": block, "skip rate": 1.0 - row.value})
    out = pd.DataFrame(records, columns=[*GROUP, "policy", "block", "skip rate"])
    if out.empty:
        return out
    out["block"] = pd.to_numeric(out["block"], errors="coerce")
    return out.drop_duplicates(GROUP + ["policy", "block"]).sort_values(GROUP + ["policy", "block"]).reset_index(drop=True)


def expert_loads(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of routed tokens per layer and expert (``expert_load`` rows; layer and expert from
    detail, else layer from ``exit`` and expert in row order)."""
    records = []
    counters: dict[tuple, int] = {}
    for row in _metric(frame, "expert_load").itertuples():
        d = detail_of(row.detail)
        layer = d.get("layer", row.exit if pd.notna(row.exit) else 0)
        key = tuple(getattr(row, g) for g in GROUP) + (row.policy, layer)
        expert = d.get("expert", counters.get(key, 0))
        counters[key] = counters.get(key, 0) + 1
        records.append({**{g: getattr(row, g) for g in GROUP}, "policy": row.policy, "layer": layer, "expert": expert,
                        "load": row.value})
    out = pd.DataFrame(records, columns=[*GROUP, "policy", "layer", "expert", "load"])
    return out.sort_values(GROUP + ["policy", "layer", "expert"]).reset_index(drop=True) if not out.empty else out


def pattern_table(frame: pd.DataFrame) -> pd.DataFrame:
    """FractalBrainNet pattern analysis: complexity per level (``exit`` = level) and hierarchy score."""
    sub = frame[frame["metric"].isin(["pattern_complexity", "hierarchy_score"]) & frame["value"].notna()]
    if sub.empty:
        return pd.DataFrame()
    out = sub[GROUP + ["metric", "exit", "unit", "value"]].rename(columns={"exit": "level"})
    return out.sort_values(GROUP + ["metric", "level"]).reset_index(drop=True)


def other_metrics_table(frame: pd.DataFrame, known: Iterable[str]) -> pd.DataFrame:
    """Rows of metrics no other table shows (unknown or auxiliary metrics), so nothing is hidden."""
    sub = frame[~frame["metric"].isin(set(known)) & (frame["metric"] != "error")]
    if sub.empty:
        return pd.DataFrame()
    cols = GROUP + ["batch_size", "exit", "policy", "threshold", "split", "metric", "unit", "value", "n"]
    return _drop_empty(sub[cols], ["metric", "value"]).sort_values(["run", "label", "metric"]).reset_index(drop=True)


# ----- formatting and files -----------------------------------------------------------------------------

def format_value(value: Any) -> str:
    """A cell as text: '' for missing, thousands separators for large whole numbers, else 4
    significant digits."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if abs(v) >= 10_000 or (v == int(v) and abs(v) >= 1000):
            return f"{v:,.0f}"
        if v == int(v) and abs(v) < 1000:
            return str(int(v))
        return f"{v:.4g}"
    return str(value)


def formatted(table: pd.DataFrame) -> list[list[str]]:
    return [[format_value(v) for v in row] for row in table.itertuples(index=False, name=None)]


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub Markdown table (pipes and newlines in cells escaped)."""
    from tabulate import tabulate

    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")

    rows = [[cell(v) for v in r] for r in formatted(table)]
    return tabulate(rows, headers=[cell(str(c)) for c in table.columns], tablefmt="github", disable_numparse=True)


def write_table(table: pd.DataFrame, folder: Path, name: str) -> list[Path]:
    """``name``.csv (raw values) and ``name``.md (formatted) in ``folder``; the paths written."""
    from harness.results import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / f"{name}.csv", folder / f"{name}.md"
    atomic_write_text(csv_path, table.to_csv(index=False))
    atomic_write_text(md_path, to_markdown(table) + "\n")
    return [csv_path, md_path]
