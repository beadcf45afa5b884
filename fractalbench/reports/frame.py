"""Stored runs as one pandas frame, and the row selections every table builds on.

``load_runs`` opens run directories through :func:`fractalbench.harness.results.open_run`; ``combined_rows``
puts all their rows in one frame with a display ``label`` per model (the model, plus the run
when several runs are shown) and the model's dynamic ``kind``. Nothing here measures or prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fractalbench.harness.outcomes import threshold_key as _outcome_threshold_key
from fractalbench.harness.results import ROW_FIELDS, RunData, open_run

GROUP = ["run", "label", "model", "dataset", "device"]
STATIC_KINDS = ("static",)
NUMERIC_FIELDS = ("value", "n", "std", "p50", "p90", "p99", "ci_low", "ci_high", "threshold", "batch_size", "exit",
                  "seed")
TEXT_FIELDS = ("policy", "variant", "split", "error", "detail", "metric", "unit", "dataset", "device", "model")


def load_runs(runs: Sequence[Path | str]) -> list[RunData]:
    """Read every run directory (``fractalbench.harness.results.ResultsError``, a ValueError, for a path
    that is not one)."""
    return [open_run(run) for run in runs]


def run_label(model: Any, run: RunData | str, multi: bool) -> str:
    """How a model is named on the page: the model, with ``[run]`` when several runs are shown."""
    name = run if isinstance(run, str) else run.name
    return f"{model} [{name}]" if multi else str(model)


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


def combined_rows(runs: Sequence[RunData], per_seed: bool = False) -> pd.DataFrame:
    """All runs' rows in one frame with ``run``, ``label`` (model, plus the run when several runs
    are shown) and ``kind`` (dynamic kind from the card; inferred from the rows when absent).
    Rows of several seeds are averaged (:func:`fractalbench.reports.seeds.aggregate_seeds`: columns ``seeds``
    and ``seed_std``) unless ``per_seed``."""
    from fractalbench.reports.seeds import aggregate_seeds

    frames = []
    multi = len(runs) > 1
    kinds = model_kinds(runs)
    for run in runs:
        f = run.rows.copy()
        f["run"] = run.name
        f["label"] = [run_label(m, run, multi) for m in f["model"].fillna("?")]
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=[*ROW_FIELDS, "run", "label", "kind", "seeds", "seed_std"])
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    for col in NUMERIC_FIELDS:
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    for col in TEXT_FIELDS:
        frame[col] = frame[col].fillna("").astype(str)
    frame["kind"] = [_kind(kinds, run, model, frame) for run, model in zip(frame["run"], frame["model"])]
    return frame if per_seed else aggregate_seeds(frame)


def _kind(kinds: Mapping[tuple[str, str], str], run: str, model: str, frame: pd.DataFrame) -> str:
    if (run, model) in kinds:
        return kinds[(run, model)]
    sub = frame[(frame["run"] == run) & (frame["model"] == model)]
    if (sub["metric"] == "error").all():
        return ""  # a failed cell: nothing says what it would have been
    if (sub["metric"] == "expert_load").any():
        return "routed"
    if (sub["metric"] == "gate_rate").any():
        return "gated"
    if (sub["metric"] == "policy_top1").any() or sub.loc[sub["metric"] == "top1", "exit"].nunique() > 1:
        return "early_exit"
    return "static"


def metric_rows(frame: pd.DataFrame, metric: str, ok_only: bool = True) -> pd.DataFrame:
    """Rows of ``metric`` (by default only those with a value and no error)."""
    sub = frame[frame["metric"] == metric]
    if ok_only:
        sub = sub[(sub["error"] == "") & sub["value"].notna()]
    return sub


def batch_one(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows measured at batch size 1 (or without a batch size)."""
    return rows[rows["batch_size"].isna() | (rows["batch_size"] == 1)]


def last_exit_values(frame: pd.DataFrame, metric: str, split: str | None = None,
                     extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per (run, label, dataset, device): the value of ``metric`` at the model's last exit
    (forced path, no policy; batch size 1 where rows carry one), and the row fields ``extra``."""
    sub = metric_rows(frame, metric)
    sub = sub[sub["policy"] == ""]
    if split is not None:
        sub = sub[sub["split"].isin([split, ""])]
    if sub.empty:
        return pd.DataFrame(columns=[*GROUP, metric, *extra])
    sub = sub.assign(_exit=sub["exit"].fillna(0))
    if sub["batch_size"].notna().any():
        sub = batch_one(sub)
    idx = sub.groupby(GROUP, dropna=False)["_exit"].idxmax()
    return sub.loc[idx, GROUP + ["value", *extra]].rename(columns={"value": metric}).reset_index(drop=True)


def first_value(frame: pd.DataFrame, metric: str, how: str = "first") -> pd.DataFrame:
    """Per model: the first (or, ``how="max"``, the largest) value of ``metric``."""
    sub = metric_rows(frame, metric)
    if sub.empty:
        return pd.DataFrame(columns=[*GROUP, metric])
    g = sub.groupby(GROUP, dropna=False)["value"]
    return (g.max() if how == "max" else g.first()).rename(metric).reset_index()


def drop_empty(table: pd.DataFrame, keep: Iterable[str] = ()) -> pd.DataFrame:
    """``table`` without the columns that are empty in every row (the model keys always stay)."""
    keep = set(keep) | set(GROUP)
    drop = [c for c in table.columns if c not in keep and table[c].isna().all()]
    return table.drop(columns=drop)


def merge_all(base: pd.DataFrame, parts: Iterable[pd.DataFrame], on: Sequence[str] = tuple(GROUP)) -> pd.DataFrame:
    """``base`` left-joined with every part on the model keys."""
    for part in parts:
        base = base.merge(part, on=list(on), how="left")
    return base


def none_if_nan(t: Any) -> Any:
    """None for a missing threshold (None or NaN), else the value."""
    if t is None or (isinstance(t, float) and t != t):
        return None
    return t


def threshold_key(t: Any) -> float | None:
    """A threshold as a dictionary key: None, or rounded to 9 decimals so float noise never splits a
    point (the rule per-sample outcomes are keyed by, :func:`fractalbench.harness.outcomes.threshold_key`)."""
    return _outcome_threshold_key(t)
