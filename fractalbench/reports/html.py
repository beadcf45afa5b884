"""The self-contained HTML report of one or more runs.

``write_report(runs, out)`` writes one HTML file (default ``<first run>/report.html``) that needs
nothing else: plots are embedded as base64 PNG, the style sheet is inline, there is no script, and
a Content-Security-Policy forbids loading anything from elsewhere. Beside it, ``<first run>/report/``
receives every plot as PNG and SVG and every table as CSV (raw values) and Markdown.

The page reads like an answer: it opens with accuracy vs MACs and the Pareto frontier, then a
short summary per model; everything else (trade-off tables, errors, reference numbers, per-exit
numbers, latency, memory, dynamic behaviour, exit statistics (:mod:`fractalbench.reports.sections_exits`),
patterns, training, suite and environment) is in collapsed sections. Python builds the page as
plain data (:mod:`fractalbench.reports.sections`, :mod:`fractalbench.reports.blocks`); the Jinja2 templates in
``reports/templates/`` render it with autoescaping on, so every string taken from the results is
escaped and none reaches the page as markup.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from fractalbench.harness.results import atomic_write_text, check_run_dir
from fractalbench.reports import tables
from fractalbench.reports.blocks import ErrorText, Section
from fractalbench.reports.sections import SECTIONS, Builder, ReportContext
from fractalbench.reports.sections_exits import section_exit_stats

log = logging.getLogger(__name__)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # as written in templates/report.html.j2

SectionSpec = tuple[str, str, Builder, bool]  # (anchor, title, builder, collapsed)
EXIT_STATS_SECTION: SectionSpec = ("exit_stats", "Exits: oracle, overthinking, calibration", section_exit_stats, True)


def page_sections(base: Sequence[SectionSpec] = SECTIONS) -> tuple[SectionSpec, ...]:
    """The page's sections in order: :data:`fractalbench.reports.sections.SECTIONS` with the exit statistics
    (:mod:`fractalbench.reports.sections_exits`) right after the dynamic-behaviour section (before the last,
    the files section, when there is none)."""
    anchors = [spec[0] for spec in base]
    at = anchors.index("dynamic") + 1 if "dynamic" in anchors else max(0, len(base) - 1)
    return (*base[:at], EXIT_STATS_SECTION, *base[at:])


def environment() -> jinja2.Environment:
    """The templates' environment: autoescaping on, and an undefined name is an error, not ''."""
    return jinja2.Environment(loader=jinja2.PackageLoader("fractalbench.reports", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_page(title: str, subtitle: Sequence[str], sections: Sequence[Section]) -> str:
    """The whole page (``templates/report.html.j2``)."""
    return environment().get_template("report.html.j2").render(title=title, subtitle=list(subtitle),
                                                                sections=list(sections))


def build_section(anchor: str, title: str, builder: Builder, collapsed: bool, ctx: ReportContext) -> Section | None:
    """Run one section builder; None when it has nothing to show. A failure becomes a section that
    says so (the report is still written, as ``fractalbench run`` writes it after every run)."""
    try:
        body = builder(ctx)
    except Exception as exc:  # noqa: BLE001 - one unreadable part must not cost the whole report
        log.warning("report section %s failed", anchor, exc_info=True)
        text = f"This section could not be built: {type(exc).__name__}: {exc}"
        return Section(anchor, title, [ErrorText(text)], collapsed, "could not be built", failed=True)
    if body is None:
        return None
    return Section(anchor, title, body.blocks, collapsed, body.hint)


def build_report(runs: Sequence[Path | str], folder: Path) -> str:
    """The report's HTML for ``runs``; plots and tables are written into ``folder``."""
    data = tables.load_runs(runs)
    ctx = ReportContext(data, tables.combined_rows(data), folder)
    folder.mkdir(parents=True, exist_ok=True)
    sections = [build_section(*spec, ctx) for spec in page_sections()]
    suites = sorted({str(r.suite.get("name", "?")) for r in data})
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    subtitle = [f"runs: {', '.join(r.name for r in data)}; generated {now}; "
                f"{len(ctx.frame)} result rows, {sum(len(r.cells) for r in data)} cells"]
    return render_page(f"fractalbench report: {', '.join(suites)}", subtitle, [s for s in sections if s])


def write_report(runs: Sequence[Path | str] | Path | str, out: Path | str | None = None) -> Path:
    """Write the self-contained HTML report of ``runs`` and return its path.

    out: the HTML file (default ``<first run>/report.html``). Plot files (PNG, SVG) and tables
    (CSV, Markdown) go to ``<first run>/report/``. ValueError (``fractalbench.harness.results.ResultsError``)
    when a path is not a run directory.
    """
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if not runs:
        raise ValueError("write_report needs at least one run directory")
    paths = [check_run_dir(r) for r in runs]
    out = Path(out) if out is not None else paths[0] / "report.html"
    if out.exists() and out.is_dir():
        raise ValueError(f"report path {out} is a directory; give a file name such as {out / 'report.html'}")
    page = build_report(paths, paths[0] / "report")
    atomic_write_text(out, page)
    return out
