"""The self-contained HTML report of one or more runs.

``write_report(runs, out)`` writes one HTML file (default ``<first run>/report.html``) that needs
nothing else: plots are embedded as base64 PNG, the style sheet is inline, there is no script, and
a Content-Security-Policy forbids loading anything from elsewhere. Beside it, ``<first run>/report/``
receives every plot as PNG and SVG and every table as CSV (raw values) and Markdown.

Every string taken from the results (suite, model and metric names, errors, environment) is
escaped with ``html.escape`` before it is embedded.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from harness.results import atomic_write_text
from reports import plots, tables

log = logging.getLogger(__name__)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TABLE_ROWS = 400
MAX_ARTIFACT_BYTES = 16 * 2**20

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d232a;background:#fff}
header{background:#1f3a5f;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:1.5em}
header p{margin:2px 0;opacity:.9;font-size:.9em}
nav{padding:8px 28px;background:#eef2f7;border-bottom:1px solid #d5dde8;font-size:.9em}
nav a{margin-right:14px;color:#1f3a5f;text-decoration:none}
main{padding:8px 28px 40px;max-width:1500px}
h2{border-bottom:2px solid #1f3a5f;padding-bottom:4px;margin-top:34px}
h3{margin-top:22px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.82em}
th,td{border:1px solid #d5dde8;padding:3px 7px;vertical-align:top}
th{background:#eef2f7;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fdecea}
tr.front td{background:#eaf6ec}
.scroll{overflow-x:auto}
figure{margin:12px 0 22px}
figure img{max-width:100%;height:auto;border:1px solid #e3e8ef}
figcaption{font-size:.85em;color:#4a5563;margin-top:4px}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:.8em;max-height:420px}
.note{color:#4a5563;font-size:.9em}
.error{color:#a1260d}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.grid figure{margin:0}
.grid img{width:240px;max-width:100%;image-rendering:pixelated}
"""


@dataclass
class Section:
    anchor: str
    title: str
    parts: list[str] = field(default_factory=list)


@dataclass
class ReportContext:
    """What the section builders share: the runs, their rows, the output folder, files written."""

    runs: list[tables.RunData]
    frame: pd.DataFrame
    folder: Path
    files: list[Path] = field(default_factory=list)

    @property
    def multi(self) -> bool:
        return len(self.runs) > 1

    def table(self, table: pd.DataFrame, name: str, caption: str = "", highlight: str | None = None) -> str:
        """Write ``table`` as CSV + Markdown under ``name`` and return it as HTML."""
        if table.empty:
            return ""
        try:
            self.files.extend(tables.write_table(table, self.folder, name))
        except OSError as exc:
            log.warning("could not write table %s: %s", name, exc)
        return html_table(display(table, self.multi), caption, highlight)

    def figures(self, made: list[plots.Plot]) -> str:
        for p in made:
            self.files.extend([p.png, p.svg])
        return "".join(figure(p.png_bytes, p.title, p.caption) for p in made)


# ----- HTML pieces ----------------------------------------------------------------------------------

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def display(table: pd.DataFrame, multi_run: bool) -> pd.DataFrame:
    """Columns worth showing: no ``run`` column for one run, no ``model`` when it equals ``label``."""
    out = table
    if not multi_run and "run" in out:
        out = out.drop(columns=["run"])
    if "model" in out and "label" in out and (out["model"].astype(str) == out["label"].astype(str)).all():
        out = out.drop(columns=["model"])
    return out


def html_table(table: pd.DataFrame, caption: str = "", highlight: str | None = None, max_rows: int = MAX_TABLE_ROWS) -> str:
    """An escaped HTML table. ``highlight``: a boolean column that marks rows (and is not shown)."""
    if table.empty:
        return ""
    marks = table[highlight].astype(bool).tolist() if highlight and highlight in table else [False] * len(table)
    shown = table.drop(columns=[highlight]) if highlight and highlight in table else table
    numeric = [pd.api.types.is_numeric_dtype(shown[c]) and not pd.api.types.is_bool_dtype(shown[c]) for c in shown.columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in shown.columns)
    body = []
    for mark, cells in zip(marks[:max_rows], tables.formatted(shown.head(max_rows))):
        tds = "".join(f'<td class="num">{esc(v)}</td>' if num else f"<td>{esc(v)}</td>" for v, num in zip(cells, numeric))
        body.append(f'<tr class="front">{tds}</tr>' if mark else f"<tr>{tds}</tr>")
    more = f'<p class="note">{len(table) - max_rows} more rows in the CSV file.</p>' if len(table) > max_rows else ""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{more}'


def figure(png: bytes, title: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption><b>{esc(title)}</b>{'. ' + esc(caption) if caption else ''}</figcaption>"
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(title)}">{cap}</figure>'


def key_values(items: dict[str, Any]) -> str:
    rows = []
    for key, value in items.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        rows.append(f"<tr><th>{esc(key)}</th><td>{esc(text)}</td></tr>")
    return f"<table><tbody>{''.join(rows)}</tbody></table>" if rows else ""


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


# ----- sections ------------------------------------------------------------------------------------

def section_suite(ctx: ReportContext) -> Section:
    sec = Section("suite", "Suite and environment")
    for run in ctx.runs:
        suite, env = run.suite, run.environment
        content = suite.get("content") if isinstance(suite.get("content"), dict) else {}
        sec.parts.append(f"<h3>Run {esc(run.name)}</h3>")
        sec.parts.append(key_values({"run directory": str(run.path), "suite": suite.get("name", "(unknown)"),
                                     "description": content.get("description", ""), "suite file": suite.get("path", ""),
                                     "suite digest": suite.get("digest", ""),
                                     "cells": f"{sum(c.status == 'ok' for c in run.cells)} ok, "
                                              f"{sum(c.status != 'ok' for c in run.cells)} failed"}))
        if content:
            sec.parts.append(f"<details><summary>suite content</summary><pre>{esc(json.dumps(content, indent=1, default=str))}</pre></details>")
        if env:
            flat = {k: v for k, v in env.items() if k != "libraries"}
            for lib, version in (env.get("libraries") or {}).items():
                flat[f"version: {lib}"] = version
            sec.parts.append("<h4>Environment</h4>" + key_values(flat))
        else:
            sec.parts.append(note("No environment.json in this run."))
    return sec


def section_summary(ctx: ReportContext) -> Section:
    sec = Section("summary", "Summary per model")
    table = tables.summary_table(ctx.frame)
    if table.empty:
        sec.parts.append(note("No result rows."))
        return sec
    sec.parts.append(note("Accuracy: top-1/top-5 % on test at the last exit. MACs: multiply-accumulates per image on "
                          "the forced path to the last exit (FLOPs = 2 x MACs). Best policy: the most accurate policy "
                          "setting of a dynamic model and its expected MACs. Latency: ms per call on the forced path "
                          "to the last exit, per batch size (p99 only with >= 100 calls). Memory: MiB (2^20 bytes), "
                          "peak activations apart from weights."))
    sec.parts.append(ctx.table(table, "summary"))
    return sec


def section_reference(ctx: ReportContext) -> Section:
    sec = Section("reference", "Published reference numbers")
    table = tables.reference_table(ctx.runs, ctx.frame)
    if table.empty:
        sec.parts.append(note("No model card in these runs carries published numbers."))
        return sec
    sec.parts.append(note("From each model card (cell meta card.reference), beside the measured value where the key "
                          "names a measured quantity: params, macs/flops (last exit, per image), macs_<size> only at that "
                          "input size, top1 (last exit; top1_<dataset> only when measured on that dataset). MACs "
                          "measured at another input size than the paper's (see 'measured at') are not expected to "
                          "match."))
    sec.parts.append(ctx.table(table, "reference"))
    return sec


def section_tradeoffs(ctx: ReportContext) -> Section:
    sec = Section("tradeoffs", "Accuracy vs cost (Pareto frontier)")
    made = plots.plot_tradeoffs(ctx.frame, ctx.folder)
    if not made:
        sec.parts.append(note("Needs top1/policy_top1 rows with macs/expected_macs or latency rows."))
        return sec
    sec.parts.append(note("Dynamic models: one point per policy setting (policy_top1 with expected_macs of the same "
                          "policy and threshold, or the policy stream's latency); static models: the last exit. "
                          "A point is on the Pareto frontier when no other point is at least as accurate for no more "
                          "cost with one of the two strictly better."))
    sec.parts.append(ctx.figures(made))
    for cost, title in (("macs", "MACs per image"), ("latency", "latency ms per call, batch 1")):
        points = tables.operating_points(ctx.frame, cost)
        if points.empty:
            continue
        front = points[points["pareto"]].sort_values(["dataset", "device", "cost"])
        sec.parts.append(f"<h3>Pareto frontier: top-1 vs {esc(title)}</h3>")
        sec.parts.append(ctx.table(front.drop(columns=["pareto"]).rename(columns={"cost": title, "accuracy": "top1 %"}),
                                   f"pareto_{cost}"))
        sec.parts.append("<details><summary>all operating points</summary>"
                         + ctx.table(points.rename(columns={"cost": title, "accuracy": "top1 %"}), f"points_{cost}", highlight="pareto")
                         + "</details>")
    return sec


def section_per_exit(ctx: ReportContext) -> Section:
    sec = Section("exits", "Per exit: accuracy, MACs, latency")
    table = tables.per_exit_table(ctx.frame)
    lat = tables.latency_table(ctx.frame)
    if table.empty and lat.empty:
        sec.parts.append(note("No per-exit rows."))
        return sec
    sec.parts.append(ctx.figures(plots.plot_per_exit(table, ctx.folder)))
    sec.parts.append(ctx.table(table, "per_exit"))
    if not lat.empty:
        sec.parts.append("<h3>Latency (ms per call)</h3>")
        sec.parts.append(note("Forced: the path to exit k, nothing after it. Policy: a stream of test samples one at a "
                              "time (batch 1) or batches with compaction. mean = value; p99 needs >= 100 calls."))
        sec.parts.append(ctx.table(lat, "latency"))
    mem = tables.memory_table(ctx.frame)
    if not mem.empty:
        sec.parts.append("<h3>Memory (MiB)</h3>")
        sec.parts.append(ctx.table(mem, "memory"))
    return sec


def section_dynamic(ctx: ReportContext) -> Section:
    sec = Section("dynamic", "Exits, skips and experts")
    exits, skips, experts = tables.exit_histograms(ctx.frame), tables.skip_rates(ctx.frame), tables.expert_loads(ctx.frame)
    if exits.empty and skips.empty and experts.empty:
        sec.parts.append(note("No exit_fraction, gate_rate/skip_rate or expert_load rows."))
        return sec
    for title, table, fn, name in (("Exit histograms", exits, plots.plot_exit_histograms, "exit_histograms"),
                                   ("Skip rates", skips, plots.plot_skip_rates, "skip_rates"),
                                   ("Expert load", experts, plots.plot_expert_load, "expert_load")):
        if table.empty:
            continue
        sec.parts.append(f"<h3>{esc(title)}</h3>")
        sec.parts.append(ctx.figures(fn(table, ctx.folder)))
        sec.parts.append(f"<details><summary>{esc(title)} table</summary>{ctx.table(table, name)}</details>")
    return sec


def _pattern_artifacts(ctx: ReportContext) -> tuple[list[tuple[str, str, bytes]], list[tuple[str, str, np.ndarray]]]:
    pngs, arrays = [], []
    for run in ctx.runs:
        for cell in run.cells:
            folder = run.path / "artifacts" / cell.cell_id
            if not folder.is_dir():
                continue
            model = next((r.get("model") for r in cell.rows if r.get("model")), cell.cell_id)
            label = f"{model} [{run.name}]" if ctx.multi else str(model)
            for path in sorted(folder.iterdir()):
                if not path.name.startswith("pattern") or not path.is_file() or path.stat().st_size > MAX_ARTIFACT_BYTES:
                    continue
                if path.suffix.lower() == ".png":
                    data = path.read_bytes()
                    if data.startswith(PNG_SIGNATURE):
                        pngs.append((label, path.stem, data))
                        copy = ctx.folder / f"{plots.slug(run.name + '__' + cell.cell_id + '__' + path.name)}"
                        shutil.copyfile(path, copy)
                        ctx.files.append(copy)
                elif path.suffix.lower() == ".npy":
                    try:
                        arrays.append((label, path.stem, np.load(path, allow_pickle=False)))
                    except (OSError, ValueError) as exc:
                        log.warning("pattern file %s is unreadable: %s", path, exc)
    return pngs, arrays


def section_patterns(ctx: ReportContext) -> Section | None:
    table = tables.pattern_table(ctx.frame)
    ctx.folder.mkdir(parents=True, exist_ok=True)
    pngs, arrays = _pattern_artifacts(ctx)
    if table.empty and not pngs and not arrays:
        return None
    sec = Section("patterns", "FractalBrainNet patterns")
    made = plots.plot_pattern_arrays(arrays, ctx.folder)
    if made or pngs:
        grid = "".join(figure(data, f"{label}: {name}") for label, name, data in pngs)
        sec.parts.append(ctx.figures(made) + (f'<div class="grid">{grid}</div>' if grid else ""))
    if not table.empty:
        sec.parts.append(ctx.figures(plots.plot_pattern_complexity(table, ctx.folder)))
        sec.parts.append(ctx.table(table, "pattern_analysis"))
    return sec


def section_errors(ctx: ReportContext) -> Section:
    sec = Section("errors", "Errors")
    table = tables.error_table(ctx.runs)
    if table.empty:
        sec.parts.append(note("No failed cells and no measurement errors."))
        return sec
    try:
        ctx.files.extend(tables.write_table(table, ctx.folder, "errors"))
    except OSError as exc:
        log.warning("could not write the error table: %s", exc)
    rows = []
    for r in table.itertuples(index=False):
        tb = f"<details><summary>traceback</summary><pre>{esc(r.traceback)}</pre></details>" if r.traceback else ""
        run = f"<td>{esc(r.run)}</td>" if ctx.multi else ""
        rows.append(f'<tr class="bad">{run}<td>{esc(r.cell)}</td><td>{esc(r.label)}</td><td>{esc(r.metric)}</td>'
                    f'<td class="error">{esc(r.error)}{tb}</td></tr>')
    head = ("<th>run</th>" if ctx.multi else "") + "<th>cell</th><th>model</th><th>metric</th><th>error</th>"
    sec.parts.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
    return sec


KNOWN_METRICS = {"params", "params_active", "top1", "top5", "macs", "flops", "expected_macs", "policy_top1", "exit_fraction",
                 "skip_rate", "gate_rate", "expert_load", "latency", "pattern_complexity", "hierarchy_score", "error",
                 *tables.MEMORY_METRICS}


def section_other(ctx: ReportContext) -> Section | None:
    table = tables.other_metrics_table(ctx.frame, KNOWN_METRICS)
    if table.empty:
        return None
    sec = Section("other", "Other metrics")
    sec.parts.append(note("Rows of metrics the sections above do not show (training time and losses, cross-checks, "
                          "metrics this report version does not know)."))
    sec.parts.append(f"<details><summary>{len(table)} rows</summary>{ctx.table(table, 'other_metrics')}</details>")
    return sec


def section_files(ctx: ReportContext) -> Section:
    sec = Section("files", "Files")
    names = sorted({p.name for p in ctx.files})
    sec.parts.append(note(f"Written beside this report in {ctx.folder}: plots as PNG and SVG, tables as CSV and Markdown."))
    sec.parts.append(f"<details><summary>{len(names)} files</summary><ul>"
                     + "".join(f"<li>{esc(n)}</li>" for n in names) + "</ul></details>")
    return sec


# ----- the page ------------------------------------------------------------------------------------

def render_page(title: str, subtitle: list[str], sections: Sequence[Section]) -> str:
    nav = "".join(f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.anchor)}"><h2>{esc(s.title)}</h2>{"".join(s.parts)}</section>' for s in sections)
    sub = "".join(f"<p>{esc(line)}</p>" for line in subtitle)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{esc(title)}</h1>{sub}</header><nav>{nav}</nav><main>{body}</main></body></html>\n")


def _safely(builder: Any, ctx: ReportContext) -> Section | None:
    """Run one section builder; a failure becomes a section that says so (the report is still written,
    as ``fractalbench run`` writes it after every run)."""
    try:
        return builder(ctx)
    except Exception as exc:  # noqa: BLE001 - one unreadable part must not cost the whole report
        log.warning("report section %s failed", builder.__name__, exc_info=True)
        name = builder.__name__.removeprefix("section_")
        return Section(name, f"Section '{name}'", [f'<p class="error">This section could not be built: '
                                                    f"{esc(type(exc).__name__)}: {esc(exc)}</p>"])


def build_report(runs: Sequence[Path | str], folder: Path) -> str:
    """The report's HTML for ``runs``; plots and tables are written into ``folder``."""
    data = tables.load_runs(runs)
    ctx = ReportContext(data, tables.combined_rows(data), folder)
    folder.mkdir(parents=True, exist_ok=True)
    builders = [section_suite, section_summary, section_reference, section_errors, section_tradeoffs, section_per_exit,
                section_dynamic, section_patterns, section_other]
    sections = [s for s in (_safely(b, ctx) for b in builders) if s is not None]
    sections.append(section_files(ctx))
    suites = sorted({str(r.suite.get("name", "?")) for r in data})
    title = f"fractalbench report: {', '.join(suites)}"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    subtitle = [f"runs: {', '.join(r.name for r in data)}", f"generated {now}",
                f"{len(ctx.frame)} result rows, {sum(len(r.cells) for r in data)} cells"]
    return render_page(title, subtitle, sections)


def write_report(runs: Sequence[Path | str], out: Path | str | None = None) -> Path:
    """Write the self-contained HTML report of ``runs`` and return its path.

    out: the HTML file (default ``<first run>/report.html``). Plot files (PNG, SVG) and tables
    (CSV, Markdown) go to ``<first run>/report/``. ValueError when a path is not a run directory.
    """
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if not runs:
        raise ValueError("write_report needs at least one run directory")
    paths = [tables.check_run_dir(r) for r in runs]
    out = Path(out) if out is not None else paths[0] / "report.html"
    if out.exists() and out.is_dir():
        raise ValueError(f"report path {out} is a directory; give a file name such as {out / 'report.html'}")
    page = build_report(paths, paths[0] / "report")
    atomic_write_text(out, page)
    return out
