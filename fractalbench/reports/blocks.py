"""The report page as plain data: sections made of blocks (notes, tables, figures, ...).

Python builds these from the results; the Jinja2 templates in ``reports/templates/`` turn them
into HTML (with autoescaping, so every string here is text, never markup). Each block's ``kind``
names the template macro that renders it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from fractalbench.reports.formatting import formatted

MAX_TABLE_ROWS = 400


@dataclass(frozen=True)
class Note:
    text: str
    kind: ClassVar[str] = "note"


@dataclass(frozen=True)
class ErrorText:
    text: str
    kind: ClassVar[str] = "error"


@dataclass(frozen=True)
class Heading:
    text: str
    kind: ClassVar[str] = "heading"


@dataclass(frozen=True)
class TableRow:
    cells: list[str]
    mark: bool = False


@dataclass(frozen=True)
class Table:
    """A table as text: headers, rows of cell strings, which columns are numbers (right-aligned),
    rows marked (e.g. on the Pareto frontier) and how many rows were left to the CSV file."""

    headers: list[str]
    numeric: list[bool]
    rows: list[TableRow]
    caption: str = ""
    more: int = 0
    kind: ClassVar[str] = "table"


@dataclass(frozen=True)
class Figure:
    """A PNG embedded as base64 text, with its title and caption."""

    title: str
    data: str
    caption: str = ""
    kind: ClassVar[str] = "figure"


@dataclass(frozen=True)
class Grid:
    figures: list[Figure]
    kind: ClassVar[str] = "grid"


@dataclass(frozen=True)
class Details:
    """A collapsed part: ``summary`` is the line shown, ``blocks`` what opens."""

    summary: str
    blocks: list[Any]
    kind: ClassVar[str] = "details"


@dataclass(frozen=True)
class KeyValues:
    items: list[tuple[str, str]]
    kind: ClassVar[str] = "key_values"


@dataclass(frozen=True)
class Pre:
    text: str
    kind: ClassVar[str] = "pre"


@dataclass(frozen=True)
class ErrorRow:
    run: str
    cell: str
    label: str
    metric: str
    error: str
    traceback: str


@dataclass(frozen=True)
class ErrorTable:
    """Failed cells and measurements; ``multi``: show the run column."""

    rows: list[ErrorRow]
    multi: bool
    kind: ClassVar[str] = "error_table"


@dataclass(frozen=True)
class ItemList:
    items: list[str]
    kind: ClassVar[str] = "item_list"


@dataclass
class Body:
    """What a section builder returns: the blocks, and a short hint shown beside a collapsed title."""

    blocks: list[Any] = field(default_factory=list)
    hint: str = ""


@dataclass
class Section:
    """One section of the page. ``collapsed``: a closed <details> (all but the headline and summary)."""

    anchor: str
    title: str
    blocks: list[Any]
    collapsed: bool = True
    hint: str = ""
    failed: bool = False


def table_block(table: pd.DataFrame, caption: str = "", highlight: str | None = None,
                max_rows: int = MAX_TABLE_ROWS) -> Table:
    """``table`` as text. ``highlight``: a boolean column that marks rows (and is not shown)."""
    has_mark = bool(highlight) and highlight in table
    marks = table[highlight].astype(bool).tolist() if has_mark else [False] * len(table)
    shown = table.drop(columns=[highlight]) if has_mark else table
    numeric = [pd.api.types.is_numeric_dtype(shown[c]) and not pd.api.types.is_bool_dtype(shown[c])
               for c in shown.columns]
    rows = [TableRow(cells, mark) for mark, cells in zip(marks[:max_rows], formatted(shown.head(max_rows)))]
    return Table([str(c) for c in shown.columns], numeric, rows, caption, max(0, len(table) - max_rows))


def figure_block(png: bytes, title: str, caption: str = "") -> Figure:
    return Figure(title, base64.b64encode(png).decode("ascii"), caption)


def key_values(items: dict[str, Any]) -> KeyValues:
    """Key-value pairs as text (non-strings as JSON)."""
    import json

    return KeyValues([(str(k), v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in items.items()])
