"""The papers' headline claims beside what a run measured.

A model card may carry a paper's claim as a reference key of :data:`CLAIMS` (SDN: more than 50 %
lower average cost at preserved accuracy; BranchyNet: 1.9x faster on the CPU at the cost of 1.5
points; SkipNet: 30-90 % less computation at preserved accuracy). The measured side is the run's
cost at preserved accuracy (:func:`fractalbench.reports.points.preserved_accuracy`): the cheapest point chosen
without test (fitted on validation, or learned) whose test top-1 is within the claim's accuracy
loss of the full network, and the MACs it avoids or its batch-1 speed-up. ``holds`` says whether
the measured number reaches the published one ("no: no point within the allowed loss" when every
fitted point loses more; empty when the model has no cost rows).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from fractalbench.harness.results import RunData
from fractalbench.reports.frame import run_label
from fractalbench.reports.points import preserved_accuracy


@dataclass(frozen=True)
class Claim:
    """A paper's claim: its words (``{v}`` is the published number), the preserved-accuracy column
    that measures it, and the accuracy points it may lose."""

    words: str
    measured_by: str
    points: float


CLAIMS: dict[str, Claim] = {
    "early_exit_cost_reduction_pct_min": Claim(
        "SDN: confidence-based early exits reduce the average inference cost by more than {v:g} % and preserve the "
        "accuracy (abstract)", "MACs avoided %", 1.0),
    "hrl_flops_reduction_pct_min": Claim(
        "SkipNet: reduces computation by {v:g}-90 % while preserving the accuracy of the original model (abstract)",
        "MACs avoided %", 1.0),
    "cpu_speedup": Claim(
        "BranchyNet: B-ResNet-110 runs {v:g}x faster per sample on the CPU at the knee thresholds, 1.53 points "
        "below its ResNet-110 (Table I)", "speed-up (b=1)", 1.5),
}
CLAIM_COLUMNS = ["run", "label", "dataset", "device", "claim", "published", "allowed loss (points)", "measured as",
                 "measured", "holds", "point", "full top1 %", "its top1 %"]


def claims_table(runs: Sequence[RunData], frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, claim on its card): the claim, the published number and the measured one."""
    multi = len(runs) > 1
    preserved: dict[float, pd.DataFrame] = {}
    records = []
    for run in runs:
        for cell in run.cells:
            meta = cell.meta or {}
            reference = ((meta.get("card") or {}).get("reference")) or {}
            model = next((r.get("model") for r in cell.rows if r.get("model")), meta.get("model", "?"))
            label = run_label(model, run, multi)
            for key, claim in CLAIMS.items():
                if key not in reference:
                    continue
                if claim.points not in preserved:
                    preserved[claim.points] = preserved_accuracy(frame, claim.points)
                table = preserved[claim.points]
                match = table[(table["run"] == run.name) & (table["label"] == label)]
                row = match.iloc[0] if not match.empty else None
                measured = row[claim.measured_by] if row is not None else None
                measured = None if measured is None or pd.isna(measured) else float(measured)
                published = float(reference[key])
                records.append({
                    "run": run.name, "label": label, "dataset": meta.get("dataset", ""),
                    "device": meta.get("device", ""),
                    "claim": claim.words.format(v=published), "published": published,
                    "allowed loss (points)": claim.points, "measured as": claim.measured_by, "measured": measured,
                    "holds": ("" if row is None else "no: no point within the allowed loss") if measured is None
                    else "yes" if measured >= published else "no",
                    "point": "" if row is None or pd.isna(row["point"]) else row["point"],
                    "full top1 %": None if row is None else row["full top1 %"],
                    "its top1 %": None if row is None or pd.isna(row["its top1 %"]) else row["its top1 %"]})
    return pd.DataFrame(records, columns=CLAIM_COLUMNS)
