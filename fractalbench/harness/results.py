"""Results: one versioned schema of tidy rows, written atomically cell by cell.

A run directory holds::

    environment.json        the run's environment (CPU, GPU, threads, library versions, commit)
    suite.json              the suite as resolved (identity + content hash)
    cells/<cell_id>.json    one file per finished cell: status, error, rows, artifacts
    artifacts/<cell_id>/    files a cell stored (pattern images, checkpoints)
    outcomes/<cell_id>.npz  per-sample right/wrong bits and exits of every accuracy row (fractalbench.harness.outcomes)
    results.csv, results.json   every row of every finished cell (rewritten after each cell)

Each row is a dict with the fields in ``ROW_FIELDS``. ``metric`` + ``unit`` say what ``value`` is
(e.g. metric "macs", unit "MACs"; metric "latency_p50", unit "ms"). A failed cell is stored as one
row with metric "error" and the message in ``error``. ``load_run`` returns a pandas DataFrame.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fractalbench.harness.catalogue import check_metric
from fractalbench.harness.stats import accuracy_interval

SCHEMA_VERSION = 1

ROW_FIELDS: tuple[str, ...] = (
    "schema_version", "run_id", "suite", "cell_id",
    "model", "variant", "dataset", "device", "seed", "batch_size",
    "exit", "policy", "threshold", "split",
    "metric", "unit", "value", "n", "std", "p50", "p90", "p99", "ci_low", "ci_high",
    "detail", "error",
)

_DEFAULTS: dict[str, Any] = {f: None for f in ROW_FIELDS}
_DEFAULTS.update(schema_version=SCHEMA_VERSION, variant="", policy="", split="", detail="", error="")


class ResultsError(ValueError):
    """A run directory or results file that cannot be read."""


def make_row(metric: str, value: float | None, unit: str, **fields: Any) -> dict[str, Any]:
    """One result row. A metric that is not in :mod:`fractalbench.harness.catalogue` (or a unit that is not
    its unit) raises, and so do unknown field names; ``detail`` may be a dict (stored as JSON).
    Accuracy rows with a sample count ``n`` get their 95 % Wilson interval (``ci_low``, ``ci_high``,
    in %; :func:`fractalbench.harness.stats.accuracy_interval`) unless given."""
    info = check_metric(metric, unit)
    unknown = set(fields) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"unknown result field(s) {sorted(unknown)}; allowed: {', '.join(ROW_FIELDS)}")
    row = dict(_DEFAULTS)
    row.update(fields)
    row.update(metric=metric, unit=unit, value=None if value is None else float(value))
    if info.kind == "accuracy" and row["value"] is not None and row["n"] and row["ci_low"] is None:
        row["ci_low"], row["ci_high"] = accuracy_interval(row["value"], int(row["n"]))
    if isinstance(row["detail"], (dict, list)):
        row["detail"] = json.dumps(row["detail"], sort_keys=True, default=_json_default)
    return row


def slug(text: object) -> str:
    """``text`` made safe as a file or cell name: runs of other characters become '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def field_row(metric: str, value: float | None, unit: str, fields: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """:func:`make_row` where the measurement's own fields (``extra``) take precedence over the
    caller's ``fields`` (so a caller passing e.g. ``exit`` never collides)."""
    return make_row(metric, value, unit, **{**fields, **extra})


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in results")


# The process's umask, read once at import (reading it means setting it, which is not safe while
# other threads create files): mkstemp creates its file 0600, and a result file should get the
# mode a plain open() would give it, so that others sharing the run directory can read it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half. The
    file gets the mode a plain ``open(path, "w")`` gives (0666 less the umask), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default, allow_nan=True))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class CellRecord:
    cell_id: str
    status: str  # "ok" or "error"
    rows: list[dict[str, Any]]
    error: str = ""
    meta: dict[str, Any] | None = None


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.cells_dir = self.run_dir / "cells"

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def artifact_dir(self, cell_id: str) -> Path:
        path = self.run_dir / "artifacts" / cell_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cell_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def is_done(self, cell_id: str) -> bool:
        """A cell counts as done when its file exists and reads back (ok or error)."""
        path = self.cell_path(cell_id)
        if not path.exists():
            return False
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return True

    def write_cell(self, record: CellRecord) -> None:
        rows = [{k: _clean(r.get(k)) for k in ROW_FIELDS} for r in record.rows]
        atomic_write_json(self.cell_path(record.cell_id), {
            "schema_version": SCHEMA_VERSION, "cell_id": record.cell_id, "status": record.status,
            "error": record.error, "meta": record.meta or {}, "rows": rows,
        })

    def read_cells(self) -> list[CellRecord]:
        if not self.cells_dir.is_dir():
            return []
        records = []
        for path in sorted(self.cells_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ResultsError(f"results file {path} is unreadable: {exc}") from None
            data = migrate_cell(data, path)
            records.append(CellRecord(data["cell_id"], data["status"], data["rows"], data.get("error", ""),
                                      data.get("meta")))
        return records

    def rows(self) -> list[dict[str, Any]]:
        return [row for rec in self.read_cells() for row in rec.rows]

    def write_tables(self) -> None:
        """Rewrite results.json and results.csv from the cell files."""
        import pandas as pd

        rows = self.rows()
        atomic_write_json(self.run_dir / "results.json", {"schema_version": SCHEMA_VERSION, "rows": rows})
        frame = pd.DataFrame(rows, columns=list(ROW_FIELDS))
        atomic_write_text(self.run_dir / "results.csv", frame.to_csv(index=False))

    def write_meta(self, name: str, obj: Mapping[str, Any]) -> None:
        atomic_write_json(self.run_dir / name, obj)

    def read_meta(self, name: str) -> dict[str, Any]:
        path = self.run_dir / name
        if not path.exists():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))


def migrate_cell(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Bring an older cell file up to SCHEMA_VERSION (there is only version 1 so far)."""
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(f"results file {path} has schema_version {version!r}; "
                           f"this fractalbench reads {SCHEMA_VERSION}")
    return data


def load_run(run_dir: Path | str) -> pandas.DataFrame:  # noqa: F821
    """Every row of a run as a pandas DataFrame (columns ``ROW_FIELDS``)."""
    import pandas as pd

    run_dir = Path(run_dir)
    if not (run_dir / "cells").is_dir():
        raise ResultsError(f"{run_dir} is not a fractalbench run directory (no cells/ folder inside)")
    return pd.DataFrame(RunStore(run_dir).rows(), columns=list(ROW_FIELDS))


def detail_of(value: Any) -> dict[str, Any]:
    """A row's ``detail`` decoded to a dict ({} when empty or not a JSON object)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.strip():
        return {}
    try:
        data = json.loads(value)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class RunData:
    """One run directory as read back: its rows (a DataFrame), cell records, suite and environment."""

    path: Path
    rows: pandas.DataFrame  # noqa: F821
    cells: list[CellRecord]
    suite: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)


def check_run_dir(path: Path | str) -> Path:
    """``path`` as a Path; ResultsError naming it when it is not a run directory."""
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"run directory {path} does not exist")
    if not (path / "cells").is_dir() and not (path / "suite.json").is_file():
        raise ResultsError(f"{path} is not a fractalbench run directory (no cells/ folder or suite.json inside)")
    return path


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def open_run(run_dir: Path | str) -> RunData:
    """Read one run directory: rows, cells, suite.json and environment.json (ResultsError if it is not one)."""
    import pandas as pd

    path = check_run_dir(run_dir)
    cells = RunStore(path).read_cells()
    frame = pd.DataFrame([r for c in cells for r in c.rows], columns=list(ROW_FIELDS))
    return RunData(path, frame, cells, _read_json_object(path / "suite.json"),
                   _read_json_object(path / "environment.json"))


EXPORTED_FILES = ("results.csv", "results.json", "environment.json", "suite.json", "report.html")


def export_run(run_dir: Path | str, dest: Path | str, command: str) -> list[Path]:
    """Copy what a committed reference run keeps (the way timm keeps its results tables): the cell
    files, results.csv/json, environment.json, suite.json, the per-sample outcomes (outcomes/), the
    HTML report and its report/ folder of plots and tables, plus COMMAND (the exact command that made
    the run). Checkpoints and other artifacts stay behind. ``dest`` is replaced file by file; returns
    the files written."""
    import shutil

    src, out = check_run_dir(run_dir), Path(dest)
    if out.resolve() == src.resolve():
        raise ResultsError(f"export destination {out} is the run directory itself")
    written = []
    for name in EXPORTED_FILES:
        if (src / name).is_file():
            out.mkdir(parents=True, exist_ok=True)
            written.append(Path(shutil.copy2(src / name, out / name)))
    for folder in ("cells", "outcomes", "report"):
        if (src / folder).is_dir():
            shutil.copytree(src / folder, out / folder, dirs_exist_ok=True)
            written.extend(sorted(p for p in (out / folder).rglob("*") if p.is_file()))
    atomic_write_text(out / "COMMAND", command.strip() + "\n")
    return [*written, out / "COMMAND"]


def rows_for(rows: Iterable[Mapping[str, Any]], **match: Any) -> list[Mapping[str, Any]]:
    """Rows whose fields equal every given value (a small helper for tests and reports)."""
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def label_in_process(rows: list[dict[str, Any]], why: str) -> list[dict[str, Any]]:
    """``rows`` with ``"isolated": false`` and ``"why": why`` added to each row's detail (latency and
    memory measured in the calling process, for a model that cannot be rebuilt in a worker)."""
    out = []
    for row in rows:
        detail = {**detail_of(row.get("detail")), "isolated": False, "why": why}
        out.append({**row, "detail": json.dumps(detail, sort_keys=True)})
    return out
