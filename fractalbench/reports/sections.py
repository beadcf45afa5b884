"""The report's sections, each built as plain data (:mod:`fractalbench.reports.blocks`) from the results.

Every builder takes the :class:`ReportContext` and returns a :class:`~fractalbench.reports.blocks.Body` (or
None when the section has nothing to show and is left out). :data:`SECTIONS` lists them in page
order with their titles: the headline (accuracy vs MACs with the Pareto frontier, over points not
chosen on test) and the summary per model are open; every other section is a collapsed
``<details>``. Threshold grid points scored on test appear only in their own collapsed part of the
trade-offs section (see :mod:`fractalbench.reports.points`, selection).

Which metrics a section shows comes from the catalogue groups in :data:`SECTION_GROUPS`; the
"Other metrics" section shows rows of every metric none of those groups holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fractalbench.harness.catalogue import names
from fractalbench.harness.results import RunData
from fractalbench.reports import patterns, plots, tables
from fractalbench.reports.blocks import (
    Body,
    Details,
    ErrorRow,
    ErrorTable,
    Heading,
    ItemList,
    Note,
    Pre,
    figure_block,
    key_values,
    table_block,
)

log = logging.getLogger(__name__)

# Catalogue groups each section shows (the "other metrics" section shows what none of them holds).
SECTION_GROUPS = {"summary, points, per exit": ("accuracy", "cost"), "latency": ("latency",),
                  "memory": ("memory",), "energy": ("energy",), "serving": ("serving",),
                  "dynamic": ("dynamic",), "patterns": ("patterns",),
                  "training": ("training",), "errors": ("run",)}
COVERED_METRICS = names(groups=[g for groups in SECTION_GROUPS.values() for g in groups])
# Accuracy and cost rows shown by the summary, operating points and the per-exit table.
SHOWN_COST_METRICS = frozenset({"top1", "top5", "policy_top1", "params", "params_active", "macs", "flops",
                                "expected_macs"})


@dataclass
class ReportContext:
    """What the section builders share: the runs, their rows, the output folder, files written."""

    runs: list[RunData]
    frame: pd.DataFrame
    folder: Path
    files: list[Path] = field(default_factory=list)

    @property
    def multi(self) -> bool:
        return len(self.runs) > 1

    def table(self, table: pd.DataFrame, name: str, caption: str = "", highlight: str | None = None) -> list:
        """Write ``table`` as CSV + Markdown under ``name``; the blocks that show it ([] when empty)."""
        if table.empty:
            return []
        try:
            self.files.extend(tables.write_table(table, self.folder, name))
        except OSError as exc:
            log.warning("could not write table %s: %s", name, exc)
        return [table_block(display(table, self.multi), caption, highlight)]

    def figures(self, made: list[plots.Plot]) -> list:
        for p in made:
            self.files.extend([p.png, p.svg])
        return [figure_block(p.png_bytes, p.title, p.caption) for p in made]


def display(table: pd.DataFrame, multi_run: bool) -> pd.DataFrame:
    """Columns worth showing: no ``run`` column for one run, no ``model`` when it equals ``label``."""
    out = table
    if not multi_run and "run" in out:
        out = out.drop(columns=["run"])
    if "model" in out and "label" in out and (out["model"].astype(str) == out["label"].astype(str)).all():
        out = out.drop(columns=["model"])
    return out


def rows_hint(table: pd.DataFrame, what: str = "rows") -> str:
    """'N rows' for a collapsed section's title ('1 row'; '' for none)."""
    n = len(table)
    return "" if n == 0 else f"{n} {what.removesuffix('s') if n == 1 else what}"


# ----- open sections --------------------------------------------------------------------------------

def section_headline(ctx: ReportContext) -> Body:
    made = plots.plot_tradeoffs(ctx.frame, ctx.folder, costs=("macs",))
    if not made:
        return Body([Note("No accuracy-vs-MACs points: needs top1/policy_top1 rows with macs/expected_macs.")])
    return Body([*ctx.figures(made),
                 Note("Only points not chosen on test: thresholds fitted on validation, learned decisions and "
                      "trained attribute values, static models and forced exits. A point is on the Pareto frontier "
                      "when no other such point is at least as accurate for no more MACs with one of the two "
                      "strictly better; a point off it is indistinguishable from it when its 95 % interval reaches "
                      "the most accurate frontier point costing no more. Threshold grid points scored on test are "
                      "left out here (a choice among them would be made on test); they are shown apart under "
                      "'Accuracy vs cost', test grid.")])


def section_summary(ctx: ReportContext) -> Body:
    wide = tables.summary_table(ctx.frame)
    if wide.empty:
        return Body([Note("No result rows.")])
    brief = tables.brief_summary(display(wide, ctx.multi))
    failed = int((wide["status"] != "ok").sum()) if "status" in wide else 0
    blocks = [*ctx.table(brief, "summary_brief"),
              Note("top1 %: on test at the last exit; MACs: multiply-accumulates per image on the forced path to "
                   "the last exit (FLOPs = 2 x MACs). Chosen point: the operating point chosen without test "
                   "(thresholds fitted on validation, e.g. to a MAC budget, or a model's learned decisions; the "
                   "most accurate on validation of several), with its test top-1 and expected MACs. Latency: ms "
                   "per call, forced path to the last exit, batch 1. Memory: MiB (2^20 bytes).")]
    if failed:
        blocks.append(Note(f"{failed} model(s) failed: see Errors below."))
    blocks.append(Details("all summary columns (top-5, active parameters, latency p90/p99 per batch size, weights, "
                          "GPU memory)", ctx.table(wide, "summary")))
    return Body(blocks)


# ----- collapsed sections ----------------------------------------------------------------------------

PRESERVED_POINTS = 1.0  # accuracy points a "preserved accuracy" point may lose
POINT_NAMES = {"ci_low": "top1 95% CI low", "ci_high": "top1 95% CI high", "near_frontier": "near frontier"}


def section_tradeoffs(ctx: ReportContext) -> Body:
    blocks = ctx.figures(plots.plot_tradeoffs(ctx.frame, ctx.folder, costs=("latency",)))
    for cost, title in (("macs", "MACs per image"), ("latency", "latency ms per call, batch 1")):
        points = tables.operating_points(ctx.frame, cost)
        if points.empty:
            continue
        front = points[points["pareto"]].sort_values(["dataset", "device", "cost"])
        named = {**POINT_NAMES, "cost": title, "accuracy": "top1 %"}
        blocks += [Heading(f"Pareto frontier: top-1 vs {title}"),
                   *ctx.table(front.drop(columns=["pareto", "near_frontier"]).rename(columns=named),
                              f"pareto_{cost}"),
                   Details(f"all {len(points)} points not chosen on test (frontier marked)",
                           ctx.table(points.rename(columns=named), f"points_{cost}", highlight="pareto"))]
    blocks += _preserved(ctx)
    grid = _test_grid(ctx)
    if not blocks and not grid:
        return Body([Note("Needs top1/policy_top1 rows with macs/expected_macs or latency rows.")])
    if blocks:
        blocks.append(Note("Points and frontiers above: only points not chosen on test (selection: validation, "
                           "learned or fixed), with the 95 % Wilson interval of their test top-1; 'near frontier': "
                           "off the frontier, but the interval's upper end reaches the most accurate frontier point "
                           "that costs no more. Latency points: the policy stream's mean ms per call at batch 1 of "
                           "the same policy and threshold; the frontier for latency is per dataset and device."))
    return Body(blocks + grid)


def _preserved(ctx: ReportContext) -> list:
    """Cost at preserved accuracy: the papers' kind of claim, per dynamic model."""
    table = tables.preserved_accuracy(ctx.frame, PRESERVED_POINTS)
    if table.empty:
        return []
    return [Heading(f"Cost at preserved accuracy (within {PRESERVED_POINTS:g} point of the full network)"),
            *ctx.table(display(table, ctx.multi).rename(columns={"label": "model"}), "preserved_accuracy"),
            Note(f"Per dynamic model: its full network (the most expensive forced exit) and the cheapest of its points "
                 f"chosen without test (fitted on validation, or learned) whose test top-1 is at most "
                 f"{PRESERVED_POINTS:g} point below it, with the MACs it avoids and its batch-1 latency speed-up (the "
                 "policy stream's mean ms per call against the forced full path's) where both were timed. Empty: every "
                 "fitted point loses more. Which fitted point qualifies is read off the test numbers, so this "
                 "describes the measured curve, as the papers' claims do; the chosen point of the summary is the "
                 "choice made without test.")]


def _test_grid(ctx: ReportContext) -> list:
    """The threshold grid points scored on test, apart: figures and tables in a collapsed part."""
    parts = ctx.figures(plots.plot_test_grid(ctx.frame, ctx.folder))
    count = 0
    for cost, title in (("macs", "MACs per image"), ("latency", "latency ms per call, batch 1")):
        grid = tables.grid_points(ctx.frame, cost)
        count = count or len(grid)
        parts += ctx.table(grid.rename(columns={**POINT_NAMES, "cost": title, "accuracy": "top1 %"}),
                           f"test_grid_{cost}", f"Test-grid points by {title}")
    if not parts:
        return []
    note = Note("Threshold grid points scored on test (detail.fitted_on 'none (grid point)'): a view of the "
                "trade-off, not for model selection; picking one by its test score would be choosing on test. None "
                "of them is in the summary, the headline plots, the Pareto frontier or the points tables above.")
    return [Heading("Test grid (not for model selection)"),
            Details(f"{count} threshold grid points scored on test: figure and tables", [note, *parts])]


def section_errors(ctx: ReportContext) -> Body:
    table = tables.error_table(ctx.runs)
    if table.empty:
        return Body([Note("No failed cells and no measurement errors.")], "none")
    try:
        ctx.files.extend(tables.write_table(table, ctx.folder, "errors"))
    except OSError as exc:
        log.warning("could not write the error table: %s", exc)
    rows = [ErrorRow(*(str(getattr(r, c)) for c in ("run", "cell", "label", "metric", "error", "traceback")))
            for r in table.itertuples(index=False)]
    return Body([ErrorTable(rows, ctx.multi)], rows_hint(table, "errors"))


def section_seeds(ctx: ReportContext) -> Body | None:
    """Models run with several seeds: each seed's last-exit top-1 with its interval, mean and sd."""
    from fractalbench.reports.seeds import seed_table

    table = seed_table(tables.combined_rows(ctx.runs, per_seed=True))
    if table.empty:
        return None
    note = Note("Every other table and plot shows the mean over seeds (with 'sd over seeds'); here each seed's "
                "own test top-1 at the last exit with its 95 % Wilson interval. The interval covers the test "
                "sample; the spread across seeds covers training noise.")
    return Body([note, *ctx.table(table, "seeds")], rows_hint(table, "seed rows"))


def _claims(ctx: ReportContext) -> list:
    """The papers' headline claims beside the measured numbers (fractalbench.reports.claims)."""
    from fractalbench.reports.claims import claims_table

    table = claims_table(ctx.runs, ctx.frame)
    if table.empty:
        return []
    return [Heading("Papers' claims beside the measured"),
            *ctx.table(table.rename(columns={"label": "model"}), "claims"),
            Note("Each claim from the model card's paper; 'measured': the cost at preserved accuracy of this run (the "
                 "cheapest point fitted on validation or learned whose test top-1 is within the allowed loss of the "
                 "full network: MACs avoided, or the batch-1 latency speed-up of its policy stream over the full "
                 "path); 'holds' compares it with the published number. The papers' networks, data and recipes "
                 "differ from the run's (see the recipes below).")]


def section_reference(ctx: ReportContext) -> Body | None:
    table = tables.reference_table(ctx.runs, ctx.frame)
    if table.empty:
        return None
    claims = _claims(ctx)
    if claims:
        claims.append(Heading("Published numbers beside the measured"))
    return Body([*claims, Note("From each model card (cell meta card.reference), beside the measured value where the "
                      "key names a measured quantity: params, macs/flops (last exit, per image), macs_<size> only at "
                      "that input size, top1 (last exit; top1_<dataset> only when measured on that dataset). MACs "
                      "measured at another input size than the paper's (see 'measured at') are not expected to "
                      "match. A model whose card has no published CIFAR accuracy gets one top1 row that says so. "
                      "'paper recipe' is the card's (key=value pairs, then notes after |); 'measured recipe' is "
                      "the cell's own, from the suite as written; 'recipes differ' compares them over the paper's "
                      "keys (unknown when either is missing) and 'recipe differences' lists what differs, "
                      "measured vs paper."), *ctx.table(table, "reference")], rows_hint(table, "numbers"))


def section_per_exit(ctx: ReportContext) -> Body | None:
    table = tables.per_exit_table(ctx.frame)
    extra = tables.rows_table(ctx.frame, names(groups=["accuracy", "cost"]) - SHOWN_COST_METRICS)
    if table.empty and extra.empty:
        return None
    blocks = [*ctx.figures(plots.plot_per_exit(table, ctx.folder)), *ctx.table(table, "per_exit")]
    if not extra.empty:
        blocks.append(Details(f"cost cross-checks and other accuracy/cost rows ({len(extra)}: "
                              f"{', '.join(sorted(set(extra['metric'])))})", ctx.table(extra, "cost_other")))
    return Body(blocks, rows_hint(table))


def section_latency(ctx: ReportContext) -> Body | None:
    pairs = tables.latency_vs_predicted(ctx.frame)
    lat = tables.latency_table(ctx.frame)
    extra = tables.rows_table(ctx.frame, names(groups=["latency"]) - names(kinds=["timing"]) - {
        "latency_predicted", "latency_backend", "backend_outcome_mismatches", "backend_unsupported"})
    if pairs.empty and lat.empty and extra.empty:
        return None
    blocks = ctx.figures(plots.plot_latency_prediction(pairs, ctx.folder))
    if not pairs.empty:
        blocks.append(Details(f"measured vs predicted policy latency ({len(pairs)} operating points)",
                              ctx.table(pairs, "latency_vs_predicted")))
    if not lat.empty:
        blocks += [Note("Forced: the path to exit k, nothing after it. Policy: a stream of test samples one at a "
                        "time (batch 1), or batches with compaction (latency) or masking (latency_masked). "
                        "mean = value; p99 needs >= 100 calls."),
                   Details(f"every latency row ({len(lat)})", ctx.table(lat, "latency"))]
    backends = tables.backend_table(ctx.frame)
    if not backends.empty:
        blocks += [Heading("Backends: does the saving survive compilation and export?"),
                   Note("Each streamed operating point at batch 1 through eager PyTorch, torch.compile (inductor) "
                        "and ONNX Runtime as the suite's latency.backends list them. Early-exit models run one graph "
                        "per stage and head with the decision between graphs; models whose decisions live inside "
                        "their forward are not exported (the reason is given). Latency saving: against the same "
                        "backend's forced last exit; MACs saving: the point's expected MACs against the last "
                        "exit's. Outcome mismatches: test predictions that differ from eager's (near-ties apart)."),
                   *ctx.table(backends, "backends")]
    if not extra.empty:
        blocks.append(Details(f"latency cross-checks ({len(extra)})", ctx.table(extra, "latency_other")))
    return Body(blocks, rows_hint(lat))


def section_memory(ctx: ReportContext) -> Body | None:
    table = tables.memory_table(ctx.frame)
    if table.empty:
        return None
    return Body([Note("MiB (2^20 bytes). Weights apart from peak activations (CPU: in a fresh process; GPU: "
                      "allocated above the baseline); GPU reserved by the caching allocator where measured."),
                 *ctx.table(table, "memory")], rows_hint(table))


def section_energy(ctx: ReportContext) -> Body | None:
    table, skipped = tables.energy_table(ctx.frame)
    if table.empty and skipped.empty:
        return None
    blocks = []
    if not table.empty:
        blocks += [Note("Joules per sample read from the machine's counters around exactly the timed calls of each "
                        "latency measurement (RAPL package domains on CPU, NVML on GPU): the whole package or GPU, "
                        "every process on it; 'net' subtracts the idle power measured just before (a sleep). "
                        "Forced rows: the path to one exit; policy rows: the stream at batch 1 or compact batches."),
                   *ctx.table(table, "energy")]
    if not skipped.empty:
        blocks += [Note("No energy counter could be read for these cells; nothing is estimated in their place."),
                   *ctx.table(skipped, "energy_skipped")]
    return Body(blocks, rows_hint(table if not table.empty else skipped))


def section_serving(ctx: ReportContext) -> Body | None:
    per_rate, per_point = tables.serving_table(ctx.frame)
    if per_rate.empty and per_point.empty:
        return None
    return Body([Note("MLPerf LoadGen drives a dynamic-batching server (early-exit models: iteration-level batching, "
                      "samples leave at their exit and new ones join at stage 0; others: batches of up to 'max "
                      "batch' requests). Server scenario: Poisson arrivals at each offered rate, latency from "
                      "issue to answer; a rate passes when its p99 is within the bound and LoadGen's early "
                      "stopping holds. Single stream: one query at a time. Outcome mismatches: served predictions "
                      "that differ from the model's batch-1 prediction."),
                 *ctx.figures(plots.plot_serving(per_rate, ctx.folder)),
                 *ctx.table(per_point, "serving"),
                 Details("every Server run", ctx.table(per_rate, "serving_runs"))], rows_hint(per_point))


def section_dynamic(ctx: ReportContext) -> Body | None:
    frame = ctx.frame
    exits, skips, experts = tables.exit_histograms(frame), tables.skip_rates(frame), tables.expert_loads(frame)
    parts, routed = tables.cost_decomposition(frame), tables.routed_compute(frame)
    if exits.empty and skips.empty and experts.empty and parts.empty and routed.empty:
        return None
    blocks = []
    if not parts.empty:
        blocks += [Heading("Cost, decomposed"),
                   Note("Per operating point not chosen on test: mean MACs per image of the backbone that ran, of "
                        "the exit heads and gates/routers evaluated (heads of exits not taken included), and the "
                        "share of the full network (the last forced exit, heads included) avoided; 'vs forward()' "
                        "against the plain backbone path where that path is fixed."),
                   *ctx.table(parts, "cost_decomposition")]
    if not routed.empty:
        blocks += [Heading("Routed compute: useful against padded"),
                   Note("Routed models, per operating point: mean expert MACs per image of the (token, expert) pairs "
                        "routed (what the compact dispatch runs) against what a static-shape dispatch runs for the "
                        "same routes, every expert a buffer of its capacity (per sample, or per evaluation batch for "
                        "batch-wide expert choice; no capacity: the busiest expert's load in the batch); "
                        "utilization = useful / padded. Dropped: share of each layer's (token, choice) assignments "
                        "no expert ran. Busiest expert: its share of the layer's tokens, and in brackets the 90th "
                        "percentile of that share within single images."),
                   *ctx.table(routed, "routed_compute")]
    for title, table, fn, name in (("Exit histograms", exits, plots.plot_exit_histograms, "exit_histograms"),
                                   ("Skip rates", skips, plots.plot_skip_rates, "skip_rates"),
                                   ("Expert load", experts, plots.plot_expert_load, "expert_load")):
        if not table.empty:
            blocks += [Heading(title), *ctx.figures(fn(table, ctx.folder)),
                       Details(f"{title} table", ctx.table(table, name))]
    return Body(blocks)


def section_length(ctx: ReportContext) -> Body | None:
    table = tables.length_scaling(ctx.frame)
    if table.empty:
        return None
    return Body([Note("Sequence models at the suite's cost.lengths, batch 1, in the measuring process: the model's "
                      "attention beside full attention of the same size (freshly built at each length; costs do not "
                      "depend on the weights). Saving = 1 - sparse / full at that length."),
                 *ctx.figures(plots.plot_length_scaling(table, ctx.folder)),
                 *ctx.table(table, "length_scaling")], rows_hint(table))


def section_patterns(ctx: ReportContext) -> Body | None:
    return patterns.section(ctx)


def section_training(ctx: ReportContext) -> Body | None:
    table = tables.rows_table(ctx.frame, names(groups=["training"]))
    if table.empty:
        return None
    return Body([Note("Training time (s, wall clock) and the last epoch's mean of each named loss term (nats)."),
                 *ctx.table(table, "training")], rows_hint(table))


def section_other(ctx: ReportContext) -> Body | None:
    table = tables.other_metrics_table(ctx.frame, COVERED_METRICS)
    if table.empty:
        return None
    return Body([Note("Rows of metrics the metric catalogue does not know (e.g. written by a newer or older "
                      "version), so that nothing stored is hidden."), *ctx.table(table, "other_metrics")],
                rows_hint(table))


def section_suite(ctx: ReportContext) -> Body:
    blocks: list = []
    for run in ctx.runs:
        suite, env = run.suite, run.environment
        content = suite.get("content") if isinstance(suite.get("content"), dict) else {}
        ok = sum(c.status == "ok" for c in run.cells)
        blocks += [Heading(f"Run {run.name}"),
                   key_values({"run directory": str(run.path), "suite": suite.get("name", "(unknown)"),
                               "description": content.get("description", ""), "suite file": suite.get("path", ""),
                               "suite digest": suite.get("digest", ""),
                               "cells": f"{ok} ok, {len(run.cells) - ok} failed",
                               "cells ran on": machines_of(run.cells)})]
        weights = weights_table(run)
        if not weights.empty:
            blocks += [Heading("Trained weights the cells started from"), *ctx.table(weights, f"weights_{run.name}"),
                       Note("Each cell's meta.weights: where the weights came from (a file, an https URL checked "
                            "against its sha256, another cell of the run, or timm's pretrained), what they were "
                            "loaded into (the whole model, or the dense backbone a dynamic model is built on), and "
                            "the normalisation the cell's data then used.")]
        if content:
            blocks.append(Details("suite content", [Pre(json.dumps(content, indent=1, default=str))]))
        if env:
            flat = {k: v for k, v in env.items() if k != "libraries"}
            flat.update({f"version: {lib}": version for lib, version in (env.get("libraries") or {}).items()})
            blocks.append(Details("environment", [key_values(flat)]))
        else:
            blocks.append(Note("No environment.json in this run."))
    return Body(blocks)


def weights_table(run: RunData) -> pd.DataFrame:
    """One row per cell of ``run`` that started from trained weights (its ``meta.weights``)."""
    records = []
    for cell in run.cells:
        loaded = (cell.meta or {}).get("weights")
        if not loaded:
            continue
        model = next((r.get("model") for r in cell.rows if r.get("model")), (cell.meta or {}).get("model", "?"))
        for weights in loaded if isinstance(loaded, list) else [loaded]:  # a list: one source per submodule
            norm = weights.get("normalisation") or {}
            records.append({"model": model, "source": weights.get("source", ""),
                            "sha256": str(weights.get("sha256", ""))[:16], "obtained": weights.get("obtained", ""),
                            "adapters": ", ".join(weights.get("adapters") or []) or "none",
                            "loaded into": weights.get("loaded_into", ""),
                            "normalisation": (f"mean {norm.get('mean')}, std {norm.get('std')} "
                                              f"({norm.get('declared_by')})" if norm
                                              else "the training split's (the weights declare none)")})
    return pd.DataFrame(records, columns=["model", "source", "sha256", "obtained", "adapters", "loaded into",
                                          "normalisation"])


def machines_of(cells: Sequence[Any]) -> str:
    """Which machines a run's cells ran on, from each cell's ``meta.machine`` (a run resumed over
    several sessions may change machines; environment.json holds only the last invocation's)."""
    counts: dict[str, int] = {}
    for cell in cells:
        machine = (cell.meta or {}).get("machine")
        if machine:
            bf16 = {True: ", native bf16", False: ", no native bf16"}.get(machine.get("cpu_native_bf16"), "")
            name = f"{machine.get('cpu', '?')} ({machine.get('cpu_capability', '?')}{bf16})"
            name += f", {machine['gpu']}" if machine.get("gpu") else ""
        else:
            name = "not recorded (cells from before it was)"
        counts[name] = counts.get(name, 0) + 1
    return "; ".join(f"{name}: {n} cell(s)" for name, n in counts.items()) or "no cells"


def section_files(ctx: ReportContext) -> Body:
    names_ = sorted({p.name for p in ctx.files})
    return Body([Note(f"Written beside this report in {ctx.folder}: plots as PNG and SVG, tables as CSV and "
                      "Markdown."), ItemList(names_)], f"{len(names_)} files")


Builder = Callable[[ReportContext], "Body | None"]

# (anchor, title, builder, collapsed), in page order. The files section comes last (it lists what the others wrote).
SECTIONS: tuple[tuple[str, str, Builder, bool], ...] = (
    ("headline", "Accuracy vs MACs (Pareto frontier)", section_headline, False),
    ("summary", "Summary per model", section_summary, False),
    ("tradeoffs", "Accuracy vs cost (Pareto frontier)", section_tradeoffs, True),
    ("errors", "Errors", section_errors, True),
    ("seeds", "Seeds: per-seed accuracy and the spread", section_seeds, True),
    ("reference", "Published reference numbers", section_reference, True),
    ("exits", "Per exit: accuracy, MACs, latency", section_per_exit, True),
    ("latency", "Latency: measured vs predicted, every row", section_latency, True),
    ("memory", "Memory", section_memory, True),
    ("energy", "Energy", section_energy, True),
    ("serving", "Serving under load", section_serving, True),
    ("dynamic", "Exits, skips and experts", section_dynamic, True),
    ("length", "Cost against sequence length", section_length, True),
    ("patterns", "FractalBrainNet patterns", section_patterns, True),
    ("training", "Training", section_training, True),
    ("other", "Other metrics", section_other, True),
    ("suite", "Suite and environment", section_suite, True),
    ("files", "Files", section_files, True),
)
