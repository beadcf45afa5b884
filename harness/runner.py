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
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.data import DatasetConfig, DataSplits, load_dataset
from harness.devices import check_device
from harness.environment import collect_environment, machine_info
from harness.outcomes import OUTCOMES_DIR, outcomes_path
from harness.preflight import precision_warnings, raise_for_suite
from harness.registry import ModelSpec, model_card
from harness.results import CellRecord, RunStore, make_row, slug
from harness.steps import CellState, plan_steps
from harness.suites import ModelEntry, Suite, SuiteError, parse_suite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One model on one dataset and device, with one seed. ``seed`` is set only when the suite lists
    several (``seeds``): then it is part of the cell id (``...__seed3``); else the suite's ``seed``."""

    model: ModelEntry
    dataset: DatasetConfig
    device: str
    seed: int | None = None

    @property
    def cell_id(self) -> str:
        parts = [self.model.display, self.dataset.label, self.device]
        return "__".join(slug(p) for p in parts) + ("" if self.seed is None else f"__seed{self.seed}")

    def train_seed(self, suite: Suite) -> int:
        return suite.seed if self.seed is None else self.seed


@dataclass
class RunSummary:
    run_dir: Path
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False


def plan_cells(suite: Suite, devices: list[str] | None = None) -> list[Cell]:
    """Every (dataset, seed, model, device) of the suite, in that order of nesting: the seeds are
    outside the models, so a run stopped part-way holds whole replicates (every model with the first
    seed before any model with the second), which a comparison of models can already use."""
    devs = devices or list(suite.devices)
    seeds: tuple[int | None, ...] = suite.seeds if len(suite.seeds) > 1 else (None,)
    return [Cell(m, d, dev, seed) for d in suite.datasets for seed in seeds for m in suite.models for dev in devs]


# Suite keys that do not change any cell's numbers (they only name, describe or choose cells, or say
# what a cluster job asks for; the seed of a cell of a several-seed suite is part of its own identity).
_NOT_IN_CELL_DIGEST = ("name", "description", "models", "datasets", "devices", "seeds", "resources")


def cell_digests(suite: Suite, devices: list[str] | None = None) -> dict[str, str]:
    """cell id -> digest of everything in the suite file that decides that cell's numbers: its model
    entry, its dataset entry and every shared section (train, evaluate, metrics, policies, seed...).
    Editing one model's entry changes only that model's cells."""
    raw = suite.raw
    shared = {k: v for k, v in raw.items() if k not in _NOT_IN_CELL_DIGEST}
    raw_models, raw_datasets = list(raw.get("models") or []), list(raw.get("datasets") or [])
    out = {}
    index = {(id(m), id(d)): (i, j) for i, m in enumerate(suite.models) for j, d in enumerate(suite.datasets)}
    for cell in plan_cells(suite, devices):
        m, d = index[id(cell.model), id(cell.dataset)]
        identity = {"shared": shared, "model": raw_models[m] if m < len(raw_models) else None,
                    "dataset": raw_datasets[d] if d < len(raw_datasets) else None}
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


REMEASURED = "remeasure-"  # stale/remeasure-<time>/: the records of cells set aside by --remeasure


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


def _earlier_record(store: RunStore, cell_id: str) -> list[dict[str, Any]]:
    """The rows of the newest record of ``cell_id`` set aside by --remeasure ([] if none)."""
    found = sorted((store.run_dir / "stale").glob(f"{REMEASURED}*/cells/{cell_id}.json"))
    if not found:
        return []
    try:
        return list(json.loads(found[-1].read_text(encoding="utf-8")).get("rows", []))
    except (OSError, json.JSONDecodeError):
        return []


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
        from harness.executors import check_executor

        check_executor(executor, jobs)
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
        from harness.executors import execution_info

        environment["execution"] = execution_info(executor, jobs)
    store.write_meta("environment.json", environment)
    cells = plan_cells(suite, devices)
    summary = RunSummary(out_dir)
    t0 = time.perf_counter()
    try:
        if in_process:
            _run_here(cells, suite, store, splits_cache, summary, progress, echo, environment["git_commit"])
        else:
            from harness.executors import run_elsewhere

            run_elsewhere(cells, suite, store, summary, echo, executor=executor, jobs=jobs,
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


def cell_fields(cell: Cell, suite: Suite, store: RunStore) -> dict[str, Any]:
    """The fields every row of ``cell`` carries (run, suite, cell id, model, dataset, device, seed)."""
    return {"run_id": store.run_id, "suite": suite.name, "cell_id": cell.cell_id, "model": cell.model.display,
            "variant": cell.model.name, "dataset": cell.dataset.label, "device": cell.device,
            "seed": cell.train_seed(suite)}


def cell_meta(cell: Cell, suite: Suite, commit: str) -> dict[str, Any]:
    """The start of a cell record's ``meta``: what ran (model, options, dataset, device, seed, commit)."""
    return {"model": cell.model.name, "kwargs": cell.model.kwargs, "dataset": cell.dataset.label,
            "device": cell.device, "seed": cell.train_seed(suite), "git_commit": commit}


def error_record(cell: Cell, suite: Suite, store: RunStore, message: str, meta: dict[str, Any]) -> CellRecord:
    """The record of a failed cell: one ``error`` row carrying ``message``."""
    return CellRecord(cell.cell_id, "error", [make_row("error", None, "", error=message,
                                                       **cell_fields(cell, suite, store))], message, meta)


def run_cell(cell: Cell, suite: Suite, store: RunStore, splits: DataSplits, progress: bool = False,
             commit: str = "") -> CellRecord:
    """Run one cell; any exception becomes an error record (KeyboardInterrupt propagates)."""
    fields = cell_fields(cell, suite, store)
    meta = cell_meta(cell, suite, commit)  # a resumed run's cells: maybe several commits
    try:
        spec = ModelSpec(cell.model.name, dict(cell.model.kwargs), splits.num_classes, splits.in_chans)
        torch.manual_seed(cell.train_seed(suite))
        model = spec.build()
        state = CellState(cell, suite, store, splits, spec, model, fields, progress,
                          previous_rows=_earlier_record(store, cell.cell_id))
        rows: list[dict[str, Any]] = []
        start, steps = time.perf_counter(), {}
        for step in plan_steps(state, frozenset(suite.metrics)):
            begun = time.perf_counter()
            rows.extend(step.run(state))
            steps[step.name] = round(time.perf_counter() - begun, 3)
        rows.append(make_row("cell_seconds", time.perf_counter() - start, "s", **fields,
                             detail={"steps": steps, "threads": torch.get_num_threads()}))
        if state.outcomes is not None:  # before the cell file: a finished cell always has its outcomes
            state.outcomes.save(outcomes_path(store.run_dir, cell.cell_id))
            meta["outcomes"] = f"{OUTCOMES_DIR}/{cell.cell_id}.npz"
        meta["machine"] = machine_info(cell.device)
        meta["spec"] = spec.to_dict()
        meta["data"] = splits.info
        meta["card"] = _card_dict(cell.model.name)
        return CellRecord(cell.cell_id, "ok", rows, meta=meta)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed cell is data, not a crash
        message = f"{type(exc).__name__}: {exc}"
        log.debug("cell %s failed:\n%s", cell.cell_id, traceback.format_exc())
        meta["traceback"] = traceback.format_exc(limit=8)
        return error_record(cell, suite, store, message, meta)


def _card_dict(name: str) -> dict[str, Any]:
    card = model_card(name)
    return {"family": card.family, "paper": card.paper, "dynamic_kind": card.dynamic_kind,
            "reference": dict(card.reference), "reference_source": card.reference_source, "notes": card.notes,
            "paper_recipe": card.paper_recipe}
