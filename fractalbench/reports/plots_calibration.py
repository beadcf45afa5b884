"""Reliability diagrams of every exit (matplotlib Figure directly, Agg; written by
:func:`fractalbench.reports.plots.save`).

:func:`plot_reliability` takes the table of :func:`fractalbench.reports.sections_exits.reliability_table` (one
row per model, exit and confidence bin, from the ``ece`` rows' ``detail.reliability``) and draws
one figure per model with one small panel per exit: the accuracy of each confidence bin as a bar
over the bin, the diagonal (accuracy = confidence: perfect calibration) dashed, each bin's mean
confidence as a red tick, the share of the exit's samples in each bin as narrow faint grey bars,
and the exit's ECE in the panel title. Empty bins draw nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fractalbench.harness.results import slug
from fractalbench.reports.plots import MAX_PANELS, Plot, new_figure, save

KEY = ["run", "label", "dataset", "device"]
PANEL_COLUMNS = 4


def _panel(ax: Any, bins: pd.DataFrame, ece: float, exit_index: int) -> None:
    """One exit's reliability diagram on ``ax`` (``bins``: its rows, one per confidence bin)."""
    bins = bins.sort_values("lower")
    full = bins[bins["count"] > 0]
    width = (full["upper"] - full["lower"]).to_numpy(float)
    centre = full["lower"].to_numpy(float) + width / 2
    ax.bar(centre, full["accuracy"], width=width, color="#4c72b0", alpha=0.75, edgecolor="#2a4a80", lw=0.5,
           label="accuracy")
    ax.plot(centre, full["confidence"], "_", color="#c44e52", ms=7, mew=1.6, label="mean confidence")
    share = full["count"].to_numpy(float) / (float(bins["count"].sum()) or 1.0)
    ax.bar(centre, share, width=0.45 * width, color="grey", alpha=0.45, zorder=3, label="share of samples")
    ax.plot([0, 1], [0, 1], color="black", ls="--", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"exit {exit_index}: ECE {ece:.1f} %", fontsize=9)
    ax.set_xlabel("confidence (max softmax)", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(labelsize=7)


def _figure(model: pd.DataFrame) -> Any:
    exits = sorted(int(e) for e in model["exit"].unique())
    if len(exits) > MAX_PANELS:  # evenly spread, the last exit always drawn
        exits = [exits[i] for i in np.unique(np.linspace(0, len(exits) - 1, MAX_PANELS).round().astype(int))]
    cols = min(PANEL_COLUMNS, len(exits))
    rows = int(np.ceil(len(exits) / cols))
    width, height = 2.9 * cols, 2.7 * rows
    # a fixed grid (margins in inches): these panels are alike, so constrained layout's measuring of every
    # tick label (most of the figure's time) would find the same margins
    fig, axes = new_figure(width, height, ncols=cols, nrows=rows, layout=None)
    fig.subplots_adjust(left=0.55 / width, right=1 - 0.2 / width, bottom=0.45 / height, top=1 - 0.3 / height,
                        wspace=0.55 * cols / width * 1.45, hspace=0.75 * rows / height * 1.6)
    flat = [a for r in axes for a in r]
    for ax, k in zip(flat, exits):
        part = model[model["exit"] == k]
        _panel(ax, part, float(part["ece %"].iloc[0]), k)
    for ax in flat[len(exits):]:
        ax.set_visible(False)
    flat[0].legend(fontsize=6, loc="upper left")
    return fig


def plot_reliability(table: pd.DataFrame, folder: Path, with_run: bool = False) -> list[Plot]:
    """One reliability figure per model (``table``: :func:`fractalbench.reports.sections_exits.reliability_table`),
    named ``reliability__<label>__<dataset>__<device>`` (``with_run``: then ``__<run>``)."""
    if table.empty:
        return []
    plots = []
    for key, model in table.groupby(KEY, sort=False, dropna=False):
        run, label, dataset, device = key
        name = f"reliability__{slug('__'.join(str(k) for k in (label, dataset, device)))}"
        if with_run or table["run"].nunique() > 1:
            name = f"{name}__{slug(run)}"
        n = int(model[model["exit"] == model["exit"].max()]["count"].sum())
        caption = ("One panel per exit, test split: blue bars, the accuracy of the samples whose confidence (largest "
                   "softmax probability) falls in each of the equal-width bins; red ticks, their mean confidence; "
                   "dashed, perfect calibration (accuracy = confidence); narrow grey bars, the share of the exit's "
                   f"{n} samples in each bin. Bars below the diagonal: over-confident. ECE = sum over bins of "
                   "share x |accuracy - mean confidence|, in %.")
        title = f"Reliability per exit: {label} ({dataset}, {device})"
        plots.append(save(_figure(model), folder, name, title, caption))
    return plots
