"""Plots from stored results (matplotlib with the Agg backend, seaborn styling).

Each ``plot_*`` function takes the frame of :func:`fractalbench.reports.tables.combined_rows` (or a table made
from it), writes every figure it makes as PNG and SVG into ``folder`` and returns a list of
:class:`Plot` (empty when the metrics it needs are absent). Figures are made with
``matplotlib.figure.Figure`` directly (no pyplot state), so plotting is safe in any process.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from fractalbench.harness.results import slug  # noqa: E402
from fractalbench.reports import tables  # noqa: E402

PNG_DPI = 110
MAX_PANELS = 12
MAX_POLICIES_PER_MODEL = 5


@dataclass(frozen=True)
class Plot:
    """One figure as written: PNG and SVG files and the PNG bytes (for embedding)."""

    name: str
    title: str
    caption: str
    png: Path
    svg: Path
    png_bytes: bytes


def mpl_text(text: Any) -> str:
    """Text for matplotlib: '$' escaped so labels never turn into mathtext."""
    return str(text).replace("$", r"\$")


def _style() -> dict[str, Any]:
    import seaborn as sns

    return {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85)}


def _palette(labels: Sequence[str]) -> dict[str, Any]:
    import seaborn as sns

    colors = sns.color_palette("tab10" if len(labels) <= 10 else "husl", max(1, len(labels)))
    return {label: colors[i] for i, label in enumerate(labels)}


def new_figure(width: float = 7.5, height: float = 4.8, ncols: int = 1, nrows: int = 1,
               layout: str | None = "constrained") -> tuple[Figure, Any]:
    with matplotlib.rc_context(_style()):
        fig = Figure(figsize=(width, height), layout=layout)
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save(fig: Figure, folder: Path, name: str, title: str, caption: str = "") -> Plot:
    """Write ``fig`` as ``name``.png and ``name``.svg into ``folder``."""
    import io

    folder.mkdir(parents=True, exist_ok=True)
    png, svg = folder / f"{name}.png", folder / f"{name}.svg"
    buf = io.BytesIO()
    with matplotlib.rc_context(_style()):
        fig.savefig(buf, format="png", dpi=PNG_DPI)
        # the layout the PNG drew is kept for the SVG: constrained layout would measure every text again
        # (a third of a report's time went to laying out each figure twice)
        fig.set_layout_engine("none")
        fig.savefig(svg, format="svg")
    data = buf.getvalue()
    png.write_bytes(data)
    return Plot(name, title, caption, png, svg, data)


def _wants_log(values: Iterable[float]) -> bool:
    vals = [v for v in values if v and v > 0]
    return bool(vals) and max(vals) / min(vals) > 20


def _xscale(ax: Any, values: Iterable[float]) -> None:
    if _wants_log(values):
        ax.set_xscale("log")


# ----- accuracy vs cost --------------------------------------------------------------------------

COST_UNITS = {"macs": "MACs per image", "latency": "latency ms per call (batch 1, mean)"}
GRID_TITLE = "test grid (not for model selection)"


@dataclass(frozen=True)
class CostFigure:
    """One accuracy-vs-cost figure before it is written: file name, title, caption, the figure and
    the points drawn on it (rows of :func:`fractalbench.reports.points.operating_points` or
    :func:`fractalbench.reports.points.grid_points`)."""

    name: str
    title: str
    caption: str
    figure: Figure
    points: pd.DataFrame


def plot_tradeoffs(frame: pd.DataFrame, folder: Path, costs: Sequence[str] = ("macs", "latency")) -> list[Plot]:
    """The headline figures of :func:`tradeoff_figures`, written into ``folder``."""
    return [save(f.figure, folder, f.name, f.title, f.caption) for f in tradeoff_figures(frame, costs)]


def plot_test_grid(frame: pd.DataFrame, folder: Path) -> list[Plot]:
    """The test-grid figures of :func:`grid_figures`, written into ``folder``."""
    return [save(f.figure, folder, f.name, f.title, f.caption) for f in grid_figures(frame)]


def tradeoff_figures(frame: pd.DataFrame, costs: Sequence[str] = ("macs", "latency")) -> list[CostFigure]:
    """Top-1 vs MACs per dataset and top-1 vs latency (batch 1) per dataset and device (``costs``
    says which), over the headline points only (:func:`fractalbench.reports.points.operating_points`: no
    test-grid point): every model on one plot with its points' 95 % intervals as thin vertical
    bars, the Pareto frontier as a dashed black line through black-ringed points, points
    indistinguishable from it ringed in grey."""
    out = []
    for cost in costs:
        what = "expected_macs" if cost == "macs" else "its policy stream"
        caption = (f"x: {COST_UNITS[cost]} ({what} for a policy point); y: top-1 % on test, bars: its 95 % "
                   "Wilson interval. In: the points not chosen on test: thresholds fitted on validation (budget "
                   "fits) and learned decisions (squares), trained attribute values and forced exits (lines "
                   "per model), static models (diamonds, last exit). Out: threshold grid points scored on test "
                   "(their own 'test grid' figure). Dashed black: the Pareto frontier of these points (ringed "
                   "black); ringed grey: off the frontier, but its interval reaches the frontier at its cost "
                   "(indistinguishable from it on this test set).")
        points = tables.operating_points(frame, cost)
        if points["seed_std"].notna().any():
            caption += (" Models run with several seeds: their mean over seeds, with capped bars of +- one "
                        "standard deviation across seeds beside the (mean per-seed) interval.")
        out += _cost_figures(points, cost, "", caption)
    return out


def grid_figures(frame: pd.DataFrame) -> list[CostFigure]:
    """Top-1 vs MACs per dataset over the test-grid points only (:func:`fractalbench.reports.points.grid_points`):
    each model's threshold grid as a curve with 95 % interval bars, no frontier."""
    caption = ("x: MACs per image (expected_macs); y: top-1 % on test, bars: its 95 % Wilson interval. Only "
               "threshold grid points scored on test, one curve per model and policy: a view of the trade-off. "
               "Picking a threshold by these test scores would be choosing on test (an oracle), so none of them "
               "is in the summary, the headline plots or the Pareto frontier.")
    return _cost_figures(tables.grid_points(frame, "macs"), "macs", GRID_TITLE, caption)


def _cost_figures(points: pd.DataFrame, cost: str, subtitle: str, caption: str) -> list[CostFigure]:
    """One figure per dataset (and device for latency) of ``points``."""
    if points.empty:
        return []
    unit, out = COST_UNITS[cost], []
    groups = ["dataset"] if cost == "macs" else ["dataset", "device"]
    for key, sub in points.groupby(groups, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        where = " / ".join(str(k) for k in key)
        stem = f"accuracy_vs_{cost}{'_test_grid' if subtitle else ''}"
        name = f"{stem}__{slug('__'.join(str(k) for k in key))}"
        title = f"Top-1 accuracy vs {'MACs' if cost == 'macs' else 'latency'}: {where}"
        title += f": {subtitle}" if subtitle else ""
        text = caption
        hidden = sub[sub["cost"] <= 0] if _wants_log(sub["cost"]) else sub.iloc[:0]
        if not hidden.empty:  # a log axis cannot show them; they stay in the tables
            text += f" Not drawn at cost 0 on the log axis: {', '.join(dict.fromkeys(hidden['label'].astype(str)))}."
        shown = sub.drop(hidden.index)
        out.append(CostFigure(name, title, text, _tradeoff_figure(shown, unit), shown))
    return out


LINESTYLES = ("-", "--", ":", "-.")
LEGEND_ROWS = 18  # legend entries in one column before it takes two


def _marked(points: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of ``points`` whose boolean ``column`` is set (none when there is no such column)."""
    return points[points[column].astype(bool)] if column in points else points.iloc[:0]


def _tradeoff_figure(points: pd.DataFrame, unit: str) -> Figure:
    fig, axes = new_figure(10.0, 5.0)
    ax = axes[0][0]
    labels = list(dict.fromkeys(points["label"]))
    colors = _palette(labels)
    swept = points[(points["source"] == "policy") & points["threshold"].notna()]
    styles = {p: LINESTYLES[i % len(LINESTYLES)] for i, p in enumerate(dict.fromkeys(swept["policy"]))}
    for label in labels:
        _model_points(ax, points[points["label"] == label].sort_values("cost"), colors[label], styles)
    front = _marked(points, "pareto").sort_values(["cost", "accuracy"])
    if not front.empty:
        ax.step(front["cost"], front["accuracy"], where="post", color="black", ls="--", lw=1.2, label="Pareto frontier")
        ax.plot(front["cost"], front["accuracy"], "o", mfc="none", mec="black", ms=11, mew=1.4)
    near = _marked(points, "near_frontier")
    if not near.empty:
        ax.plot(near["cost"], near["accuracy"], "o", mfc="none", mec="grey", ms=11, mew=1.2,
                label="interval reaches the frontier")
    _xscale(ax, points["cost"])
    if "MACs" in unit:
        ax.xaxis.set_major_formatter(EngFormatter(sep=" "))
    ax.set_xlabel(unit)
    ax.set_ylabel("top-1 %")
    handles = [_model_handle(points[points["label"] == label], colors[label], label) for label in labels]
    handles += ax.get_legend_handles_labels()[0]  # the frontier and the near-frontier rings
    if points["ci_high"].notna().any():
        handles.append(Line2D([], [], color="grey", marker="|", ms=10, ls="none", label="top-1 95 % interval"))
    if len(styles) > 1:  # which line style is which policy's sweep
        handles += [Line2D([], [], color="grey", ls=ls, label=mpl_text(f"sweep: {p}")) for p, ls in styles.items()]
    if ((points["source"] == "policy") & points["threshold"].isna()).any():
        handles.append(Line2D([], [], color="grey", marker="s", ls="none", label="fitted on validation / learned"))
    # a long legend (the reference run: 25 models and the markers) takes two columns and a taller figure,
    # so that no entry is cut off below the axes
    ncol = 1 if len(handles) <= LEGEND_ROWS else 2
    rows = math.ceil(len(handles) / ncol)
    fig.set_size_inches(10.0 + 2.6 * (ncol - 1), max(5.0, 0.21 * rows + 0.9))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              ncol=ncol)
    return fig


def _model_handle(sub: pd.DataFrame, color: Any, label: str) -> Line2D:
    """The legend entry of one model: its colour, a diamond for a static model, a line otherwise."""
    if (sub["source"] == "static").all():
        return Line2D([], [], color=color, marker="D", ls="none", ms=7, label=mpl_text(label))
    return Line2D([], [], color=color, marker="o", ls="-", ms=4, lw=1.5, label=mpl_text(label))


def _error_bars(ax: Any, sub: pd.DataFrame, color: Any) -> None:
    """Thin vertical bars from ``ci_low`` to ``ci_high`` at each point's cost (points with both)."""
    part = sub[sub["ci_low"].notna() & sub["ci_high"].notna()]
    if part.empty:
        return
    acc = part["accuracy"].to_numpy(float)
    yerr = np.vstack([acc - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - acc])
    ax.errorbar(part["cost"].to_numpy(float), acc, yerr=np.clip(yerr, 0.0, None), fmt="none", ecolor=color,
                elinewidth=0.8, capsize=0, alpha=0.8)
    seeds = sub[sub["seed_std"].notna()] if "seed_std" in sub else sub.iloc[:0]
    if not seeds.empty:  # mean over seeds +- their standard deviation: capped bars beside the interval
        ax.errorbar(seeds["cost"].to_numpy(float), seeds["accuracy"].to_numpy(float),
                    yerr=seeds["seed_std"].to_numpy(float), fmt="none", ecolor=color, elinewidth=1.6, capsize=3)


def _model_points(ax: Any, sub: pd.DataFrame, color: Any, styles: dict[str, str]) -> None:
    """One model's points with their interval bars: a line per threshold sweep (or over forced
    exits), squares for settings without a threshold (fitted to a budget on validation, or
    learned), diamonds for static models."""
    _error_bars(ax, sub, color)
    curves = sub[(sub["source"] == "exit") | ((sub["source"] == "policy") & sub["threshold"].notna())]
    drawn = []
    for policy, curve in curves.groupby("policy", sort=False):
        if len(curve) > 1:
            ax.plot(curve["cost"], curve["accuracy"], marker="o", ls=styles.get(policy, "-"), color=color, ms=4,
                    lw=1.5)
            drawn.extend(curve.index)
    rest = sub.drop(drawn)
    for marker, part in (("D", rest[rest["source"] == "static"]),
                         ("s", rest[(rest["source"] == "policy") & rest["threshold"].isna()]),
                         ("o", rest[(rest["source"] == "exit") | ((rest["source"] == "policy")
                                                                   & rest["threshold"].notna())])):
        if not part.empty:
            ax.plot(part["cost"], part["accuracy"], marker, color=color, ms=7 if marker != "o" else 5, ls="none")
            drawn.extend(part.index)


# ----- measured vs predicted latency ---------------------------------------------------------------

def plot_latency_prediction(table: pd.DataFrame, folder: Path) -> list[Plot]:
    """Measured policy latency (batch 1, mean ms per call) against its prediction, one point per
    operating point, one colour per model, with the y = x line (``table``:
    :func:`fractalbench.reports.points.latency_vs_predicted`; rows missing either side are left out)."""
    if table.empty:
        return []
    both = table.dropna(subset=["measured mean ms", "predicted ms"])
    plots = []
    for device, sub in both.groupby("device", sort=True):
        fig, axes = new_figure(8.5, 5.0)
        ax = axes[0][0]
        labels = list(dict.fromkeys(sub["label"]))
        colors = _palette(labels)
        for label in labels:
            part = sub[sub["label"] == label]
            ax.plot(part["predicted ms"], part["measured mean ms"], "o", color=colors[label], ms=6, ls="none",
                    label=mpl_text(label))
        values = np.concatenate([sub["predicted ms"].to_numpy(float), sub["measured mean ms"].to_numpy(float)])
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        pad = 0.05 * (hi - lo or hi or 1.0)
        line = [max(0.0, lo - pad), hi + pad]
        ax.plot(line, line, color="black", ls="--", lw=1.0, label="measured = predicted")
        ax.set_xlim(line)
        ax.set_ylim(line)
        ax.set_xlabel("predicted ms per call (exit fractions x forced per-exit latency)")
        ax.set_ylabel("measured ms per call (policy stream, batch 1)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        plots.append(save(fig, folder, f"latency_vs_predicted__{slug(device)}",
                          f"Measured vs predicted policy latency: {device}",
                          "One point per operating point (policy and threshold) of a dynamic model: x, the "
                          "prediction sum_k p_k t_k from its exit fractions p_k and the forced batch-1 latency t_k "
                          "of each exit; y, the mean per call of a real stream of test samples at batch 1. "
                          "Above the dashed line the policy costs more than its exits predict (decision overhead)."))
    return plots


# ----- per exit ----------------------------------------------------------------------------------

def plot_per_exit(table: pd.DataFrame, folder: Path) -> list[Plot]:
    """Top-1 (%) and batch-1 latency (ms, mean of the forced path) against the exit index, for
    models with more than one exit (``table``: :func:`fractalbench.reports.tables.per_exit_table`)."""
    if table.empty or "top1 %" not in table and "latency mean ms (b=1)" not in table:
        return []
    multi = table.groupby(["label", "dataset", "device"])["exit"].transform("nunique") > 1
    table = table[multi]
    if table.empty:
        return []
    panels = [c for c in ("top1 %", "latency mean ms (b=1)") if c in table and table[c].notna().any()]
    fig, axes = new_figure(5.0 * len(panels), 4.0, ncols=len(panels))
    labels = list(dict.fromkeys(table["label"] + " · " + table["device"]))
    colors = _palette(labels)
    for ax, col in zip(axes[0], panels):
        for (label, device), sub in table.groupby(["label", "device"], sort=False):
            sub = sub.dropna(subset=[col]).sort_values("exit")
            key = f"{label} · {device}"
            ax.plot(sub["exit"], sub[col], "-o", color=colors[key], label=mpl_text(key))
        ax.set_xlabel("exit")
        ax.set_ylabel(col)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].legend(fontsize=8)
    return [save(fig, folder, "per_exit", "Accuracy and latency per exit",
                 "Forced path to each exit: top-1 % on test and mean latency per call at batch 1 (ms).")]


# ----- histograms --------------------------------------------------------------------------------

def _pick_policies(sub: pd.DataFrame) -> list[tuple[str, Any]]:
    keys = list(dict.fromkeys(zip(sub["policy"], sub["threshold"])))
    special = [k for k in keys if pd.isna(k[1])]
    swept = [k for k in keys if not pd.isna(k[1])]
    room = max(0, MAX_POLICIES_PER_MODEL - len(special))
    if len(swept) > room and room:
        idx = np.unique(np.linspace(0, len(swept) - 1, room).round().astype(int))
        swept = [swept[i] for i in idx]
    return (special + swept[:room])[:MAX_POLICIES_PER_MODEL]


def _policy_name(policy: str, threshold: Any) -> str:
    return policy if pd.isna(threshold) else f"{policy}={float(threshold):g}"


def _panels(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return cols, int(np.ceil(n / cols))


def plot_exit_histograms(table: pd.DataFrame, folder: Path) -> list[Plot]:
    """Share of test samples leaving at each exit, per model, for up to five policy settings
    (``table``: :func:`fractalbench.reports.tables.exit_histograms`)."""
    if table.empty:
        return []
    models = list(dict.fromkeys(zip(table["label"], table["dataset"], table["device"])))[:MAX_PANELS]
    cols, rows = _panels(len(models))
    fig, axes = new_figure(4.6 * cols, 3.4 * rows, ncols=cols, nrows=rows)
    flat = [a for r in axes for a in r]
    for ax, (label, dataset, device) in zip(flat, models):
        sub = table[(table["label"] == label) & (table["dataset"] == dataset) & (table["device"] == device)]
        chosen = _pick_policies(sub)
        width = 0.8 / max(1, len(chosen))
        for i, (policy, threshold) in enumerate(chosen):
            same = (sub["threshold"] == threshold) | (sub["threshold"].isna() & pd.isna(threshold))
            mask = (sub["policy"] == policy) & same
            part = sub[mask].sort_values("exit")
            ax.bar(part["exit"] + (i - (len(chosen) - 1) / 2) * width, part["fraction"], width=width,
                   label=mpl_text(_policy_name(policy, threshold)))
        ax.set_title(mpl_text(f"{label} ({dataset}, {device})"), fontsize=9)
        ax.set_xlabel("exit")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    for ax in flat[len(models):]:
        ax.set_visible(False)
    return [save(fig, folder, "exit_histograms", "Exit histograms",
                 "Fraction of test samples leaving at each exit under a policy (up to five settings per model).")]


MAX_GATES_PLOTTED = 64
"""Models with more gates than this (channel gating: one per channel) are left out of the skip-rate bars."""


def plot_skip_rates(table: pd.DataFrame, folder: Path) -> list[Plot]:
    """Share of samples skipping each gated block (``table``: :func:`fractalbench.reports.tables.skip_rates`)."""
    if table.empty:
        return []
    sizes = table.groupby(["label", "dataset", "device", "policy"], sort=False)["block"].nunique()
    wide = sorted({label for (label, *_), n in sizes.items() if n > MAX_GATES_PLOTTED})
    models = [m for m in dict.fromkeys(zip(table["label"], table["dataset"], table["device"], table["policy"]))
              if sizes[m] <= MAX_GATES_PLOTTED][:MAX_PANELS]
    if not models:
        return []
    fig, axes = new_figure(7.5, 3.8)
    ax = axes[0][0]
    width = 0.8 / len(models)
    for i, (label, dataset, device, policy) in enumerate(models):
        part = table[(table["label"] == label) & (table["dataset"] == dataset) & (table["device"] == device)
                     & (table["policy"] == policy)].sort_values("block")
        ax.bar(part["block"] + (i - (len(models) - 1) / 2) * width, part["skip rate"], width=width,
               label=mpl_text(f"{label} ({device})"))
    ax.set_xlabel("gated block")
    ax.set_ylabel("skip rate")
    ax.set_ylim(0, 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    left_out = (f" Not drawn: {', '.join(wide)} (more than {MAX_GATES_PLOTTED} gates, e.g. one per channel; "
                "their gate_rate rows are in the tables).") if wide else ""
    return [save(fig, folder, "skip_rates", "Skip rate per gated block",
                 "Fraction of test samples that skip each gated block (1 - gate execution rate)." + left_out)]


def plot_expert_load(table: pd.DataFrame, folder: Path) -> list[Plot]:
    """Share of routed tokens per expert, one heatmap (layer x expert) per routed model
    (``table``: :func:`fractalbench.reports.tables.expert_loads`)."""
    if table.empty:
        return []
    models = list(dict.fromkeys(zip(table["label"], table["dataset"], table["device"], table["policy"])))[:MAX_PANELS]
    cols, rows = _panels(len(models))
    fig, axes = new_figure(4.8 * cols, 3.2 * rows, ncols=cols, nrows=rows)
    flat = [a for r in axes for a in r]
    for ax, (label, dataset, device, policy) in zip(flat, models):
        part = table[(table["label"] == label) & (table["dataset"] == dataset) & (table["device"] == device)
                     & (table["policy"] == policy)]
        grid = part.pivot_table(index="layer", columns="expert", values="load", aggfunc="first")
        im = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=max(0.01, float(np.nanmax(grid.to_numpy(dtype=float)))),
                       cmap="viridis", aspect="auto")
        for (r, c), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            if np.isfinite(v):
                color = "white" if v < 0.6 * np.nanmax(grid.to_numpy()) else "black"
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", color=color, fontsize=8)
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(r) for r in grid.index])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.grid(False)
        ax.set_title(mpl_text(f"{label} ({device})"), fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in flat[len(models):]:
        ax.set_visible(False)
    return [save(fig, folder, "expert_load", "Expert load",
                 "Share of routed tokens sent to each expert, per MoE layer (uniform = 1 / experts).")]


def plot_serving(table: pd.DataFrame, folder: Path) -> list[Plot]:
    """p99 latency against offered rate, one line per model and operating point, the bound dashed
    (``table``: the per-rate part of :func:`fractalbench.reports.tables.serving_table`)."""
    if table.empty:
        return []
    lines = list(dict.fromkeys(zip(table["label"], table["device"], table["policy"])))[:MAX_PANELS]
    colors = _palette([f"{label} ({device}): {policy}" for label, device, policy in lines])
    fig, axes = new_figure(7.5, 4.4)
    ax = axes[0][0]
    for label, device, policy in lines:
        rows = table[(table["label"] == label) & (table["device"] == device) & (table["policy"] == policy)]
        rows = rows.sort_values("offered /s")
        name = f"{label} ({device}): {policy}"
        ax.plot(rows["offered /s"], rows["p99 ms"], marker="o", color=colors[name], label=mpl_text(name))
    for bound in sorted(set(table["bound ms"].dropna())):
        ax.axhline(bound, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("offered rate (samples/s, Poisson)")
    ax.set_ylabel("p99 latency, ms")
    _xscale(ax, table["offered /s"])
    if _wants_log(table["p99 ms"]):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    return [save(fig, folder, "serving_p99_vs_rate", "Serving: p99 latency against offered rate",
                 "MLPerf LoadGen Server scenario through the dynamic-batching server; dashed: the p99 bound a rate "
                 "must meet. Each point one LoadGen run.")]


def plot_length_scaling(table: pd.DataFrame, folder: Path) -> list[Plot]:
    """MACs, latency and peak memory against sequence length, one line per model and attention
    variant, log-log (``table``: :func:`fractalbench.reports.tables.length_scaling`)."""
    if table.empty:
        return []
    lines = list(dict.fromkeys(zip(table["label"], table["device"], table["attention"])))[:MAX_PANELS]
    colors = _palette([f"{label} ({device})" for label, device, _ in lines])
    fig, axes = new_figure(13.5, 4.0, ncols=3)
    for ax, (part, ylabel) in zip(axes[0], (("MACs", "MACs per sequence"), ("latency ms", "ms per call (median)"),
                                             ("peak MiB", "peak MiB"))):
        for label, device, attention in lines:
            rows = table[(table["label"] == label) & (table["device"] == device) & (table["attention"] == attention)]
            rows = rows.sort_values("length")
            ax.plot(rows["length"], rows[part], marker="o", color=colors[f"{label} ({device})"],
                    linestyle="--" if attention == "full" else "-", label=mpl_text(f"{label} ({device}): {attention}"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        if part == "MACs":
            ax.yaxis.set_major_formatter(EngFormatter())
    axes[0][0].legend(fontsize=7)
    return [save(fig, folder, "length_scaling", "Cost against sequence length",
                 "Batch 1. Solid: the model's own attention; dashed: full attention of the same size at the same "
                 "length. MACs counted by the harness; latency the median of interleaved timed calls; peak memory "
                 "from torch's allocator events (CPU) or max_memory_allocated (GPU). Log-log axes.")]


# ----- FractalBrainNet patterns -------------------------------------------------------------------

def plot_pattern_arrays(arrays: Sequence[tuple[str, str, np.ndarray]], folder: Path) -> list[Plot]:
    """FractalBrainNet pattern images stored as .npy (``(model label, pattern name, array)``), in a grid."""
    arrays = [(m, n, a) for m, n, a in arrays if a.ndim in (2, 3) and a.size][:MAX_PANELS]
    if not arrays:
        return []
    cols, rows = _panels(len(arrays))
    fig, axes = new_figure(3.4 * cols, 3.4 * rows, ncols=cols, nrows=rows)
    flat = [a for r in axes for a in r]
    for ax, (label, name, arr) in zip(flat, arrays):
        img = arr if arr.ndim == 2 or arr.shape[-1] in (3, 4) else arr[0]
        ax.imshow(np.asarray(img, dtype=float), cmap="magma", interpolation="nearest")
        ax.set_title(mpl_text(f"{label}: {name}"), fontsize=9)
        ax.set_axis_off()
    for ax in flat[len(arrays):]:
        ax.set_visible(False)
    return [save(fig, folder, "fractal_patterns", "FractalBrainNet patterns",
                 "Pattern images stored by FractalBrainNet cells (.npy artifacts).")]


def plot_pattern_complexity(table: pd.DataFrame, folder: Path) -> list[Plot]:
    """Pattern complexity (nats) per fractal level (``table``: :func:`fractalbench.reports.tables.pattern_table`)."""
    if table.empty:
        return []
    sub = table[(table["metric"] == "pattern_complexity") & table["level"].notna()]
    if sub.empty:
        return []
    fig, axes = new_figure(6.0, 3.8)
    ax = axes[0][0]
    for (label, device), part in sub.groupby(["label", "device"], sort=False):
        part = part.sort_values("level")
        ax.plot(part["level"], part["value"], "-o", label=mpl_text(f"{label} ({device})"))
    unit = sub["unit"].iloc[0] if sub["unit"].iloc[0] else "value"
    ax.set_xlabel("fractal level")
    ax.set_ylabel(f"pattern complexity ({unit})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return [save(fig, folder, "pattern_complexity", "Pattern complexity per level",
                 "FractalBrainNet pattern analysis on test images: complexity of the activations per fractal level.")]
