"""The FractalBrainNet patterns section: each pattern against the uniform control
(:mod:`fractalbench.reports.pattern_control`), pattern images a cell stored (``artifacts/<cell>/pattern*``,
PNG or .npy) and the pattern analysis rows (complexity per level, hierarchy score)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fractalbench.reports import pattern_control, plots, tables
from fractalbench.reports.blocks import Body, Grid, figure_block
from fractalbench.reports.frame import run_label

if TYPE_CHECKING:
    from fractalbench.reports.sections import ReportContext

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_ARTIFACT_BYTES = 16 * 2**20


@dataclass
class PatternFiles:
    """Stored pattern images: PNGs as (label, name, bytes), arrays as (label, name, array)."""

    pngs: list[tuple[str, str, bytes]]
    arrays: list[tuple[str, str, np.ndarray]]


def _is_pattern_file(path: Path) -> bool:
    return path.name.startswith("pattern") and path.is_file() and path.stat().st_size <= MAX_ARTIFACT_BYTES


def pattern_files(ctx: ReportContext) -> PatternFiles:
    """Every readable pattern file of every cell; PNGs are copied beside the report's plots."""
    found = PatternFiles([], [])
    for run in ctx.runs:
        for cell in run.cells:
            folder = run.path / "artifacts" / cell.cell_id
            if not folder.is_dir():
                continue
            label = run_label(next((r.get("model") for r in cell.rows if r.get("model")), cell.cell_id), run, ctx.multi)
            for path in sorted(folder.iterdir()):
                if not _is_pattern_file(path):
                    continue
                if path.suffix.lower() == ".png":
                    data = path.read_bytes()
                    if data.startswith(PNG_SIGNATURE):
                        found.pngs.append((label, path.stem, data))
                        copy = ctx.folder / plots.slug(f"{run.name}__{cell.cell_id}__{path.name}")
                        shutil.copyfile(path, copy)
                        ctx.files.append(copy)
                elif path.suffix.lower() == ".npy":
                    try:
                        found.arrays.append((label, path.stem, np.load(path, allow_pickle=False)))
                    except (OSError, ValueError) as exc:
                        log.warning("pattern file %s is unreadable: %s", path, exc)
    return found


def section(ctx: ReportContext) -> Body | None:
    """Each pattern against the uniform control (when a run has one), pattern images in a grid,
    complexity per level as a plot and a table; None when there is nothing."""
    table = tables.pattern_table(ctx.frame)
    control = pattern_control.control_table(ctx.runs)
    ctx.folder.mkdir(parents=True, exist_ok=True)
    files = pattern_files(ctx)
    if table.empty and control.empty and not files.pngs and not files.arrays:
        return None
    blocks: list = ctx.table(control, "pattern_control", pattern_control.CAPTION)
    blocks += ctx.figures(plots.plot_pattern_arrays(files.arrays, ctx.folder))
    if files.pngs:
        blocks.append(Grid([figure_block(data, f"{label}: {name}") for label, name, data in files.pngs]))
    if not table.empty:
        blocks += ctx.figures(plots.plot_pattern_complexity(table, ctx.folder))
        blocks += ctx.table(table, "pattern_analysis")
    return Body(blocks)
