"""Published numbers from the model cards beside the measured ones."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from harness.results import RunData, detail_of
from reports.frame import last_exit_values, metric_rows, run_label

REFERENCE_COLUMNS = ["run", "label", "dataset", "device", "quantity", "published", "measured", "measured at",
                     "measured / published", "source"]
_COST_KEY = re.compile(r"^(macs|flops)(?:_(\d+))?(?:_exit_(\d+))?$")
_ACC_KEY = re.compile(r"^(top1|top5)(?:_(.+))?$")


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
            rows = frame[(frame["run"] == run.name) & (frame["cell_id"] == cell.cell_id)]
            dataset = str(meta.get("dataset", ""))
            base = {"run": run.name, "label": run_label(model, run, multi), "dataset": dataset,
                    "device": meta.get("device", ""), "source": card.get("reference_source", "")}
            for key, published in sorted(ref.items()):
                measured, where = measured_for(key, rows, dataset)
                ratio = measured / published if _num(measured) and _num(published) and published else None
                records.append({**base, "quantity": key, "published": published, "measured": measured,
                                "measured at": where, "measured / published": ratio})
    return pd.DataFrame(records, columns=REFERENCE_COLUMNS)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _input_side(detail: Any) -> int | None:
    shape = detail_of(detail).get("input_shape")
    return int(shape[-1]) if isinstance(shape, list) and shape and isinstance(shape[-1], (int, float)) else None


def _measured_cost(rows: pd.DataFrame, metric: str, size: str | None, exit_: str | None) -> tuple[float | None, str]:
    sub = metric_rows(rows, metric)
    sub = sub[sub["policy"] == ""]
    if sub.empty:
        return None, ""
    if size is not None:
        sub = sub[[_input_side(d) == int(size) for d in sub["detail"]]]
    if exit_ is not None:
        sub = sub[sub["exit"] == int(exit_)]
    if sub.empty:
        return None, ""
    row = sub.loc[sub["exit"].fillna(0).idxmax()]
    side = _input_side(row["detail"])
    return float(row["value"]), (f"{side}x{side}" if side else "")


def measured_for(key: str, rows: pd.DataFrame, dataset: str) -> tuple[float | None, str]:
    """(measured value, where it was measured) for a model-card reference key; (None, '') when the
    key names nothing measured here or the measurement is at another input size / dataset."""
    if key in ("params", "params_active"):
        sub = metric_rows(rows, key)
        return (float(sub["value"].iloc[0]), "") if not sub.empty else (None, "")
    cost = _COST_KEY.match(key)
    if cost:
        return _measured_cost(rows, cost.group(1), cost.group(2), cost.group(3))
    acc = _ACC_KEY.match(key)
    if acc and (acc.group(2) is None or dataset.lower().startswith(acc.group(2).lower())):
        vals = last_exit_values(rows, acc.group(1))
        return (float(vals[acc.group(1)].iloc[0]), dataset) if not vals.empty else (None, "")
    return None, ""
