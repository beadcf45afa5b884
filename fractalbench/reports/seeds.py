"""Runs with several seeds: rows averaged over seeds for every table and plot, and the per-seed view.

A suite that lists ``seeds`` runs every model once per seed (cells ``...__seedN``, rows with their
``seed``). For the report, the rows of one quantity (same run, model, dataset, device, metric,
exit, policy, threshold, split, batch size and, for gate/expert/unit rows, the same gate, layer and
expert or cost unit) over the seeds become one row:

- ``value``: the mean over seeds; ``seed_std``: their sample standard deviation (ddof 1);
  ``seeds``: how many seeds it averages (rows of models run with one seed keep 1 and NaN);
- ``ci_low`` / ``ci_high``: the mean of the per-seed 95 % intervals (a typical single run's
  interval, kept beside the spread across seeds, which measures training noise the per-seed
  interval does not); ``n``: the per-seed sample count (test samples do not add up over seeds);
- the other fields from the lowest seed's row (``detail``, ``cell_id``).

:func:`seed_table` keeps the per-seed numbers: last-exit top-1 of every seed with its interval,
and the mean and spread.
"""
from __future__ import annotations

import pandas as pd

from fractalbench.harness.results import detail_of

DETAIL_KEYS = {"gate_rate": ("gate",), "expert_load": ("layer", "expert"), "unit_macs": ("cost_unit",)}
KEY = ["run", "label", "kind", "model", "variant", "dataset", "device", "batch_size", "exit", "policy", "threshold",
       "split", "metric", "unit", "_detail_key"]
MEANED = ("value", "std", "p50", "p90", "p99", "ci_low", "ci_high")


def has_seeds(frame: pd.DataFrame) -> bool:
    """Whether some model of some run has rows of two or more seeds."""
    if "seed" not in frame or frame.empty:
        return False
    seeds = pd.to_numeric(frame["seed"], errors="coerce")
    counts = frame.assign(_s=seeds).dropna(subset=["_s"]).groupby(["run", "model", "dataset", "device"])["_s"]
    return bool((counts.nunique() > 1).any())


def _detail_key(metric: str, detail: object) -> str:
    keys = DETAIL_KEYS.get(metric, ())
    d = detail_of(detail) if keys else {}
    return ",".join(f"{k}={d.get(k)}" for k in keys)


def aggregate_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with every quantity's rows over seeds averaged into one (module docstring);
    unchanged when no model has two seeds."""
    if not has_seeds(frame):
        return frame.assign(seeds=1, seed_std=float("nan")) if not frame.empty else frame
    work = frame.assign(_detail_key=[_detail_key(m, d) for m, d in zip(frame["metric"], frame["detail"])],
                        seed=pd.to_numeric(frame["seed"], errors="coerce"))
    work = work.sort_values("seed", kind="stable")
    keys = [k for k in KEY if k in work]
    grouped = work.groupby(keys, dropna=False, sort=False)
    first = grouped.head(1).set_index(keys)
    out = first.copy()
    for col in MEANED:
        out[col] = grouped[col].mean()
    out["seed_std"] = grouped["value"].std(ddof=1)
    out["seeds"] = grouped["seed"].nunique().clip(lower=1)
    out.loc[out["seeds"] > 1, "seed"] = float("nan")
    return out.reset_index().drop(columns=["_detail_key"])[[*frame.columns, "seeds", "seed_std"]]


def seed_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model with several seeds: the last exit's test top-1 of each seed with its 95 % interval,
    then the mean and the standard deviation over seeds. Empty when no model has two seeds."""
    columns = ["run", "label", "dataset", "device", "seed", "top1 %", "95% CI", "mean over seeds", "sd over seeds"]
    if not has_seeds(frame):
        return pd.DataFrame(columns=columns)
    top1 = frame[(frame["metric"] == "top1") & (frame["split"].isin(["test", ""])) & frame["value"].notna()]
    records = []
    for (run, label, dataset, device), sub in top1.groupby(["run", "label", "dataset", "device"], sort=True):
        last = sub[sub["exit"] == sub["exit"].max()] if sub["exit"].notna().any() else sub
        last = last.assign(seed=pd.to_numeric(last["seed"], errors="coerce")).sort_values("seed")
        if last["seed"].nunique() < 2:
            continue
        mean, sd = last["value"].mean(), last["value"].std(ddof=1)
        for row in last.itertuples():
            records.append({"run": run, "label": label, "dataset": dataset, "device": device, "seed": int(row.seed),
                            "top1 %": row.value, "95% CI": f"{row.ci_low:.2f}-{row.ci_high:.2f}",
                            "mean over seeds": mean, "sd over seeds": sd})
    return pd.DataFrame(records, columns=columns)
