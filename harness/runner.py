"""The runner: suite -> cells (model x dataset x device) -> train -> measure -> rows on disk.

Each cell's rows are written atomically as soon as it finishes; running the same run directory
again skips finished cells (resume). A cell that raises is stored as an error row and the run goes
on. Ctrl-C stops the run after the finished cells are safely on disk.
"""
from __future__ import annotations

import logging
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness.data import DataSplits, DatasetConfig, load_dataset
from harness.environment import collect_environment
from harness.registry import ModelSpec, model_card
from harness.results import CellRecord, RunStore, make_row
from harness.suites import ModelEntry, PolicyConfig, Suite, SuiteError, check_device, train_config_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    model: ModelEntry
    dataset: DatasetConfig
    device: str

    @property
    def cell_id(self) -> str:
        return "__".join(slug(p) for p in (self.model.display, self.dataset.label, self.device))


@dataclass
class CellContext:
    """What every measurement step of a cell can use."""

    cell: Cell
    suite: Suite
    store: RunStore
    splits: DataSplits
    spec: ModelSpec
    model: torch.nn.Module
    checkpoint: Path | None
    fields: dict[str, Any]
    cache: dict[str, Any] = field(default_factory=dict)

    def row(self, metric: str, value: float | None, unit: str, **extra: Any) -> dict[str, Any]:
        return make_row(metric, value, unit, **{**self.fields, **extra})


Step = Callable[[CellContext], list[dict[str, Any]]]


@dataclass
class RunSummary:
    run_dir: Path
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def plan_cells(suite: Suite, devices: list[str] | None = None) -> list[Cell]:
    devs = devices or list(suite.devices)
    return [Cell(m, d, dev) for d in suite.datasets for m in suite.models for dev in devs]


def _check_run_dir(store: RunStore, suite: Suite) -> None:
    """Refuse to mix results of two different suites in one run directory."""
    old = store.read_meta("suite.json")
    if old and old.get("digest") != suite.digest:
        raise SuiteError(
            f"run directory {store.run_dir} holds results of suite {old.get('name')!r} with different content "
            f"(digest {old.get('digest')} vs {suite.digest}); give another --out to keep both")


def run_suite(suite: Suite, out_dir: Path, *, devices: list[str] | None = None, progress: bool = False,
              echo: Callable[[str], None] = lambda s: None) -> RunSummary:
    """Run every cell of ``suite`` into ``out_dir``; finished cells there are skipped."""
    for dev in devices or suite.devices:
        check_device(dev)
    store = RunStore(out_dir)
    _check_run_dir(store, suite)
    out_dir.mkdir(parents=True, exist_ok=True)
    store.write_meta("suite.json", {"name": suite.name, "path": suite.path, "digest": suite.digest, "content": suite.raw})
    store.write_meta("environment.json", collect_environment())
    cells = plan_cells(suite, devices)
    summary = RunSummary(out_dir)
    t0 = time.perf_counter()
    splits_cache: dict[DatasetConfig, DataSplits] = {}
    for ds in suite.datasets:  # missing datasets fail before any cell runs
        splits_cache[ds] = load_dataset(ds)
    try:
        for i, cell in enumerate(cells, 1):
            if store.is_done(cell.cell_id):
                summary.skipped.append(cell.cell_id)
                echo(f"[{i}/{len(cells)}] {cell.cell_id}: already done, skipped")
                continue
            started = time.perf_counter()
            record = run_cell(cell, suite, store, splits_cache[cell.dataset], progress=progress)
            store.write_cell(record)
            store.write_tables()
            took = time.perf_counter() - started
            if record.status == "ok":
                summary.finished.append(cell.cell_id)
                echo(f"[{i}/{len(cells)}] {cell.cell_id}: ok ({took:.1f} s)")
            else:
                summary.failed.append(cell.cell_id)
                echo(f"[{i}/{len(cells)}] {cell.cell_id}: FAILED ({record.error.splitlines()[0]})")
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        store.write_tables()
        summary.seconds = time.perf_counter() - t0
    return summary


def run_cell(cell: Cell, suite: Suite, store: RunStore, splits: DataSplits, progress: bool = False) -> CellRecord:
    """Run one cell; any exception becomes an error record (KeyboardInterrupt propagates)."""
    fields = {"run_id": store.run_id, "suite": suite.name, "cell_id": cell.cell_id, "model": cell.model.display,
              "variant": cell.model.name, "dataset": cell.dataset.label, "device": cell.device}
    meta = {"model": cell.model.name, "kwargs": cell.model.kwargs, "dataset": cell.dataset.label, "device": cell.device}
    try:
        spec = ModelSpec(cell.model.name, dict(cell.model.kwargs), splits.num_classes, splits.in_chans)
        torch.manual_seed(suite.seed)
        model = spec.build()
        ctx = CellContext(cell, suite, store, splits, spec, model, None, fields, {"progress": progress})
        rows: list[dict[str, Any]] = []
        for step in cell_steps(suite):
            rows.extend(step(ctx))
        meta["spec"] = spec.to_dict()
        meta["card"] = _card_dict(cell.model.name)
        return CellRecord(cell.cell_id, "ok", rows, meta=meta)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed cell is data, not a crash
        message = f"{type(exc).__name__}: {exc}"
        log.debug("cell %s failed:\n%s", cell.cell_id, traceback.format_exc())
        meta["traceback"] = traceback.format_exc(limit=8)
        return CellRecord(cell.cell_id, "error", [make_row("error", None, "", error=message, **fields)], message, meta)


def _card_dict(name: str) -> dict[str, Any]:
    card = model_card(name)
    return {"family": card.family, "paper": card.paper, "dynamic_kind": card.dynamic_kind,
            "reference": dict(card.reference), "reference_source": card.reference_source, "notes": card.notes}


# ----- steps --------------------------------------------------------------------------------------

def step_parameters(ctx: CellContext) -> list[dict[str, Any]]:
    total = sum(p.numel() for p in ctx.model.parameters())
    rows = [ctx.row("params", total, "count")]
    active = getattr(ctx.model, "active_parameters", None)
    if callable(active):
        rows.append(ctx.row("params_active", active(), "count"))
    return rows


def step_train(ctx: CellContext) -> list[dict[str, Any]]:
    from harness.train import train_model

    cfg = train_config_for(ctx.suite, ctx.cell.model)
    if cfg is None or cfg.epochs == 0 or not any(p.requires_grad for p in ctx.model.parameters()):
        return []
    ctx.checkpoint = ctx.store.artifact_dir(ctx.cell.cell_id) / "model.pt"
    result = train_model(ctx.model, ctx.splits.train, cfg, device=ctx.cell.device, checkpoint=ctx.checkpoint,
                         spec=ctx.spec.to_dict(), progress=ctx.cache.get("progress", False))
    rows = [ctx.row("train_seconds", result.seconds, "s", split="train", detail={"epochs": cfg.epochs, "resumed_from_epoch": result.resumed_from_epoch})]
    for term, value in (result.history[-1] if result.history else {}).items():
        rows.append(ctx.row(f"train_loss_{term}", value, "nats", split="train"))
    return rows


def step_accuracy(ctx: CellContext) -> list[dict[str, Any]]:
    from harness.evaluate import accuracy_rows, collect_exit_logits, topk_accuracy

    bs, dev = ctx.suite.eval_batch_size, ctx.cell.device
    test_logits, test_labels = collect_exit_logits(ctx.model, ctx.splits.test, bs, dev)
    ctx.cache["test_exit_logits"], ctx.cache["test_labels"] = test_logits, test_labels
    ctx.cache["val_exit_logits"], ctx.cache["val_labels"] = collect_exit_logits(ctx.model, ctx.splits.val, bs, dev)
    rows = accuracy_rows(test_logits, test_labels, ctx.splits.num_classes, "test", **ctx.fields)
    if getattr(ctx.model, "full_network_is_exit", True) is False:  # e.g. FractalNet: all columns joined
        full, labels = _forward_logits(ctx.model, ctx.splits.test, bs, dev)
        rows.append(ctx.row("top1_full", topk_accuracy(full, labels, 1), "%", split="test", n=len(labels),
                            detail={"path": "forward(): the full network, which is not one of the exits"}))
    return rows


@torch.no_grad()
def _forward_logits(model: torch.nn.Module, ds: Any, batch_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import DataLoader

    model.eval().to(device)
    logits, labels = [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def _inputs(ds: Any, limit: int | None = None) -> torch.Tensor:
    n = len(ds) if limit is None else min(limit, len(ds))
    return torch.stack([ds[i][0] for i in range(n)])


def _cost_table(ctx: CellContext) -> Any:
    from harness.metrics.flops import build_cost_table

    if "cost_table" not in ctx.cache:
        ctx.model.to(ctx.cell.device).eval()
        ctx.cache["cost_table"] = build_cost_table(ctx.model, _inputs(ctx.splits.test, 1).to(ctx.cell.device))
    return ctx.cache["cost_table"]


def step_dynamic(ctx: CellContext) -> list[dict[str, Any]]:
    """Dynamic inference on the test split: for early-exit models every policy's threshold sweep
    and the validation-fitted budget points; for gated/routed models their own decisions.
    Stores each operating point's accuracy and keeps its trace for the cost step."""
    from harness.contract import dynamic_kind
    from harness.evaluate import run_policy, topk_accuracy

    kind = dynamic_kind(ctx.model)
    if kind == "static":
        return []
    bs, dev = ctx.suite.eval_batch_size, ctx.cell.device
    points: list[tuple[str, float | None, Any, dict[str, Any]]] = []
    if kind == "early_exit":
        if "sweep" not in ctx.suite.metrics:
            return []
        points = _early_exit_points(ctx)
    else:
        points = [(kind_label(kind), None, None, {"decisions": "learned gates" if kind == "gated" else "learned router"})]
    rows, traces, policies = [], {}, {}
    for label, threshold, policy, detail in points:
        logits, trace, labels = run_policy(ctx.model, ctx.splits.test, policy, bs, dev)
        key = label if threshold is None else f"{label}={threshold:g}"
        traces[key], policies[key] = trace, policy
        extra = {"policy": label, "threshold": threshold, "split": "test", "n": len(labels)}
        rows.append(ctx.row("policy_top1", topk_accuracy(logits, labels, 1), "%", **extra, detail=detail))
        ctx.cache.setdefault("point_fields", {})[key] = {"policy": label, "threshold": threshold}
    ctx.cache["traces"], ctx.cache["policies"] = traces, policies
    return rows


def kind_label(kind: str) -> str:
    return {"gated": "gates", "routed": "router"}.get(kind, kind)


def _early_exit_points(ctx: CellContext) -> list[tuple[str, float | None, Any, dict[str, Any]]]:
    from harness import calibration
    from harness.policies import make_policy

    table = _cost_table(ctx)
    val_logits, val_labels = ctx.cache["val_exit_logits"], ctx.cache["val_labels"]
    configs = ctx.suite.policies or (PolicyConfig("confidence"),)
    points = []
    for cfg in configs:
        grid = cfg.grid or calibration.default_grid(cfg.name, len(val_logits), val_logits[0].shape[-1])
        for t in grid:
            points.append((cfg.name, float(t), make_policy(cfg.name, t), {"fitted_on": "none (grid point)"}))
        if cfg.name == "patience":
            continue
        for budget in ctx.suite.budgets:
            target = budget * table.exits[-1]
            fit = calibration.fit_to_budget(cfg.name, val_logits, list(table.exits), target, split="validation",
                                            val_labels=val_labels)
            detail = {"fitted_on": fit.fitted_on, "budget_fraction": budget, "budget_macs": target,
                      "thresholds": list(fit.policy.thresholds), "validation_expected_macs": fit.expected_macs,
                      "validation_top1": fit.accuracy, "meets_budget": fit.meets_budget}
            points.append((f"{cfg.name}@budget{budget:g}", None, fit.policy, detail))
    return points


def step_cost(ctx: CellContext) -> list[dict[str, Any]]:
    from harness.metrics.flops import cost_rows, expected_cost_rows, oracle_rows

    table = _cost_table(ctx)
    rows = cost_rows(ctx.model, _inputs(ctx.splits.test, 1).to(ctx.cell.device), None, table=table,
                     include_params=False, **ctx.fields)
    traces = ctx.cache.get("traces", {})
    for key, trace in traces.items():
        point = ctx.cache["point_fields"][key]
        rows.extend(expected_cost_rows(trace, table, point["policy"], **{**ctx.fields, "threshold": point["threshold"]}))
    if ctx.suite.cost.oracle_samples and traces:
        inputs = _inputs(ctx.splits.test).to(ctx.cell.device)
        for key, policy in list(ctx.cache["policies"].items())[:: max(1, len(traces) // 3)]:
            point = ctx.cache["point_fields"][key]
            rows.extend(oracle_rows(ctx.model, inputs, table, policy, num_samples=ctx.suite.cost.oracle_samples,
                                    seed=ctx.suite.seed, **{**ctx.fields, **point}))
    return rows


def step_attribute_sweep(ctx: CellContext) -> list[dict[str, Any]]:
    """A second training stage per value of a model attribute (e.g. SkipNet's hybrid RL stage
    over ``alpha``), each from the first stage's weights, each with its own checkpoint. Every
    value is one operating point: test accuracy of the model's own dynamic decisions and its
    expected MACs (cost table x trace), with policy = the attribute and threshold = the value."""
    import copy

    from harness.evaluate import run_policy, topk_accuracy
    from harness.metrics.flops import expected_cost_rows
    from harness.suites import sweep_train_config
    from harness.train import train_model

    entry = ctx.cell.model
    sweep = entry.attribute_sweep
    if sweep is None:
        return []
    cfg = sweep_train_config(ctx.suite, entry)
    for attr in (sweep.attribute, *sweep.set):
        if not hasattr(ctx.model, attr):
            raise ValueError(f"model {entry.display!r} has no attribute {attr!r} for its attribute_sweep")
    table = _cost_table(ctx)
    bs, dev = ctx.suite.eval_batch_size, ctx.cell.device
    folder = ctx.store.artifact_dir(ctx.cell.cell_id)
    rows: list[dict[str, Any]] = []
    for value in sweep.values:
        model = copy.deepcopy(ctx.model)
        for key, setting in sweep.set.items():
            setattr(model, key, setting)
        setattr(model, sweep.attribute, value)
        point = {"policy": sweep.attribute, "threshold": value}
        detail = {"stage": dict(sweep.set), "from": "first-stage weights", "fitted_on": "train"}
        if cfg is not None and cfg.epochs > 0:
            checkpoint = folder / f"stage2_{slug(sweep.attribute)}_{value:g}.pt"
            spec = {**ctx.spec.to_dict(), "stage": {**sweep.set, sweep.attribute: value}}
            result = train_model(model, ctx.splits.train, cfg, device=dev, checkpoint=checkpoint, spec=spec,
                                 progress=ctx.cache.get("progress", False))
            detail["epochs"] = cfg.epochs
            rows.append(ctx.row("train_seconds", result.seconds, "s", split="train", **point,
                                detail={"epochs": cfg.epochs, "resumed_from_epoch": result.resumed_from_epoch}))
            for term, loss in (result.history[-1] if result.history else {}).items():
                rows.append(ctx.row(f"train_loss_{term}", loss, "nats", split="train", **point))
        logits, trace, labels = run_policy(model, ctx.splits.test, None, bs, dev)
        rows.append(ctx.row("policy_top1", topk_accuracy(logits, labels, 1), "%", split="test", n=len(labels),
                            **point, detail=detail))
        rows.extend(expected_cost_rows(trace, table, sweep.attribute, **{**ctx.fields, "threshold": value, "split": "test"}))
        del model
    return rows


def _stream_policies(ctx: CellContext) -> tuple[Any, ...]:
    """Policies timed as a real stream: budget-fitted ones, else the middle grid point per policy."""
    policies = ctx.cache.get("policies", {})
    chosen = [p for k, p in policies.items() if "@budget" in k]
    if not chosen:
        by_name: dict[str, list[Any]] = {}
        for key, p in policies.items():
            by_name.setdefault(ctx.cache["point_fields"][key]["policy"], []).append(p)
        chosen = [ps[len(ps) // 2] for ps in by_name.values()]
    return tuple(chosen)


def step_latency(ctx: CellContext) -> list[dict[str, Any]]:
    from harness.metrics.latency import LatencySettings, latency_rows

    cfg = ctx.suite.latency
    settings = LatencySettings(batch_sizes=cfg.batch_sizes, warmup=cfg.warmup, repeats=cfg.repeats, threads=cfg.threads,
                               stream_samples=cfg.stream_samples, isolate=cfg.isolate, device=ctx.cell.device,
                               policies=_stream_policies(ctx))
    inputs = _inputs(ctx.splits.test, max(cfg.stream_samples, max(cfg.batch_sizes)))
    return latency_rows(ctx.spec, _weights(ctx), inputs, settings, **ctx.fields)


def _weights(ctx: CellContext) -> Path | None:
    """A checkpoint of the model as measured (trained or freshly initialised) for worker processes."""
    if ctx.checkpoint is None:
        from harness.checkpoints import save_checkpoint

        ctx.checkpoint = ctx.store.artifact_dir(ctx.cell.cell_id) / "model.pt"
        save_checkpoint(ctx.checkpoint, ctx.model.cpu(), spec=ctx.spec.to_dict())
        ctx.model.to(ctx.cell.device)
    return ctx.checkpoint


def step_memory(ctx: CellContext) -> list[dict[str, Any]]:
    from harness.data import input_shape
    from harness.metrics.memory import MemorySettings, memory_rows

    settings = MemorySettings(batch_size=ctx.suite.memory.batch_size, device=ctx.cell.device, threads=ctx.suite.latency.threads)
    return memory_rows(ctx.spec, _weights(ctx), input_shape(ctx.splits), settings, **ctx.fields)


def step_patterns(ctx: CellContext) -> list[dict[str, Any]]:
    """FractalBrainNet: pattern images (artifacts) and the pattern analysis on test images."""
    model = ctx.model
    analyse = getattr(model, "analyze_fractal_patterns", None)
    if not callable(analyse):
        return []
    import numpy as np

    from baselines.fractalbrainnet import pattern_images

    folder = ctx.store.artifact_dir(ctx.cell.cell_id)
    for name, image in pattern_images(model).items():
        np.save(folder / f"pattern_{slug(name)}.npy", np.asarray(image, dtype=np.float32))
    model.eval()
    with torch.no_grad():
        analysis = analyse(_inputs(ctx.splits.test, 32).to(ctx.cell.device))
    rows = []
    for level, value in enumerate(analysis.get("pattern_complexity", [])):
        rows.append(ctx.row("pattern_complexity", float(value), "nats", exit=level, split="test"))
    hier = analysis.get("hierarchical_organization", {})
    if "hierarchy_score" in hier:
        rows.append(ctx.row("hierarchy_score", float(hier["hierarchy_score"]), "score", split="test",
                            detail={"correlation": hier.get("correlation")}))
    return rows


def cell_steps(suite: Suite) -> list[Step]:
    """The measurement steps a suite asks for, in order."""
    m = set(suite.metrics)
    steps: list[Step] = [step_parameters, step_train]
    if m & {"accuracy", "sweep"}:
        steps.append(step_accuracy)
    if m & {"sweep", "cost"}:
        steps.append(step_dynamic)
    if "cost" in m:
        steps.append(step_cost)
    if m & {"accuracy", "sweep", "cost"}:
        steps.append(step_attribute_sweep)
    if "latency" in m:
        steps.append(step_latency)
    if "memory" in m:
        steps.append(step_memory)
    if "patterns" in m:
        steps.append(step_patterns)
    return steps
