"""The runner: suite -> cells (model x dataset x device) -> train -> measure -> rows on disk.

The steps of a cell and the typed state they share are in :mod:`harness.steps`. Each cell's rows
are written atomically as soon as it finishes; running the same run directory again skips
finished cells (resume); after an edit of the suite only the cells whose entry changed run again
(:func:`cell_digests`). A cell that raises is stored as an error row and the run goes
on. Ctrl-C stops the run after the finished cells are safely on disk. With ``jobs`` > 1 or a
submitit ``executor`` the cells run in other processes (:mod:`harness.executors`), with the same
per-cell files, resume and failure records.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import executors
from harness.cells import REMEASURED, Cell, dependency_chain, plan_cells, run_cell
from harness.data import DatasetConfig, DataSplits, load_dataset
from harness.devices import check_device
from harness.environment import collect_environment
from harness.outcomes import OUTCOMES_DIR, outcomes_path
from harness.preflight import precision_warnings, raise_for_suite
from harness.results import RunStore
from harness.suites import Suite, SuiteError, parse_suite

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_dir: Path
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False


# Suite keys that do not change any cell's numbers (they only name, describe or choose cells, or say
# what a cluster job asks for; the seed of a cell of a several-seed suite is part of its own identity).
_NOT_IN_CELL_DIGEST = ("name", "description", "models", "datasets", "devices", "seeds", "resources")


def _raw_label(entry: Any) -> str:
    """The label a raw YAML model entry gets (a bare name, or its ``label`` else its ``name``)."""
    if isinstance(entry, dict):
        return str(entry.get("label") or entry.get("name"))
    return str(entry)


def cell_digests(suite: Suite, devices: list[str] | None = None) -> dict[str, str]:
    """cell id -> digest of everything in the suite file that decides that cell's numbers: its model
    entry (found by its label in the whole suite as written, whatever ``--models`` kept), the entries
    it takes weights from (``cell:LABEL``), its dataset entry and every shared section (train,
    evaluate, metrics, policies, seed...). Editing one model's entry changes only that model's cells
    and those built on them."""
    raw = suite.raw
    shared = {k: v for k, v in raw.items() if k not in _NOT_IN_CELL_DIGEST}
    raw_models = {_raw_label(m): m for m in raw.get("models") or []}
    raw_datasets = list(raw.get("datasets") or [])
    out = {}
    for cell in plan_cells(suite, devices):
        d = next(j for j, ds in enumerate(suite.datasets) if ds is cell.dataset)
        identity = {"shared": shared, "model": raw_models.get(cell.model.display),
                    "dataset": raw_datasets[d] if d < len(raw_datasets) else None}
        upstream = [raw_models.get(dep.model.display) for dep in dependency_chain(cell, suite)]
        if upstream:
            identity["weights_from"] = upstream
        if cell.seed is not None:
            identity["seed"] = cell.seed
        out[cell.cell_id] = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out


def _check_run_dir(store: RunStore, suite: Suite, echo: Callable[[str], None]) -> None:
    """Refuse to mix two suites in one run directory; for a new version of the same suite, keep the
    finished cells whose identity (:func:`cell_digests`) is unchanged and move the others (cell file
    and artifacts, checkpoints included) to ``stale/<old digest>/`` so that they run again."""
    old = store.read_meta("suite.json")
    if not old or old.get("digest") == suite.digest:
        return
    refusal = (f"run directory {store.run_dir} holds results of suite {old.get('name')!r} with different content "
               f"(digest {old.get('digest')} vs {suite.digest}); give another --out to keep both")
    if old.get("name") != suite.name or not isinstance(old.get("content"), dict):
        raise SuiteError(refusal)
    try:
        before = cell_digests(parse_suite(old["content"], str(old.get("path", "suite.json"))))
    except SuiteError:
        raise SuiteError(refusal) from None
    now = cell_digests(suite)
    for path in sorted(store.cells_dir.glob("*.json")) if store.cells_dir.is_dir() else ():
        cell_id = path.stem
        if cell_id in now and before.get(cell_id) == now[cell_id]:
            continue
        stale = store.run_dir / "stale" / str(old.get("digest"))
        stale.mkdir(parents=True, exist_ok=True)
        path.replace(stale / path.name)
        for kept in (store.run_dir / "artifacts" / cell_id, outcomes_path(store.run_dir, cell_id)):
            if kept.exists():
                (stale / kept.parent.name).mkdir(exist_ok=True)
                kept.replace(stale / kept.parent.name / kept.name)
        echo(f"{cell_id}: its suite entry changed; the old result is in {stale}, the cell runs again")


def set_aside_for_remeasure(store: RunStore, cell_ids: list[str], echo: Callable[[str], None]) -> Path | None:
    """Move the finished cells' records (cell file and outcomes) to ``stale/remeasure-<time>/``,
    keeping their checkpoints: they run again, training resumes at its last epoch (so nothing
    retrains) and every measurement is made anew by the current code. A later run without
    ``--remeasure`` continues where an interrupted one stopped."""
    done = [c for c in cell_ids if store.is_done(c)]
    if not done:
        return None
    folder = store.run_dir / "stale" / f"{REMEASURED}{time.strftime('%Y%m%d-%H%M%S')}"
    for sub in ("cells", OUTCOMES_DIR):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for cell_id in done:
        store.cell_path(cell_id).replace(folder / "cells" / f"{cell_id}.json")
        if outcomes_path(store.run_dir, cell_id).exists():
            outcomes_path(store.run_dir, cell_id).replace(folder / OUTCOMES_DIR / f"{cell_id}.npz")
    echo(f"remeasure: {len(done)} finished cell(s) set aside in {folder}; they run again from their checkpoints")
    return folder


def run_suite(suite: Suite, out_dir: Path, *, devices: list[str] | None = None, progress: bool = False,
              echo: Callable[[str], None] = lambda s: None, remeasure: bool = False, jobs: int | None = None,
              executor: str = "process") -> RunSummary:
    """Run every cell of ``suite`` into ``out_dir``; finished cells there are skipped (with
    ``remeasure``: set aside first and measured again from their checkpoints). ``executor`` "process"
    with ``jobs`` None or 1 runs the cells one after the other in this process; more ``jobs``, or
    executor "local"/"slurm" (submitit), runs them elsewhere (:func:`harness.executors.run_elsewhere`)."""
    in_process = executor == "process" and (jobs or 1) == 1
    for dev in devices or suite.devices:
        check_device(dev)
    if not in_process:
        executors.check_executor(executor, jobs)
    store = RunStore(out_dir)
    _check_run_dir(store, suite, echo)
    splits_cache: dict[DatasetConfig, DataSplits] = {}
    for ds in suite.datasets:  # missing datasets fail before any cell runs
        splits_cache[ds] = load_dataset(ds)
    raise_for_suite(suite, splits_cache)  # and so does everything else that can be checked (harness.preflight)
    for line in precision_warnings(suite, devices or suite.devices):
        echo(line)
    if remeasure:
        set_aside_for_remeasure(store, [c.cell_id for c in plan_cells(suite, devices)], echo)
    out_dir.mkdir(parents=True, exist_ok=True)
    store.write_meta("suite.json", {"name": suite.name, "path": suite.path, "digest": suite.digest,
                                    "content": suite.raw})
    environment = collect_environment()
    if not in_process:
        environment["execution"] = executors.execution_info(executor, jobs)
    store.write_meta("environment.json", environment)
    cells = plan_cells(suite, devices)
    summary = RunSummary(out_dir)
    t0 = time.perf_counter()
    try:
        if in_process:
            _run_here(cells, suite, store, splits_cache, summary, progress, echo, environment["git_commit"])
        else:
            executors.run_elsewhere(cells, suite, store, summary, echo, executor=executor, jobs=jobs,
                          commit=environment["git_commit"], splits=splits_cache)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        store.write_tables()
        summary.seconds = time.perf_counter() - t0
    return summary


def _run_here(cells: list[Cell], suite: Suite, store: RunStore, splits_cache: dict[DatasetConfig, DataSplits],
              summary: RunSummary, progress: bool, echo: Callable[[str], None], commit: str) -> None:
    """Run ``cells`` one after the other in this process, writing each one's file as it finishes."""
    for i, cell in enumerate(cells, 1):
        if store.is_done(cell.cell_id):
            summary.skipped.append(cell.cell_id)
            echo(f"[{i}/{len(cells)}] {cell.cell_id}: already done, skipped")
            continue
        started = time.perf_counter()
        record = run_cell(cell, suite, store, splits_cache[cell.dataset], progress=progress, commit=commit)
        store.write_cell(record)
        store.write_tables()
        took = time.perf_counter() - started
        if record.status == "ok":
            summary.finished.append(cell.cell_id)
            echo(f"[{i}/{len(cells)}] {cell.cell_id}: ok ({took:.1f} s)")
        else:
            summary.failed.append(cell.cell_id)
            echo(f"[{i}/{len(cells)}] {cell.cell_id}: FAILED ({record.error.splitlines()[0]})")


