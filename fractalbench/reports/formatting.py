"""Table cells as text, and tables written as CSV (raw values) and Markdown (formatted)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fractalbench.harness.results import atomic_write_text


def format_value(value: Any) -> str:
    """A cell as text: '' for missing, thousands separators for large whole numbers, else 4
    significant digits."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if abs(v) >= 10_000 or (v == int(v) and abs(v) >= 1000):
            return f"{v:,.0f}"
        if v == int(v) and abs(v) < 1000:
            return str(int(v))
        return f"{v:.4g}"
    return str(value)


def formatted(table: pd.DataFrame) -> list[list[str]]:
    """Every cell of ``table`` through :func:`format_value`, row by row."""
    return [[format_value(v) for v in row] for row in table.itertuples(index=False, name=None)]


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub Markdown table (pipes and newlines in cells escaped)."""
    from tabulate import tabulate

    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")

    rows = [[cell(v) for v in r] for r in formatted(table)]
    return tabulate(rows, headers=[cell(str(c)) for c in table.columns], tablefmt="github", disable_numparse=True)


def write_table(table: pd.DataFrame, folder: Path, name: str) -> list[Path]:
    """``name``.csv (raw values) and ``name``.md (formatted) in ``folder``; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / f"{name}.csv", folder / f"{name}.md"
    atomic_write_text(csv_path, table.to_csv(index=False))
    atomic_write_text(md_path, to_markdown(table) + "\n")
    return [csv_path, md_path]
