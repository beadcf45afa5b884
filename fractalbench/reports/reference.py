"""Published numbers from the model cards beside the measured ones, and the recipes behind both.

A card's ``paper_recipe`` (``fractalbench.harness.registry.recipe_text``) starts with ``key=value`` pairs named
like a suite's ``train:`` fields; the run's own recipe comes from the suite as written (suite.json
``content``: the suite's ``train:`` with the model entry's ``train:`` on top, TrainConfig's defaults
for fields neither gives, and an ``attribute_sweep`` stage as ``stage2.<field>``). The two are
compared key by key over the paper's keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from fractalbench.harness.results import RunData, detail_of
from fractalbench.reports.frame import last_exit_values, metric_rows, run_label

REFERENCE_COLUMNS = ["run", "label", "dataset", "device", "quantity", "published", "measured", "measured at",
                     "measured / published", "source", "paper recipe", "measured recipe", "recipes differ",
                     "recipe differences"]
NO_PUBLISHED = "no published CIFAR number"
_COST_KEY = re.compile(r"^(macs|flops)(?:_(\d+))?(?:_exit_(\d+))?$")
_ACC_KEY = re.compile(r"^(top1_full|top1|top5)(?:_(.+))?$")
_CIFAR_ACC_KEY = re.compile(r"(^|_)top[15](_|$).*cifar")
_RECIPE_PAIR = re.compile(r"([\w.]+)=(\S+)")
#: fractalbench.harness.train.TrainConfig's defaults (that module needs torch; tests/reports check they agree).
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                                  "weight_decay": 5e-4, "schedule": "cosine", "milestones": (), "gamma": 0.1,
                                  "warmup_epochs": 0.0, "max_steps_per_epoch": None, "precision": "fp32",
                                  "compile": False, "channels_last": False, "sync_batchnorm": False,
                                  "device_batches": True, "freeze": "none"}
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which fractalbench.harness.train.make_optimizer keeps


def reference_table(runs: Sequence[RunData], frame: pd.DataFrame) -> pd.DataFrame:
    """Published numbers from each model card (cell meta ``card.reference``) beside the measured
    ones where the key names a measured metric: ``params``, ``params_active``;
    ``macs``/``flops`` (last exit), ``macs_<size>`` and ``macs_<size>_exit_<k>`` (only when measured
    at that input size); ``top1``/``top5`` (last exit), ``top1_full`` (the full network where it is
    not an exit); ``<metric>_<dataset>`` only when the run's dataset label starts with that name.
    Other keys are shown with the measured column empty; ``measured at`` says the input (MACs) or
    dataset (accuracy) of the measurement. A card without a published CIFAR accuracy gets one
    ``top1`` row whose source says so. Every row carries the card's paper recipe, the cell's
    recipe from the suite and whether they differ (yes/no/unknown)."""
    records = []
    multi = len(runs) > 1
    for run in runs:
        content = (run.suite or {}).get("content")
        for cell in run.cells:
            card = (cell.meta or {}).get("card")
            if card:
                records.extend(_cell_records(run, cell, card, frame, content, multi))
    return pd.DataFrame(records, columns=REFERENCE_COLUMNS)


def _cell_records(run: RunData, cell: Any, card: Mapping[str, Any], frame: pd.DataFrame,
                  content: Mapping[str, Any] | None, multi: bool) -> list[dict[str, Any]]:
    meta = cell.meta or {}
    ref = card.get("reference") or {}
    model = next((r.get("model") for r in cell.rows if r.get("model")), meta.get("model", "?"))
    rows = frame[(frame["run"] == run.name) & (frame["cell_id"] == cell.cell_id)]
    dataset = str(meta.get("dataset", ""))
    paper_text = str(card.get("paper_recipe") or "")
    measured_recipe = suite_recipe(content, str(model), str(meta.get("model", model))) if content else None
    differences = recipe_differences(parse_recipe(paper_text), measured_recipe)
    base = {"run": run.name, "label": run_label(model, run, multi), "dataset": dataset,
            "device": meta.get("device", ""), "source": card.get("reference_source", ""),
            "paper recipe": paper_text, "measured recipe": _recipe_cell(measured_recipe, content),
            "recipes differ": "unknown" if differences is None else "yes" if differences else "no",
            "recipe differences": "; ".join(differences or [])}
    records = []
    for key, published in sorted(ref.items()):
        measured, where = measured_for(key, rows, dataset)
        ratio = measured / published if _num(measured) and _num(published) and published else None
        records.append({**base, "quantity": key, "published": published, "measured": measured,
                        "measured at": where, "measured / published": ratio})
    if not any(_CIFAR_ACC_KEY.search(key) for key in ref):
        measured, where = measured_for("top1", rows, dataset)
        source = str(base["source"])
        if NO_PUBLISHED.lower() not in source.lower():
            source = f"{NO_PUBLISHED}; {source}" if source else NO_PUBLISHED
        records.append({**base, "quantity": "top1", "published": None, "measured": measured, "measured at": where,
                        "measured / published": None, "source": source})
    return records


def _recipe_cell(recipe: Mapping[str, str] | None, content: Mapping[str, Any] | None) -> str:
    if recipe is None:
        return "unknown (no suite content in the run)" if not content else "unknown (model not in the suite)"
    return " ".join(f"{k}={v}" for k, v in recipe.items())


# ----- recipes -----------------------------------------------------------------------------------

def recipe_value(value: Any) -> str:
    """A recipe value as text: yes/no, comma-joined sequences, numbers as %g."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(recipe_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_recipe(text: str) -> dict[str, str]:
    """The ``key=value`` pairs of a card's paper recipe (the text before `` | ``)."""
    return dict(_RECIPE_PAIR.findall(text.split(" | ", 1)[0]))


def train_recipe(settings: Mapping[str, Any]) -> dict[str, str]:
    """Training settings (a suite's ``train:`` fields, TrainConfig's defaults for the others) as
    recipe pairs: momentum and Nesterov (always on with momentum) only for SGD, Adam's betas only
    for Adam, milestones and gamma only for the step schedule, a warm-up only when there is one."""
    c = {**TRAIN_DEFAULTS, **settings}
    out = {"epochs": c["epochs"], "batch_size": c["batch_size"], "optimizer": c["optimizer"], "lr": c["lr"]}
    if c["optimizer"] == "sgd":
        out.update(momentum=c["momentum"], nesterov=bool(c["momentum"]))
    else:
        out["betas"] = ADAM_BETAS
    out.update(weight_decay=c["weight_decay"], schedule=c["schedule"])
    if c["schedule"] == "step":
        out.update(milestones=tuple(c["milestones"]), gamma=c["gamma"])
    if c["warmup_epochs"]:
        out["warmup_epochs"] = float(c["warmup_epochs"])
    if c["max_steps_per_epoch"] is not None:
        out["max_steps_per_epoch"] = c["max_steps_per_epoch"]
    out["precision"] = c["precision"]
    return {k: recipe_value(v) for k, v in out.items()}


def suite_recipe(content: Mapping[str, Any], label: str, model: str) -> dict[str, str] | None:
    """The recipe a suite as written gave the entry shown as ``label`` (or, failing that, the first
    entry of registered name ``model``); ``{"epochs": "0"}`` when the suite trains nothing; None when
    no entry matches."""
    entries = [{"name": m} if isinstance(m, str) else m for m in content.get("models") or []
               if isinstance(m, (str, Mapping))]
    entry = next((e for e in entries if (e.get("label") or e.get("name")) == label), None)
    entry = entry or next((e for e in entries if e.get("name") == model), None)
    if entry is None:
        return None
    if not isinstance(content.get("train"), Mapping):
        return {"epochs": "0"}
    settings = {**content["train"], **(entry.get("train") or {})}
    recipe = train_recipe(settings)
    sweep = entry.get("attribute_sweep")
    if isinstance(sweep, Mapping):
        stage = train_recipe({**settings, **(sweep.get("train") or {})})
        recipe.update({f"stage2.{k}": v for k, v in stage.items()})
        recipe[f"stage2.{sweep.get('attribute')}"] = recipe_value(tuple(sweep.get("values") or ()))
    return recipe


def recipe_differences(paper: Mapping[str, str], measured: Mapping[str, str] | None) -> list[str] | None:
    """``"key measured vs paper"`` for every paper key the measured recipe does not match ([] when
    all match); None when either recipe is unknown."""
    if not paper or measured is None:
        return None
    return [f"{key} {measured.get(key, '-')} vs {value}" for key, value in paper.items()
            if not _same_value(measured.get(key), value)]


def _same_value(a: str | None, b: str) -> bool:
    if a is None:
        return False
    left, right = a.split(","), b.split(",")
    if len(left) != len(right):
        return False
    for x, y in zip(left, right):
        try:
            if not math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12):
                return False
        except ValueError:
            if x.strip().lower() != y.strip().lower():
                return False
    return True


# ----- measured values ---------------------------------------------------------------------------

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
    if acc and (acc.group(2) is None or dataset_matches(dataset, acc.group(2))):
        vals = last_exit_values(rows, acc.group(1))
        return (float(vals[acc.group(1)].iloc[0]), dataset) if not vals.empty else (None, "")
    return None, ""


def dataset_matches(label: str, name: str) -> bool:
    """Whether a dataset label (the name, with the image size appended when resized: ``digits16``)
    is dataset ``name``: ``cifar10`` matches ``cifar10`` and ``cifar1032``, not ``cifar100``."""
    label, name = label.lower(), name.lower()
    rest = label[len(name):]
    return label.startswith(name) and (not rest or (rest.isdigit() and not rest.startswith("0")))
