"""One cell of a suite (a model on a dataset and device, with a seed): what it is, in which order the
cells run, and how one runs (:func:`run_cell`), wherever it runs.

The runner (:mod:`fractalbench.harness.runner`, cells in this process) and the executors
(:mod:`fractalbench.harness.executors`, cells in other processes or cluster jobs) both import this module, and
it imports neither, so there is one bookkeeping path for a cell whatever runs it.

A model entry may start from weights (:mod:`fractalbench.harness.weights`); ``weights: cell:LABEL`` makes the
cell depend on the cell of the entry labelled LABEL (same dataset, device and seed), whose trained
checkpoint it loads: :func:`plan_cells` puts every such dependency first and :func:`dependencies`
names it, so executors start a dependent cell only once its dependencies are done.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fractalbench.harness.data import DatasetConfig, DataSplits, with_normalisation
from fractalbench.harness.environment import machine_info
from fractalbench.harness.outcomes import OUTCOMES_DIR, outcomes_path
from fractalbench.harness.registry import ModelSpec, code_identity, model_card
from fractalbench.harness.results import CellRecord, RunStore, make_row, slug
from fractalbench.harness.steps import CellState, plan_steps
from fractalbench.harness.suites import ModelEntry, Suite
from fractalbench.harness.weights import (
    LoadedWeights,
    Normalisation,
    WeightsError,
    load_weights,
    one_normalisation,
    timm_pretrained,
)

log = logging.getLogger(__name__)

REMEASURED = "remeasure-"  # stale/remeasure-<time>/: the records of cells set aside by --remeasure


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


def models_in_order(suite: Suite) -> list[ModelEntry]:
    """The suite's model entries, each after the entry its ``weights: cell:LABEL`` names (otherwise
    in the suite's order; the schema refuses unknown labels and cycles)."""
    by_label = {m.display: m for m in suite.models}
    ordered: list[ModelEntry] = []

    def visit(entry: ModelEntry) -> None:
        if entry in ordered:
            return
        for label in entry.cell_sources:
            if label in by_label:
                visit(by_label[label])
        ordered.append(entry)

    for entry in suite.models:
        visit(entry)
    return ordered


def plan_cells(suite: Suite, devices: list[str] | None = None) -> list[Cell]:
    """Every (dataset, seed, model, device) of the suite (a model with ``datasets:`` on those only), in
    that order of nesting: the seeds are
    outside the models, so a run stopped part-way holds whole replicates (every model with the first
    seed before any model with the second), which a comparison of models can already use. Models
    run in :func:`models_in_order`."""
    devs = devices or list(suite.devices)
    seeds: tuple[int | None, ...] = suite.seeds if len(suite.seeds) > 1 else (None,)
    models = models_in_order(suite)
    return [Cell(m, d, dev, seed) for d in suite.datasets for seed in seeds for m in models for dev in devs
            if not m.datasets or d.label in m.datasets]


def direct_dependencies(cell: Cell, suite: Suite) -> list[Cell]:
    """The cells whose trained checkpoints ``cell`` starts from (``weights: cell:LABEL``, one per such
    source, in the entry's order)."""
    return [Cell(next(m for m in suite.models if m.display == label), cell.dataset, cell.device, cell.seed)
            for label in cell.model.cell_sources]


def dependency_chain(cell: Cell, suite: Suite) -> list[Cell]:
    """The cells that must be done before ``cell`` runs, each after its own dependencies."""
    out: list[Cell] = []

    def visit(current: Cell) -> None:
        for dep in direct_dependencies(current, suite):
            if dep not in out:
                visit(dep)
                out.append(dep)

    visit(cell)
    return out


def dependencies(cell: Cell, suite: Suite) -> list[str]:
    """The ids of :func:`dependency_chain`."""
    return [c.cell_id for c in dependency_chain(cell, suite)]


def earlier_record(store: RunStore, cell_id: str) -> list[dict[str, Any]]:
    """The rows of the newest record of ``cell_id`` set aside by --remeasure ([] if none)."""
    found = sorted((store.run_dir / "stale").glob(f"{REMEASURED}*/cells/{cell_id}.json"))
    if not found:
        return []
    try:
        return list(json.loads(found[-1].read_text(encoding="utf-8")).get("rows", []))
    except (OSError, json.JSONDecodeError):
        return []


def cell_fields(cell: Cell, suite: Suite, store: RunStore) -> dict[str, Any]:
    """The fields every row of ``cell`` carries (run, suite, cell id, model, dataset, device, seed)."""
    return {"run_id": store.run_id, "suite": suite.name, "cell_id": cell.cell_id, "model": cell.model.display,
            "variant": cell.model.name, "dataset": cell.dataset.label, "device": cell.device,
            "seed": cell.train_seed(suite)}


def cell_meta(cell: Cell, suite: Suite, commit: str) -> dict[str, Any]:
    """The start of a cell record's ``meta``: what ran (model, options, dataset, device, seed, commit)."""
    return {"model": cell.model.name, "kwargs": cell.model.kwargs, "dataset": cell.dataset.label,
            "device": cell.device, "seed": cell.train_seed(suite), "git_commit": commit,
            "code": code_identity(cell.model.name)}


def error_record(cell: Cell, suite: Suite, store: RunStore, message: str, meta: dict[str, Any]) -> CellRecord:
    """The record of a failed cell: one ``error`` row carrying ``message``."""
    return CellRecord(cell.cell_id, "error", [make_row("error", None, "", error=message,
                                                       **cell_fields(cell, suite, store))], message, meta)


def suite_folder(suite: Suite) -> Path:
    """Where a suite's relative weights paths are read from: the suite file's folder (the working
    directory for a suite that is not a file, e.g. the Python API's)."""
    path = Path(suite.path)
    return path.resolve().parent if path.is_file() else Path.cwd()


def dependency_checkpoint(cell: Cell, suite: Suite, store: RunStore, label: str | None) -> Path | None:
    """The trained checkpoint of the cell of entry ``label`` that ``cell`` starts from (None for no
    label); WeightsError when that cell did not finish well."""
    if label is None:
        return None
    dep = next(d for d in direct_dependencies(cell, suite) if d.model.display == label)
    record = store.read_meta(f"cells/{dep.cell_id}.json") if store.is_done(dep.cell_id) else None
    if record is None or record.get("status") != "ok":
        state = "failed" if record is not None else "has not run"
        raise WeightsError(f"weights cell:{dep.model.display}: the cell {dep.cell_id} {state}; this cell starts from "
                           "its trained checkpoint")
    return store.run_dir / "artifacts" / dep.cell_id / "model.pt"


def apply_weights(cell: Cell, suite: Suite, store: RunStore, model: torch.nn.Module, spec: ModelSpec,
                  splits: DataSplits) -> tuple[DataSplits, LoadedWeights | LoadedParts | None]:
    """Load the entry's weights into ``model`` (its own, timm's pretrained or another cell's) and
    normalise the data as they declare; the splits to use and what was loaded (None: no weights)."""
    entry = cell.model
    if entry.pretrained:
        loaded = timm_pretrained(model, entry.name, num_classes=spec.num_classes, in_chans=spec.in_chans,
                                 kwargs=spec.kwargs)
    elif entry.weights is not None:
        parts = [load_weights(model, cfg, base_dir=suite_folder(suite), name=entry.display,
                              cell_checkpoint=dependency_checkpoint(cell, suite, store,
                                                                    cfg.cell_label if cfg.kind == "cell" else None))
                 for cfg in entry.weights]
        loaded = parts[0] if len(parts) == 1 else LoadedParts(parts, one_normalisation(parts))
    else:
        return splits, None
    if loaded.normalisation is not None:
        norm = loaded.normalisation
        splits = with_normalisation(splits, norm.mean, norm.std, norm.declared_by)
    return splits, loaded


@dataclass
class LoadedParts:
    """Several weights loaded into parts of one model (``into``) and the normalisation they share."""

    parts: list[LoadedWeights]
    normalisation: Normalisation | None

    def info(self) -> list[dict[str, Any]]:
        return [part.info() for part in self.parts]


def run_cell(cell: Cell, suite: Suite, store: RunStore, splits: DataSplits, progress: bool = False,
             commit: str = "") -> CellRecord:
    """Run one cell; any exception becomes an error record (KeyboardInterrupt propagates)."""
    fields = cell_fields(cell, suite, store)
    meta = cell_meta(cell, suite, commit)  # a resumed run's cells: maybe several commits
    try:
        spec = ModelSpec(cell.model.name, dict(cell.model.kwargs), splits.num_classes, splits.in_chans)
        torch.manual_seed(cell.train_seed(suite))
        model = spec.build()
        splits, loaded = apply_weights(cell, suite, store, model, spec, splits)
        if loaded is not None:
            meta["weights"] = loaded.info()
        state = CellState(cell, suite, store, splits, spec, model, fields, progress,
                          previous_rows=earlier_record(store, cell.cell_id),
                          normalisation=loaded.normalisation if loaded is not None else None)
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
        meta["card"] = card_dict(cell.model.name)
        return CellRecord(cell.cell_id, "ok", rows, meta=meta)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed cell is data, not a crash
        message = f"{type(exc).__name__}: {exc}"
        log.debug("cell %s failed:\n%s", cell.cell_id, traceback.format_exc())
        meta["traceback"] = traceback.format_exc(limit=8)
        return error_record(cell, suite, store, message, meta)


def card_dict(name: str) -> dict[str, Any]:
    card = model_card(name)
    return {"family": card.family, "paper": card.paper, "dynamic_kind": card.dynamic_kind,
            "reference": dict(card.reference), "reference_source": card.reference_source, "notes": card.notes,
            "paper_recipe": card.paper_recipe}
