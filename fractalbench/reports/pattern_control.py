"""FractalBrainNet's fractal patterns against the uniform control: does the pattern matter?

Cells take part when their model options name ``fractal_pattern`` (a suite such as
``fractal_patterns`` names it for every entry). Cells of one run that differ only in that option
(same model, other options, dataset, device and seed) form a group; a group with a ``uniform``
cell (every mask pixel 0.5: the control, no spatial structure) and at least one other pattern gets
one row per cell. Each pattern's headline test top-1 (its last exit) is set against the control's:

- paired, when both cells kept per-sample outcomes (:mod:`fractalbench.harness.outcomes`) of the same test
  samples: the difference (pattern - control, points), its 95 % interval conditional on the
  discordant pairs (:func:`fractalbench.reports._compare_stats.paired_difference`, 2.5 % per side), the
  discordant counts b (right under the control only) and c (right under the pattern only), and
  McNemar's exact two-sided p = min(1, 2 min(P(X >= b), P(X >= c))), X ~ Binomial(b + c, 1/2);
- else unpaired: Newcombe's interval and the two-sided two-proportion z-test.

p Holm: Holm's adjustment over the patterns of one seed (the control excluded). These tests
compare two trained models on one test set; they say nothing about the spread between seeds of
the recipe, which can exceed a point, so a small p is not yet "the pattern matters". When the
control and a pattern ran with two seeds or more (a suite with ``seeds:``), one more row per
pattern ("over seeds") sets its mean top-1 against the control's mean with Welch's t-test over
seeds (:func:`fractalbench.reports._compare_stats.seed_group_test`, 95 % interval of the difference of means),
Holm over those patterns: that row is the answer about the recipe.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd

from fractalbench.harness.outcomes import OutcomesError, load_outcomes
from fractalbench.harness.results import CellRecord, RunData
from fractalbench.reports._compare_stats import AccuracyTest, holm, paired_test, seed_group_test, unpaired_test
from fractalbench.reports.frame import run_label

CONTROL = "uniform"
OPTION = "fractal_pattern"
SIDE = (1 - 0.95) / 2  # each one-sided limit at 97.5 %: together the two-sided 95 % interval
COLUMNS = ["run", "label", "pattern", "seed", "top1 %", "95 % interval", "MACs", "vs control (points)",
           "95 % interval of the difference", "b / c", "p (two-sided)", "p Holm", "test"]


def _groups(run: RunData) -> dict[tuple, dict[Any, list[tuple[str, CellRecord]]]]:
    """(model, other options, dataset, device) -> seed -> [(pattern, cell)]."""
    groups: dict[tuple, dict[Any, list[tuple[str, CellRecord]]]] = defaultdict(lambda: defaultdict(list))
    for cell in run.cells:
        meta = cell.meta or {}
        kwargs = meta.get("kwargs") or {}
        if cell.status != "ok" or OPTION not in kwargs:
            continue
        rest = json.dumps({k: v for k, v in kwargs.items() if k != OPTION}, sort_keys=True, default=str)
        key = (meta.get("model"), rest, meta.get("dataset"), meta.get("device"))
        groups[key][meta.get("seed")].append((str(kwargs[OPTION]).lower(), cell))
    return groups


def _headline(cell: CellRecord) -> dict[str, Any] | None:
    """The cell's test top-1 row at its last exit."""
    rows = [r for r in cell.rows if r.get("metric") == "top1" and r.get("split") in ("test", None, "")
            and r.get("value") is not None and not r.get("error")]
    if not rows:
        return None
    return max(rows, key=lambda r: -1.0 if r.get("exit") is None or np.isnan(float(r["exit"])) else float(r["exit"]))


def _macs(cell: CellRecord, exit_value: Any) -> float | None:
    found = [r["value"] for r in cell.rows if r.get("metric") == "macs" and r.get("exit") == exit_value]
    return float(found[0]) if found else None


def _correct(run: RunData, cell: CellRecord, row: dict[str, Any]) -> tuple[np.ndarray, str] | None:
    try:
        outcomes = load_outcomes(run.path, cell.cell_id)
    except OutcomesError:
        return None
    found = outcomes.for_row(row) if outcomes is not None else None
    return (found.correct, outcomes.digest) if found is not None else None


def _test(run: RunData, control: tuple[CellRecord, dict], other: tuple[CellRecord, dict]) -> tuple[AccuracyTest, str]:
    """The test of ``other`` (cell, headline row) against ``control``, and "b / c" when paired."""
    (ccell, crow), (pcell, prow) = control, other
    base, cand = _correct(run, ccell, crow), _correct(run, pcell, prow)
    if base is not None and cand is not None and base[1] == cand[1]:
        b, c = int(np.count_nonzero(base[0] & ~cand[0])), int(np.count_nonzero(~base[0] & cand[0]))
        return paired_test(base[0], cand[0], SIDE), f"{b} / {c}"
    return unpaired_test(float(crow["value"]), int(crow.get("n") or 0), float(prow["value"]),
                         int(prow.get("n") or 0), SIDE), ""


def _interval(row: dict[str, Any]) -> str:
    """The row's own stored 95 % Wilson interval (blank when it has none)."""
    low, high = row.get("ci_low"), row.get("ci_high")
    return "" if low is None or high is None else f"{float(low):.2f}-{float(high):.2f}"


def _seed_rows(run: RunData, multi: bool, members: list[tuple[str, CellRecord]]) -> list[dict[str, Any]]:
    """One seed's cells: each pattern against that seed's control, paired where possible."""
    headed = [(pattern, cell, row) for pattern, cell in members if (row := _headline(cell)) is not None]
    control = next(((cell, row) for pattern, cell, row in headed if pattern == CONTROL), None)
    others = [(pattern, cell, row) for pattern, cell, row in headed if pattern != CONTROL]
    if control is None or not others:
        return []
    tests = [_test(run, control, (cell, row)) for _, cell, row in others]
    two_sided = [min(1.0, 2 * min(t.p_worse, t.p_better)) for t, _ in tests]
    adjusted = holm(two_sided)
    out = []
    for (pattern, cell, row), (test, counts), p, p_adj in [((CONTROL, *control), (None, ""), None, None),
                                                           *zip(others, tests, two_sided, adjusted)]:
        entry = {"run": run.name, "label": run_label(row.get("model") or cell.cell_id, run, multi),
                 "pattern": pattern, "seed": row.get("seed"), "top1 %": round(float(row["value"]), 2),
                 "95 % interval": _interval(row), "MACs": _macs(cell, row.get("exit"))}
        if test is None:
            entry.update({"vs control (points)": "control", "test": "the control (every mask pixel 0.5)"})
        else:
            entry.update({"vs control (points)": round(test.diff, 2),
                          "95 % interval of the difference": f"{test.low:+.2f} to {test.high:+.2f}",
                          "b / c": counts, "p (two-sided)": p, "p Holm": p_adj,
                          "test": "McNemar exact, paired" if counts else "Newcombe + z, unpaired (no outcomes)"})
        out.append(entry)
    return out


def _over_seeds(run: RunData, multi: bool, by_seed: dict[Any, list[tuple[str, CellRecord]]]) -> list[dict[str, Any]]:
    """Patterns run with >= 2 seeds, like the control: the mean top-1 over seeds against the
    control's mean, Welch's t-test over seeds (the recipe's seed spread is in it)."""
    accuracies: dict[str, list[float]] = defaultdict(list)
    macs: dict[str, float | None] = {}
    labels: dict[str, str] = {}
    for members in by_seed.values():
        for pattern, cell in members:
            if (row := _headline(cell)) is not None:
                accuracies[pattern].append(float(row["value"]))
                macs[pattern] = _macs(cell, row.get("exit"))
                labels[pattern] = run_label(f"{row.get('model') or cell.cell_id} (over seeds)", run, multi)
    control = accuracies.get(CONTROL, [])
    others = [p for p, values in accuracies.items() if p != CONTROL and len(values) >= 2]
    if len(control) < 2 or not others:
        return []
    tests = [seed_group_test(control, accuracies[p], SIDE) for p in others]
    two_sided = [min(1.0, 2 * min(t.p_worse, t.p_better)) for t in tests]
    out = [{"run": run.name, "label": labels[CONTROL], "pattern": CONTROL, "seed": f"mean of {len(control)}",
            "top1 %": round(float(np.mean(control)), 2), "95 % interval": f"sd {np.std(control, ddof=1):.2f}",
            "MACs": macs[CONTROL], "vs control (points)": "control", "test": "the control, over seeds"}]
    for pattern, test, p, p_adj in zip(others, tests, two_sided, holm(two_sided)):
        values = accuracies[pattern]
        out.append({"run": run.name, "label": labels[pattern], "pattern": pattern, "seed": f"mean of {len(values)}",
                    "top1 %": round(float(np.mean(values)), 2), "95 % interval": f"sd {np.std(values, ddof=1):.2f}",
                    "MACs": macs[pattern], "vs control (points)": round(test.diff, 2),
                    "95 % interval of the difference": f"{test.low:+.2f} to {test.high:+.2f}",
                    "p (two-sided)": p, "p Holm": p_adj, "test": test.method})
    return out


def _group_rows(run: RunData, multi: bool, by_seed: dict[Any, list[tuple[str, CellRecord]]]) -> list[dict[str, Any]]:
    rows = [r for seed in sorted(by_seed, key=str) for r in _seed_rows(run, multi, by_seed[seed])]
    return rows + _over_seeds(run, multi, by_seed)


def control_table(runs: list[RunData]) -> pd.DataFrame:
    """One row per pattern cell of every group that has a uniform control, then the rows over
    seeds (see the module docstring); empty when no run has such a group."""
    multi = len(runs) > 1
    rows = [r for run in runs for by_seed in _groups(run).values() for r in _group_rows(run, multi, by_seed)]
    return pd.DataFrame(rows, columns=COLUMNS) if rows else pd.DataFrame()


CAPTION = ("Each fractal pattern against the uniform control (every mask pixel 0.5), same model, recipe and "
           "seed; test top-1 at the last exit. Paired on the same test images when both cells kept per-sample "
           "outcomes: b = right under the control only, c = right under the pattern only, McNemar's exact "
           "two-sided p; p Holm: adjusted over the patterns of that seed. These test two trained models, not "
           "the recipe: a small p is not yet evidence that the pattern matters (seeds of a CIFAR-10 recipe "
           "differ by about a point). Rows 'over seeds' (when the patterns ran with several seeds): mean "
           "top-1 and its sd over seeds against the control's mean, Welch's t-test over seeds, Holm over "
           "the patterns; they answer for the recipe.")
