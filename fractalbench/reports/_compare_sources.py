"""The two sides of :mod:`fractalbench.reports.compare`: loading a run directory (its rows and its per-sample
outcomes, :mod:`fractalbench.harness.outcomes`), a baseline/results JSON file or a list of rows, and writing the
committed baseline file of a run (rows only: a baseline file carries no outcomes)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fractalbench.harness.outcomes import CellOutcomes, load_run_outcomes
from fractalbench.harness.results import SCHEMA_VERSION, RunStore, atomic_write_json, detail_of

BASELINE_DETAIL_KEYS = ("samples", "count", "exit_counts", "gate", "layer", "expert", "cost_unit", "thresholds",
                        "fitted_on", "length", "attention", "backend")


@dataclass
class Source:
    """One side of a comparison: its rows, the suite's ``compare`` section and, for a run directory,
    the per-sample outcomes of its cells (cell id -> :class:`~fractalbench.harness.outcomes.CellOutcomes`; ``{}``
    for baseline files, row lists and runs written before outcomes existed)."""

    label: str
    rows: list[dict[str, Any]]
    compare: dict[str, Any] = field(default_factory=dict)
    suite: dict[str, Any] = field(default_factory=dict)
    metrics: frozenset[str] | None = None  # a baseline file written with a metric filter: the metrics it kept
    outcomes: dict[str, CellOutcomes] = field(default_factory=dict)


def load_source(source: Path | str | Sequence[Mapping[str, Any]] | Source, what: str = "input") -> Source:
    """A run directory, a baseline/results JSON file, a list of rows or a Source; ValueError naming
    ``what`` (baseline/candidate) and the path when it is none of these."""
    if isinstance(source, Source):
        return source
    if isinstance(source, (list, tuple)):
        return Source(f"{what} rows", [dict(r) for r in source])
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # a pandas DataFrame
        return Source(f"{what} rows", source.to_dict("records"))
    if not isinstance(source, (str, Path)):
        raise ValueError(f"{what} must be a run directory, a baseline JSON file or a list of rows, "
                         f"got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist (expected a run directory or a baseline JSON file)")
    if path.is_dir():
        if not (path / "cells").is_dir():
            raise ValueError(f"{what} {path} is not a fractalbench run directory (no cells/ folder) "
                             "nor a baseline JSON file")
        store = RunStore(path)
        suite = store.read_meta("suite.json")
        content = suite.get("content") if isinstance(suite.get("content"), dict) else {}
        return Source(str(path), store.rows(), dict(content.get("compare") or {}),
                      {"name": suite.get("name"), "digest": suite.get("digest")}, outcomes=load_run_outcomes(path))
    return _load_file(path, what)


def _load_file(path: Path, what: str) -> Source:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is not a baseline JSON file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "schema_version" not in data:
        raise ValueError(f"{what} {path} is not a baseline JSON file (needs 'schema_version' and a 'rows' list)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{what} {path} has schema_version {data['schema_version']!r}; "
                         f"this fractalbench reads {SCHEMA_VERSION}")
    suite = data.get("suite") if isinstance(data.get("suite"), dict) else {}
    kept = data.get("metrics")
    metrics = frozenset(str(m) for m in kept) if isinstance(kept, list) else None
    rows = [dict(r) for r in data["rows"] if isinstance(r, dict)]
    return Source(str(path), rows, dict(data.get("compare") or {}), suite, metrics)


def _trim_detail(detail: Any) -> Any:
    d = detail_of(detail)
    kept = {k: d[k] for k in BASELINE_DETAIL_KEYS if k in d}
    return json.dumps(kept, sort_keys=True) if kept else ""


def write_baseline(run_dir: Path | str, path: Path | str, *, metrics: Iterable[str] | None = None) -> Path:
    """Write the committed baseline of a run: JSON with ``schema_version``, the suite's identity and
    ``compare`` thresholds, a short environment summary and the rows (detail trimmed to what the
    comparison uses, e.g. latency ``samples``). ``metrics``: keep only these metrics (recorded in the
    file; comparing against it then ignores the candidate's rows of other metrics)."""
    source = load_source(run_dir, "run")
    if not Path(run_dir).is_dir():
        raise ValueError(f"write_baseline needs a run directory, got {run_dir}")
    keep = set(metrics) if metrics is not None else None
    rows = []
    for row in source.rows:
        if keep is not None and row.get("metric") not in keep:
            continue
        kept = {k: v for k, v in row.items() if k not in ("run_id",)}
        rows.append({**kept, "detail": _trim_detail(row.get("detail"))})
    env = RunStore(run_dir).read_meta("environment.json")
    env_keys = ("cpu", "cpu_count", "torch_threads", "gpus", "libraries", "git_commit", "platform")
    env_summary = {k: env.get(k) for k in env_keys if k in env}
    out = Path(path)
    atomic_write_json(out, {"schema_version": SCHEMA_VERSION, "kind": "fractalbench-baseline",
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "source_run": str(run_dir), "suite": source.suite, "compare": source.compare,
                            "metrics": sorted(keep) if keep is not None else None,
                            "environment": env_summary, "rows": rows})
    return out
