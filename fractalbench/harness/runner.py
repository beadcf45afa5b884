"""The runner: suite -> cells (model x dataset x device) -> train -> measure -> rows on disk.

The steps of a cell and the typed state they share are in :mod:`fractalbench.harness.steps`. Each cell's rows
are written atomically as soon as it finishes; running the same run directory again skips
finished cells (resume); after an edit of the suite only the cells whose entry changed run again
(:func:`cell_digests`). A cell that raises is stored as an error row and the run goes
on. Ctrl-C stops the run after the finished cells are safely on disk. With ``jobs`` > 1 or a
submitit ``executor`` the cells run in other processes (:mod:`fractalbench.harness.executors`), with the same
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

from fractalbench.harness import executors
from fractalbench.harness.cells import REMEASURED, Cell, dependency_chain, plan_cells, run_cell
from fractalbench.harness.data import DatasetConfig, DataSplits, load_dataset
from fractalbench.harness.devices import check_device
from fractalbench.harness.environment import collect_environment
from fractalbench.harness.outcomes import OUTCOMES_DIR, outcomes_path
from fractalbench.harness.preflight import precision_warnings, raise_for_suite
from fractalbench.harness.results import RunStore
from fractalbench.harness.suites import Suite, SuiteError, parse_suite

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
# ``compare`` holds the regression thresholds of `fractalbench compare`: no cell's number depends on them.
_NOT_IN_CELL_DIGEST = ("name", "description", "models", "datasets", "devices", "seeds", "resources", "compare")
# Suite keys that decide how a trained model is measured, not how it is trained: a change of only these
# keeps a finished cell's checkpoint, and the cell is measured again from it (no retraining).
MEASUREMENT_KEYS = ("evaluate", "metrics", "latency", "memory", "cost", "policies", "budgets",
                    "serving")


def _raw_label(entry: Any) -> str:
    """The label a raw YAML model entry gets (a bare name, or its ``label`` else its ``name``)."""
    if isinstance(entry, dict):
        return str(entry.get("label") or entry.get("name"))
    return str(entry)


def cell_digests(suite: Suite, devices: list[str] | None = None, part: str = "all") -> dict[str, str]:
    """cell id -> digest of everything in the suite file that decides that cell's numbers: its model
    entry (found by its label in the whole suite as written, whatever ``--models`` kept), the entries
    it takes weights from (``cell:LABEL``), its dataset entry and every shared section (train,
    evaluate, metrics, policies, seed...). Editing one model's entry changes only that model's cells
    and those built on them."""
    raw = suite.raw
    if part not in ("all", "training"):
        raise ValueError(f"part must be 'all' or 'training', got {part!r}")
    shared = {k: v for k, v in raw.items() if k not in _NOT_IN_CELL_DIGEST
              and (part == "all" or k not in MEASUREMENT_KEYS)}
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
    and artifacts, checkpoints included) to ``stale/<old digest>/`` so that they run again; a cell
    whose training identity is unchanged (only :data:`MEASUREMENT_KEYS` differ) keeps its checkpoint
    and is measured again from it."""
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
    whole = parse_suite(suite.raw, suite.path) if suite.raw else suite  # every model, whatever --models kept
    now = cell_digests(whole)
    trained_before = cell_digests(parse_suite(old["content"], str(old.get("path", "suite.json"))), part="training")
    trained_now = cell_digests(whole, part="training")
    for path in sorted(store.cells_dir.glob("*.json")) if store.cells_dir.is_dir() else ():
        cell_id = path.stem
        if cell_id in now and before.get(cell_id) == now[cell_id]:
            continue
        if cell_id in trained_now and trained_before.get(cell_id) == trained_now[cell_id]:
            stale = _set_aside(store, cell_id, str(old.get("digest")), keep_artifacts=True)
            echo(f"{cell_id}: only the measurement settings changed; the old result is in {stale}, the cell is "
                 "measured again from its checkpoint (no retraining)")
            continue
        stale = _set_aside(store, cell_id, str(old.get("digest")))
        echo(f"{cell_id}: its suite entry changed; the old result is in {stale}, the cell runs again")


def _set_aside(store: RunStore, cell_id: str, folder: str, keep_artifacts: bool = False) -> Path:
    """Move a finished cell's record, outcomes and artifacts (checkpoints included) to
    ``stale/<folder>/``, so that it runs again from scratch (``keep_artifacts``: its checkpoints stay,
    so its training resumes at its last epoch and only the measurements run again); the folder."""
    stale = store.run_dir / "stale" / folder
    stale.mkdir(parents=True, exist_ok=True)
    store.cell_path(cell_id).replace(stale / store.cell_path(cell_id).name)
    moved = [outcomes_path(store.run_dir, cell_id)]
    if not keep_artifacts:
        moved.insert(0, store.run_dir / "artifacts" / cell_id)
    for kept in moved:
        if kept.exists():
            (stale / kept.parent.name).mkdir(exist_ok=True)
            target = stale / kept.parent.name / kept.name
            if target.exists():  # a cell set aside twice in one second: keep the newer
                import shutil

                shutil.rmtree(target) if target.is_dir() else target.unlink()
            kept.replace(target)
    return stale


def seed_from_export(store: RunStore, suite: Suite, export: Path, echo: Callable[[str], None],
                     devices: list[str] | None = None) -> list[str]:
    """Take into the run the finished cells of an exported run (``fractalbench export``: cell files and
    outcomes, no checkpoints) whose identity (:func:`cell_digests`, against the whole suite) is the
    same in the export's suite and in ``suite``, and that the run does not hold yet: a reference run
    continued on another machine or in a later session from what was committed. A cell that another
    cell of the suite starts from (``weights: cell:LABEL``) is taken only with every such dependent
    (it has no checkpoint to start from), and a dependent only with its backbone (a backbone trained
    again is another network); only ``ok`` cells are taken. The ids taken."""
    import shutil

    from fractalbench.harness.results import ResultsError, check_run_dir

    try:
        source = RunStore(check_run_dir(export))
    except ResultsError as exc:
        raise SuiteError(f"--from {export}: {exc}") from None
    old = source.read_meta("suite.json")
    if old.get("name") != suite.name or not isinstance(old.get("content"), dict):
        raise SuiteError(f"--from {export}: it holds a run of suite {old.get('name')!r}, not {suite.name!r}")
    whole = parse_suite(suite.raw, suite.path) if suite.raw else suite
    try:
        before = cell_digests(parse_suite(old["content"], str(old.get("path", "suite.json"))))
    except SuiteError as exc:
        raise SuiteError(f"--from {export}: its suite.json no longer parses ({exc})") from None
    now, cells = cell_digests(whole), plan_cells(whole, devices)
    takeable = set()
    for cell in cells:
        record = source.read_meta(f"cells/{cell.cell_id}.json") if source.is_done(cell.cell_id) else {}
        if (record.get("status") == "ok" and before.get(cell.cell_id) == now[cell.cell_id]
                and not store.is_done(cell.cell_id)):
            takeable.add(cell.cell_id)
    changed = True
    while changed:  # a backbone comes only with everything built on it, and a cell only with its backbone
        changed = False
        for cell in cells:
            chain = {d.cell_id for d in dependency_chain(cell, whole)}
            if cell.cell_id not in takeable and not store.is_done(cell.cell_id):
                if chain & takeable:  # it runs and needs their checkpoints, which the export lacks
                    takeable -= chain
                    changed = True
            elif cell.cell_id in takeable and any(d not in takeable and not store.is_done(d) for d in chain):
                takeable.discard(cell.cell_id)  # its backbone runs again: it would stand on another one
                changed = True
    store.cells_dir.mkdir(parents=True, exist_ok=True)
    for cell_id in sorted(takeable):
        found = outcomes_path(source.run_dir, cell_id)
        if found.exists():
            outcomes_path(store.run_dir, cell_id).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(found, outcomes_path(store.run_dir, cell_id))
        shutil.copy2(source.cell_path(cell_id), store.cell_path(cell_id))
        echo(f"{cell_id}: taken from {export} (unchanged; no checkpoint)")
    return sorted(takeable)


def _with_dependents(chosen: set[str], cells: list[Cell], suite: Suite) -> set[str]:
    """``chosen`` and every cell that starts from one of them (``weights: cell:LABEL``, transitively)."""
    return chosen | {c.cell_id for c in cells if set(d.cell_id for d in dependency_chain(c, suite)) & chosen}


def rerun_cells(suite: Suite, names: list[str], devices: list[str] | None = None) -> list[str]:
    """The cell ids ``--rerun NAME...`` chooses: cells whose label or model name is one of ``names``
    (SuiteError naming the unknown ones and the labels there are), and the cells that start from them."""
    cells = plan_cells(suite, devices)
    labels = sorted({c.model.display for c in cells})
    unknown = [n for n in names if not any(n in (c.model.display, c.model.name) for c in cells)]
    if unknown:
        import difflib

        close = sorted({m for n in unknown for m in difflib.get_close_matches(n, labels, n=3, cutoff=0.6)})
        raise SuiteError(f"--rerun: no model {', '.join(map(repr, unknown))} in suite {suite.name}"
                         + (f"; did you mean: {', '.join(close)}?" if close else "")
                         + f" (its models: {', '.join(labels)})")
    chosen = {c.cell_id for c in cells if c.model.display in names or c.model.name in names}
    return sorted(_with_dependents(chosen, cells, suite))


def check_finished_cells(store: RunStore, suite: Suite, cells: list[Cell], echo: Callable[[str], None],
                         rerun: list[str] = ()) -> list[str]:
    """Before a run: set aside (:func:`_set_aside`, checkpoints included) the finished cells chosen by
    ``rerun`` and those made by other code that changes their numbers (:func:`registry.code_change`:
    a user's model code edited, a family's card version bumped), with the cells that start from
    them; report a family file changed at the same version without rerunning. The ids set aside."""
    from fractalbench.harness.registry import code_change, code_identity

    stamp = time.strftime("%Y%m%d-%H%M%S")
    why: dict[str, str] = {c: "--rerun" for c in rerun if store.is_done(c)}
    identities: dict[str, Any] = {}
    for cell in cells:
        if cell.cell_id in why or not store.is_done(cell.cell_id):
            continue
        record = store.read_meta(f"cells/{cell.cell_id}.json") or {}
        name = cell.model.name
        if name not in identities:
            identities[name] = code_identity(name)
        change = code_change((record.get("meta") or {}).get("code"), identities[name])
        if change and change[0] == "rerun":
            why[cell.cell_id] = change[1]
        elif change:
            echo(f"{cell.cell_id}: {change[1]}")
    for dependent in sorted(_with_dependents(set(why), cells, suite) - set(why)):
        if store.is_done(dependent):
            why[dependent] = "it starts from a cell that runs again"
    for cell_id, reason in sorted(why.items()):
        folder = _set_aside(store, cell_id, f"rerun-{stamp}")
        echo(f"{cell_id}: {reason}; the old result is in {folder}, the cell runs again")
    return sorted(why)


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
              executor: str = "process", rerun: list[str] | None = None,
              seed_from: Path | None = None) -> RunSummary:
    """Run every cell of ``suite`` into ``out_dir``; finished cells there are skipped (with
    ``remeasure``: set aside first and measured again from their checkpoints; those of the models named
    in ``rerun``, and those made by other code, run again from scratch: :func:`check_finished_cells`;
    ``seed_from``: an exported run whose unchanged finished cells are taken first, :func:`seed_from_export`).
    ``executor`` "process"
    with ``jobs`` None or 1 runs the cells one after the other in this process; more ``jobs``, or
    executor "local"/"slurm" (submitit), runs them elsewhere (:func:`fractalbench.harness.executors.run_elsewhere`)."""
    in_process = executor == "process" and (jobs or 1) == 1
    for dev in devices or suite.devices:
        check_device(dev)
    if not in_process:
        executors.check_executor(executor, jobs)
    chosen = rerun_cells(suite, list(rerun), devices) if rerun else []
    store = RunStore(out_dir)
    _check_run_dir(store, suite, echo)
    splits_cache: dict[DatasetConfig, DataSplits] = {}
    for ds in suite.datasets:  # missing datasets fail before any cell runs
        splits_cache[ds] = load_dataset(ds)
    if seed_from is not None:
        seed_from_export(store, suite, seed_from, echo, devices)
    planned = plan_cells(suite, devices)
    finished = {c.model.display for c in planned} - {c.model.display for c in planned if not store.is_done(c.cell_id)}
    # and everything else that can be checked (harness.preflight); entries already done are not built again
    raise_for_suite(suite, splits_cache, finished=finished if not (chosen or remeasure) else ())
    for line in precision_warnings(suite, devices or suite.devices):
        echo(line)
    check_finished_cells(store, suite, plan_cells(suite, devices), echo, chosen)
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


