"""The report section "Exits: oracle, overthinking, calibration" (rows of
:mod:`fractalbench.harness.metrics.exit_stats`).

Definitions (all on the test split, from the forced exits' logits):

- Oracle: each sample leaves at its earliest exit whose top-1 prediction is right (Kaya et al.
  2019); oracle top-1 = % of samples right at any exit, oracle MACs = the mean forced-path MACs
  (batch 1) of those exits, a sample right nowhere running to the last exit. The oracle bounds
  what any exit policy over these exits can reach.
- Overthinking: % of samples right at an exit before the last but wrong at the last (destructive;
  oracle top-1 = last exit's top-1 + overthinking); wasteful: right before the last and at the last.
- ECE per exit: 15 equal-width bins of the largest softmax probability; the sum over bins of the
  bin's share of samples x |accuracy - mean confidence|, in %.

:func:`overview_table` gives one row per model, :func:`per_exit_stats` one row per exit of one
model, :func:`reliability_table` one row per model, exit and confidence bin (for the diagrams of
:mod:`fractalbench.reports.plots_calibration`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd

from fractalbench.harness.results import detail_of, slug
from fractalbench.reports.blocks import Body, Details, Heading, Note
from fractalbench.reports.frame import GROUP, batch_one, drop_empty
from fractalbench.reports.plots_calibration import plot_reliability
from fractalbench.reports.sections import ReportContext, rows_hint

EXIT_STATS_METRICS = ("oracle_top1", "oracle_macs", "overthinking", "overthinking_wasteful", "ece")

NOTE = ("Test split, forced exits. Oracle: each sample leaves at its earliest exit whose top-1 prediction is right "
        "(Kaya et al. 2019, Shallow-Deep Networks); oracle top1 % = samples right at any exit, an upper bound for "
        "every exit policy over these exits; oracle MACs = mean forced-path MACs per image (batch 1) of those exits, "
        "a sample right nowhere running to the last exit. Overthinking % (destructive): right at an earlier exit, "
        "wrong at the last (oracle top1 = last exit top1 + overthinking); wasteful %: right at an earlier exit and "
        "at the last, so the later compute was not needed. ECE %: expected calibration error of each exit over 15 "
        "equal-width bins of the largest softmax probability. 95% CI: Wilson interval.")


def _stat_rows(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    sub = frame[frame["metric"].isin(EXIT_STATS_METRICS) & (frame["error"] == "") & frame["value"].notna()]
    return sub[sub["split"].isin(["test", ""])]


def _models(frame: pd.DataFrame) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """(model key, every row of that model) for each model with exit-statistics rows, in row order."""
    stats = _stat_rows(frame)
    for key in dict.fromkeys(stats[GROUP].itertuples(index=False, name=None)):
        mask = (frame[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)
        yield dict(zip(GROUP, key)), frame[mask]


def _row(sub: pd.DataFrame, metric: str, exit_index: int | None = None) -> pd.Series | None:
    """The first forced-path (no policy) test row of ``metric`` at ``exit_index`` (None: no exit)."""
    rows = sub[(sub["metric"] == metric) & (sub["policy"] == "") & sub["split"].isin(["test", ""])
               & (sub["error"] == "") & sub["value"].notna()]
    rows = rows[rows["exit"].isna()] if exit_index is None else rows[rows["exit"] == exit_index]
    return None if rows.empty else rows.iloc[0]


def _value(row: pd.Series | None) -> float | None:
    return None if row is None else float(row["value"])


def _interval(row: pd.Series | None) -> str:
    """The row's 95 % interval as text ("71.2-78.9"), '' when it has none."""
    if row is None or pd.isna(row["ci_low"]) or pd.isna(row["ci_high"]):
        return ""
    return f"{row['ci_low']:.1f}-{row['ci_high']:.1f}"


def _exits(sub: pd.DataFrame) -> list[int]:
    rows = sub[sub["metric"].isin(["ece", "top1"]) & sub["exit"].notna() & (sub["policy"] == "")]
    return sorted({int(e) for e in rows["exit"]})


def _exit_macs(sub: pd.DataFrame, exits: list[int]) -> dict[int, float]:
    """MACs of the forced path to each exit: the cost table the oracle used, else the ``macs`` rows."""
    orc = _row(sub, "oracle_macs")
    table = detail_of(orc["detail"]).get("exit_macs") if orc is not None else None
    if table:
        return {k: float(m) for k, m in enumerate(table)}
    macs = batch_one(sub[(sub["metric"] == "macs") & (sub["policy"] == "") & sub["value"].notna()])
    return {k: float(macs[macs["exit"] == k]["value"].iloc[0]) for k in exits if (macs["exit"] == k).any()}


def _overview_record(key: dict[str, Any], sub: pd.DataFrame) -> dict[str, Any]:
    exits = _exits(sub)
    last = exits[-1] if exits else 0
    orc, over, top1 = _row(sub, "oracle_top1"), _row(sub, "overthinking"), _row(sub, "top1", last)
    eces = [_value(_row(sub, "ece", k)) for k in exits]
    return {**key, "exits": len(exits), "oracle top1 %": _value(orc), "oracle 95% CI": _interval(orc),
            "oracle MACs": _value(_row(sub, "oracle_macs")), "last exit top1 %": _value(top1),
            "last exit 95% CI": _interval(top1), "last exit MACs": _exit_macs(sub, exits).get(last),
            "overthinking %": _value(over), "overthinking 95% CI": _interval(over),
            "wasteful %": _value(_row(sub, "overthinking_wasteful")),
            "ECE % per exit": ", ".join("" if v is None else f"{v:.1f}" for v in eces)}


def overview_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model with exit statistics: oracle top-1 (%, 95 % CI) and MACs beside the last
    exit's top-1 and MACs, overthinking (destructive, %, CI) and wasteful (%), and the ECE of every
    exit (%, in exit order). Columns empty for every model (oracle of single-exit models) are left out."""
    records = [_overview_record(key, sub) for key, sub in _models(frame)]
    if not records:
        return pd.DataFrame()
    return drop_empty(pd.DataFrame(records))


def per_exit_stats(sub: pd.DataFrame) -> pd.DataFrame:
    """One model's rows (``sub``) per exit: top-1 (%, CI), forced-path MACs, ECE (%) and the share
    of samples whose oracle (earliest right) exit it is."""
    exits = _exits(sub)
    macs, orc = _exit_macs(sub, exits), _row(sub, "oracle_top1")
    counts = detail_of(orc["detail"]).get("oracle_exit_counts") if orc is not None else None
    records = []
    for k in exits:
        top1 = _row(sub, "top1", k)
        share = counts[k] / float(orc["n"]) if counts and k < len(counts) and orc["n"] else None
        records.append({"exit": k, "top1 %": _value(top1), "top1 95% CI": _interval(top1), "MACs": macs.get(k),
                        "ECE %": _value(_row(sub, "ece", k)), "oracle exit share": share})
    return drop_empty(pd.DataFrame(records), ["exit"]) if records else pd.DataFrame()


def reliability_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model, exit and confidence bin of the ``ece`` rows: edges, count, mean
    confidence and accuracy (fractions; empty for an empty bin), and the exit's ECE (%)."""
    ece = _stat_rows(frame)
    ece = ece[(ece["metric"] == "ece") & ece["exit"].notna()]
    records = []
    for row in ece.to_dict("records"):
        for b in detail_of(row["detail"]).get("reliability") or []:
            records.append({**{g: row[g] for g in GROUP}, "exit": int(row["exit"]), "ece %": row["value"],
                            "lower": b["lower"], "upper": b["upper"], "count": b["count"],
                            "confidence": b["confidence"], "accuracy": b["accuracy"]})
    columns = [*GROUP, "exit", "ece %", "lower", "upper", "count", "confidence", "accuracy"]
    out = pd.DataFrame(records, columns=columns)
    for col in ("confidence", "accuracy"):
        out[col] = pd.to_numeric(out[col], errors="coerce")
    return out


def _model_blocks(ctx: ReportContext, key: dict[str, Any], sub: pd.DataFrame, bins: pd.DataFrame) -> list:
    where = f"{key['label']} ({key['dataset']}, {key['device']})"
    name = slug("__".join(str(key[g]) for g in ("label", "dataset", "device")))
    name = f"{name}__{slug(key['run'])}" if ctx.multi else name
    mine = bins[(bins[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)] if not bins.empty else bins
    return [Heading(where), *ctx.table(per_exit_stats(sub), f"exit_stats__{name}"),
            *ctx.figures(plot_reliability(mine, ctx.folder, with_run=ctx.multi))]


def section_exit_stats(ctx: ReportContext) -> Body | None:
    """Oracle, overthinking and calibration: the overview table, then per model its exits and
    reliability diagrams; None when the runs hold no exit-statistics rows."""
    overview = overview_table(ctx.frame)
    if overview.empty:
        return None
    bins = reliability_table(ctx.frame)
    blocks: list = [Note(NOTE), *ctx.table(overview, "exit_stats")]
    for key, sub in _models(ctx.frame):
        blocks.extend(_model_blocks(ctx, key, sub, bins))
    if not bins.empty:
        blocks.append(Details(f"reliability bins ({len(bins)} rows)", ctx.table(bins, "reliability")))
    return Body(blocks, rows_hint(overview, "models"))
