"""The measurement steps of a cell (the state they share is :class:`fractalbench.harness.cell_state.CellState`).

Each :class:`Step` declares the suite metrics that ask for it (``wanted_by``; empty: every cell;
``on_demand``: only when another chosen step needs what it produces),
whether it applies to the cell's model, the :class:`CellState` fields it needs (they must have been
produced by an earlier step), the fields it may read if present, and the fields it produces.
:func:`plan_steps` picks the wanted steps that apply, adds the producers of what they need, and
keeps the one order of :data:`STEPS`; :func:`check_step_order` proves that order is consistent.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fractalbench.harness import calibration, contract
from fractalbench.harness._sweep import check_real_path, simulated_logits
from fractalbench.harness.cell_state import CellState, ExitLogits, OperatingPoint, Rows, _inputs
from fractalbench.harness.data import input_shape
from fractalbench.harness.evaluate import accuracy_rows, collect_exit_logits, forward_logits, run_policy, topk_accuracy
from fractalbench.harness.metrics.exit_stats import exit_stat_rows
from fractalbench.harness.metrics.flops import (
    build_cost_table,
    cost_rows,
    expected_cost_rows,
    expected_macs,
    expert_compute_rows,
    oracle_rows,
)
from fractalbench.harness.metrics.settings import StreamPoint
from fractalbench.harness.policies import DecisionThreshold, make_policy
from fractalbench.harness.registry import in_process_reason
from fractalbench.harness.results import label_in_process, slug
from fractalbench.harness.suites import MacsBudget, PolicyConfig, sweep_train_config, train_config_for
from fractalbench.harness.train import resolved_precision, train_model

__all__ = ["STEPS", "CellState", "ExitLogits", "OperatingPoint", "Step", "check_step_order", "plan_steps"]


# ----- steps --------------------------------------------------------------------------------------

def step_parameters(s: CellState) -> Rows:
    rows = [s.row("params", sum(p.numel() for p in s.model.parameters()), "count")]
    active = contract.active_parameters(s.model)
    if active is not None:
        rows.append(s.row("params_active", active, "count"))
    return rows


def _covers_every_epoch(row: dict[str, Any]) -> bool:
    """Whether an earlier train_seconds row timed every epoch (it started from scratch, or says so)."""
    from fractalbench.harness.results import detail_of

    detail = detail_of(row.get("detail"))
    return detail.get("resumed_from_epoch") == 0 or str(detail.get("covers", "")).startswith("every epoch")


def _train_rows(s: CellState, result: Any, cfg: Any, **point: Any) -> Rows:
    """Training time (every epoch, resumed ones included, when the checkpoint kept their times; else
    this call's; a remeasured cell whose checkpoint ran no epoch keeps its first record's) and the
    last epoch's loss terms."""
    seconds, covers = result.total_seconds, "every epoch"
    if seconds is None:
        seconds, covers = result.seconds, (f"the {result.epochs_run} epoch(s) run in this call; earlier epochs "
                                           "were not timed" if result.resumed_from_epoch else "every epoch")
        same = ("train_seconds", point.get("policy", ""), point.get("threshold"))
        earlier = [r for r in s.previous_rows if (r.get("metric"), r.get("policy") or "", r.get("threshold")) == same
                   and _covers_every_epoch(r)]
        if result.epochs_run == 0 and earlier:
            seconds, covers = earlier[0]["value"], "every epoch, from the cell's record before it was remeasured"
    rows = [s.row("train_seconds", seconds, "s", split="train", **point,
                  detail={"epochs": cfg.epochs, "resumed_from_epoch": result.resumed_from_epoch, "covers": covers,
                          "this_call_seconds": result.seconds, "freeze": cfg.freeze,
                          "precision": resolved_precision(cfg.precision, s.device)})]
    for term, value in (result.history[-1] if result.history else {}).items():
        rows.append(s.row(f"train_loss_{term}", value, "nats", split="train", **point))
    return rows


def step_train(s: CellState) -> Rows:
    cfg = train_config_for(s.suite, s.cell.model, s.cell.train_seed(s.suite))
    if cfg is None or cfg.epochs == 0 or not any(p.requires_grad for p in s.model.parameters()):
        return []
    s.checkpoint = s.store.artifact_dir(s.cell.cell_id) / "model.pt"
    result = train_model(s.model, s.splits.train, cfg, device=s.device, checkpoint=s.checkpoint,
                         spec=s.checkpoint_spec(), progress=s.progress)
    return _train_rows(s, result, cfg)


def step_accuracy(s: CellState) -> Rows:
    """Per-exit accuracy on test (and the exit logits of test and validation for later steps)."""
    bs = s.suite.eval_batch_size
    s.test_exits = ExitLogits(*collect_exit_logits(s.model, s.splits.test, bs, s.device))
    s.val_exits = ExitLogits(*collect_exit_logits(s.model, s.splits.val, bs, s.device))
    labels = s.test_exits.labels
    rows = accuracy_rows(s.test_exits.logits, labels, s.splits.num_classes, "test", **s.fields)
    for k, logits in enumerate(s.test_exits.logits):
        s.keep("top1", logits, labels, exit=k)
        if s.splits.num_classes > 5:
            s.keep("top5", logits, labels, 5, exit=k)
    if not contract.full_network_is_exit(s.model):  # e.g. FractalNet: all columns joined
        full, labels = forward_logits(s.model, s.splits.test, bs, s.device)
        rows.append(s.row("top1_full", s.keep("top1_full", full, labels), "%", split="test", n=len(labels),
                          detail={"path": "forward(): the full network, which is not one of the exits"}))
    return rows


def step_cost_table(s: CellState) -> Rows:
    s.model.to(s.device).eval()
    s.cost_table = build_cost_table(s.model, _inputs(s.splits.test, 1).to(s.device))
    return []


def step_exit_stats(s: CellState) -> Rows:
    """Oracle exit, overthinking and the calibration of every exit on test
    (:mod:`fractalbench.harness.metrics.exit_stats`)."""
    test = s.need("test_exits")
    return exit_stat_rows(test.logits, test.labels, s.need("cost_table").exits, **s.fields)


def _score_points(s: CellState, points: list[OperatingPoint]) -> Rows:
    """Run each point's real dynamic forward on test: its accuracy row, and its trace kept."""
    rows = []
    for point in points:
        logits, point.trace, labels = run_policy(s.model, s.splits.test, point.decider, s.suite.eval_batch_size,
                                                 s.device)
        top1 = s.keep("policy_top1", logits, labels, exit_index=point.trace.exit_index, **point.key)
        rows.append(s.row("policy_top1", top1, "%", **point.key, split="test",
                          n=len(labels), detail={"fitted_on": point.fitted_on, **point.detail}))
    s.points.extend(points)
    return rows


def budget_name(policy: str, budget: Any) -> str:
    """The operating point's name: ``confidence@budget0.5`` (a fraction), ``confidence@macs20M`` (absolute)."""
    return f"{policy}@macs{budget.label}" if isinstance(budget, MacsBudget) else f"{policy}@budget{budget:g}"


def _budget_detail(budget: Any) -> dict[str, Any]:
    if isinstance(budget, MacsBudget):
        return {"budget_fraction": None, "budget_absolute_macs": float(budget.macs)}
    return {"budget_fraction": float(budget)}


def _budget_point(s: CellState, name: str, budget: Any, grid: Any = None) -> OperatingPoint:
    table, val = s.need("cost_table"), s.need("val_exits")
    target = float(budget.macs) if isinstance(budget, MacsBudget) else budget * table.exits[-1]
    if name in calibration.BUDGET_POLICIES:
        fit = calibration.fit_to_budget(name, val.logits, list(table.exits), target, split="validation",
                                        val_labels=val.labels)
    else:  # a user's policy: the most accurate point of its grid within the budget
        fit = calibration.fit_grid(name, val.logits, val.labels, list(table.exits), target, grid=grid,
                                   split="validation")
    detail = {**_budget_detail(budget), "budget_macs": target, "thresholds": list(fit.policy.thresholds),
              "validation_expected_macs": fit.expected_macs, "validation_top1": fit.accuracy,
              "meets_budget": fit.meets_budget}
    return OperatingPoint(budget_name(name, budget), None, fit.policy, fit.fitted_on, detail)


def _grid_points(s: CellState) -> list[OperatingPoint]:
    val = s.need("val_exits")
    points = []
    for cfg in s.suite.policies or (PolicyConfig("confidence"),):
        grid = cfg.grid or calibration.default_grid(cfg.name, len(val.logits), val.logits[0].shape[-1])
        points.extend(OperatingPoint(cfg.name, float(t), make_policy(cfg.name, t), "none (grid point)") for t in grid)
        if cfg.name != "patience":
            points.extend(_budget_point(s, cfg.name, budget, grid) for budget in s.suite.budgets)
    return points


class SweepMismatchError(RuntimeError):
    """The real stopping path disagreed with the sweep computed from exit logits."""


def _simulated_sweep(s: CellState, points: list[OperatingPoint]) -> Rows:
    """Every point's test accuracy and trace from the test exit logits, then the real-path check."""
    test = s.need("test_exits")
    how = "simulated from the exit logits of one forward_exits pass; checked on a subset against the real path"
    rows = []
    for point in points:
        exit_index, logits = simulated_logits(point.decider, test.logits)
        point.trace = s.model.trace_for_exits(exit_index)
        top1 = s.keep("policy_top1", logits, test.labels, exit_index=exit_index, **point.key)
        rows.append(s.row("policy_top1", top1, "%", **point.key, split="test",
                          n=len(test.labels), detail={"fitted_on": point.fitted_on, **point.detail, "computed": how}))
    s.points.extend(points)
    check = check_real_path(s.model, s.splits.test, [p.decider for p in points], test.logits,
                            s.suite.cost.sweep_check_samples, s.suite.eval_batch_size, s.device)
    rows.append(s.row("sweep_path_mismatches", check["mismatches"], "count", split="test", n=check["checked"],
                      detail=check))
    if check["mismatches"]:
        raise SweepMismatchError(f"the real stopping path disagrees with the simulated sweep on {check['mismatches']} "
                                 f"of {check['checked']} (sample, point) pairs: {check}")
    return rows


def step_threshold_sweep(s: CellState) -> Rows:
    """Early-exit models: every policy's threshold grid and the validation-fitted budget points.
    Cascades whose trace follows from the exit (``trace_for_exits``) are swept from the exit logits
    and checked against the real path on a subset; others run the real path for every point."""
    points = _grid_points(s)
    probe = s.model.trace_for_exits(torch.zeros(1, dtype=torch.long))
    if probe is None or s.suite.cost.sweep_check_samples == 0:
        return _score_points(s, points)
    return _simulated_sweep(s, points)


LEARNED_POINT = {"gated": ("gates", "learned gates"), "routed": ("router", "learned router")}


def _decision_points(s: CellState) -> list[OperatingPoint]:
    """One point per suite budget: the decision threshold fitted on validation (real passes) so
    that the validation cost is within that fraction of the model's range."""
    table, bs = s.need("cost_table"), s.suite.eval_batch_size
    cache: dict[float, tuple[float, float]] = {}

    def measure(t: float) -> tuple[float, float]:
        logits, trace, labels = run_policy(s.model, s.splits.val, DecisionThreshold((t,)), bs, s.device)
        return expected_macs(trace, table).mean, topk_accuracy(logits, labels, 1)

    points = []
    for budget in s.suite.budgets:
        absolute = isinstance(budget, MacsBudget)
        fit = calibration.fit_decision_threshold(measure, None if absolute else budget, split="validation",
                                                 cache=cache, budget_macs=float(budget.macs) if absolute else None)
        detail = {**_budget_detail(budget), "budget_of": "absolute MACs per image" if absolute else
                  "the model's range on validation (nothing optional runs .. every gated block / chosen expert "
                  "runs)", "budget_macs": fit.budget_macs,
                  "threshold_value": fit.policy.value, "validation_expected_macs": fit.expected_macs,
                  "validation_top1": fit.accuracy, "validation_macs_all": fit.macs_all,
                  "validation_macs_none": fit.macs_none, "meets_budget": fit.meets_budget,
                  "validation_passes": fit.evaluations}
        points.append(OperatingPoint(budget_name("decision_threshold", budget), None, fit.policy, fit.fitted_on,
                                     detail))
    return points


def step_learned_decisions(s: CellState) -> Rows:
    """Gated and routed models: the model's own decisions, and (with suite budgets) the decision
    threshold fitted to each budget on validation (:func:`_decision_points`)."""
    label, decisions = LEARNED_POINT[s.kind]
    # its validation top-1 and MACs, as the fitted points carry, so that a summary's chosen point can rank
    # the learned decisions with them without looking at test
    val_logits, val_trace, val_labels = run_policy(s.model, s.splits.val, None, s.suite.eval_batch_size, s.device)
    learned = OperatingPoint(label, None, None, "train", {
        "decisions": decisions, "validation_top1": topk_accuracy(val_logits, val_labels, 1),
        "validation_expected_macs": expected_macs(val_trace, s.need("cost_table")).mean})
    return _score_points(s, [learned, *_decision_points(s)])


def step_cost(s: CellState) -> Rows:
    """MACs/FLOPs per forced exit, cost units and fvcore's check; each point's expected MACs (and a
    routed model's useful vs padded expert MACs and dropped tokens); the per-sample oracle on a few
    points (every third)."""
    table, sample = s.need("cost_table"), _inputs(s.splits.test, 1).to(s.device)
    rows = cost_rows(s.model, sample, None, table=table, include_params=False, **s.fields)
    for point in s.points:
        point_fields = {**s.fields, "threshold": point.threshold}
        rows.extend(expected_cost_rows(point.trace, table, point.policy, **point_fields))
        rows.extend(expert_compute_rows(s.model, point.trace, table, s.suite.eval_batch_size, point.policy,
                                        **point_fields))
    if s.suite.cost.oracle_samples and s.points:
        inputs = _inputs(s.splits.test).to(s.device)
        for point in s.points[:: max(1, len(s.points) // 3)]:
            fields = {k: v for k, v in {**s.fields, **point.key}.items() if k != "seed"}  # seed: the sampling's
            rows.extend({**r, "seed": s.fields.get("seed")} for r in oracle_rows(
                s.model, inputs, table, point.decider, num_samples=s.suite.cost.oracle_samples, seed=s.suite.seed,
                **fields))
    return rows


def step_length_scaling(s: CellState) -> Rows:
    """Sequence models: MACs, latency and peak memory at each of the suite's ``cost.lengths``, the
    model's attention beside full attention of the same size
    (:mod:`fractalbench.harness.metrics.length_scaling`), in this process."""
    from fractalbench.harness.metrics.length_scaling import length_scaling_rows

    return length_scaling_rows(s.model, s.suite.cost.lengths, threads=s.suite.latency.threads,
                               **{**s.fields, "device": s.device})


def _sweep_model(s: CellState, value: float) -> nn.Module:
    sweep = s.cell.model.attribute_sweep
    model = copy.deepcopy(s.model)
    for key, setting in sweep.set.items():
        setattr(model, key, setting)
    setattr(model, sweep.attribute, value)
    return model


def step_attribute_sweep(s: CellState) -> Rows:
    """A second training stage per value of a model attribute (e.g. SkipNet's hybrid RL stage over
    ``alpha``), each from the first stage's weights, each with its own checkpoint. Every value is
    one operating point (policy = the attribute, threshold = the value): the test accuracy of the
    model's own decisions and its expected MACs (cost table x trace), with the same two on the
    validation split in the row's detail (``validation_top1``, ``validation_expected_macs``), which
    rank the values for a summary's chosen point without looking at test."""
    entry, table = s.cell.model, s.need("cost_table")
    sweep, cfg = entry.attribute_sweep, sweep_train_config(s.suite, entry, s.cell.train_seed(s.suite))
    for attr in (sweep.attribute, *sweep.set):
        if not hasattr(s.model, attr):
            raise ValueError(f"model {entry.display!r} has no attribute {attr!r} for its attribute_sweep")
    rows: Rows = []
    for value in sweep.values:
        model, point = _sweep_model(s, value), {"policy": sweep.attribute, "threshold": value}
        detail = {"stage": dict(sweep.set), "from": "first-stage weights", "fitted_on": "train"}
        if cfg is not None and cfg.epochs > 0:
            name = f"stage2_{slug(sweep.attribute)}_{value:g}.pt"
            spec = {**s.checkpoint_spec(), "stage": {**sweep.set, sweep.attribute: value}}
            result = train_model(model, s.splits.train, cfg, device=s.device, progress=s.progress, spec=spec,
                                 checkpoint=s.store.artifact_dir(s.cell.cell_id) / name)
            detail["epochs"] = cfg.epochs
            rows.extend(_train_rows(s, result, cfg, **point))
        val_logits, val_trace, val_labels = run_policy(model, s.splits.val, None, s.suite.eval_batch_size, s.device)
        detail.update(validation_top1=topk_accuracy(val_logits, val_labels, 1),
                      validation_expected_macs=expected_macs(val_trace, table).mean)
        logits, trace, labels = run_policy(model, s.splits.test, None, s.suite.eval_batch_size, s.device)
        top1 = s.keep("policy_top1", logits, labels, exit_index=trace.exit_index, **point)
        rows.append(s.row("policy_top1", top1, "%", split="test", n=len(labels), **point, detail=detail))
        rows.extend(expected_cost_rows(trace, table, sweep.attribute, **{**s.fields, **point, "split": "test"}))
    return rows


def step_save_weights(s: CellState) -> Rows:
    """The model as measured (trained or freshly initialised), for worker processes to rebuild."""
    if s.checkpoint is None:
        from fractalbench.harness.checkpoints import save_checkpoint

        s.checkpoint = s.store.artifact_dir(s.cell.cell_id) / "model.pt"
        save_checkpoint(s.checkpoint, s.model.cpu(), spec=s.checkpoint_spec())
        s.model.to(s.device)
    s.weights = s.checkpoint
    return []


def stream_points(s: CellState) -> tuple[StreamPoint, ...]:
    """Operating points timed as a real stream: the budget fits (and the learned decisions of gated
    and routed models), else the middle grid point of each policy."""
    chosen = [p for p in s.points if p.is_budget_fit or p.policy in ("gates", "router")]
    if not chosen:
        by_name: dict[str, list[OperatingPoint]] = {}
        for point in s.points:
            by_name.setdefault(point.policy, []).append(point)
        chosen = [group[len(group) // 2] for group in by_name.values()]
    return tuple(StreamPoint(p.policy, p.threshold, p.decider) for p in chosen)


def step_latency(s: CellState) -> Rows:
    """Latency in worker processes that rebuild the model from its spec and weights; a model that
    cannot be rebuilt there (:func:`fractalbench.harness.registry.in_process_reason`) is measured here,
    rows labelled."""
    from dataclasses import replace

    from fractalbench.harness.metrics.latency import latency_rows, measure_latency

    settings = replace(s.suite.latency, device=s.device, policies=stream_points(s))
    inputs = _inputs(s.splits.test, max(settings.stream_samples, max(settings.batch_sizes)))
    why = in_process_reason(s.spec.name)
    if why:
        return label_in_process(measure_latency(s.model, inputs, settings, **s.fields), why)
    return latency_rows(s.spec, s.need("weights"), inputs, settings, **s.fields)


def step_memory(s: CellState) -> Rows:
    """Peak memory, isolated or (for a model that cannot be rebuilt) here, as :func:`step_latency`."""
    from dataclasses import replace

    from fractalbench.harness.metrics.memory import measure_memory, memory_rows

    settings = replace(s.suite.memory, device=s.device, threads=s.suite.latency.threads)
    why = in_process_reason(s.spec.name)
    if why:
        return label_in_process(measure_memory(s.model, input_shape(s.splits), settings, **s.fields), why)
    return memory_rows(s.spec, s.need("weights"), input_shape(s.splits), settings, **s.fields)


def step_backends(s: CellState) -> Rows:
    """Latency and outcomes through the suite's ``latency.backends``
    (:mod:`fractalbench.harness.metrics.backends`) at the points the latency stream times, in this
    process; outcomes compared with eager on the test split."""
    from fractalbench.harness.metrics.backends import backend_rows
    from fractalbench.harness.metrics.settings import resolve_policy

    settings = s.suite.latency
    keyed = []
    for point in stream_points(s) or (None,):
        _, decider = resolve_policy(point)
        keyed.append(({"policy": point.policy, "threshold": point.threshold} if point is not None
                      else {"policy": "default", "threshold": None}, decider))
    s.model.to(s.device).eval()
    return backend_rows(s.model, _inputs(s.splits.test, settings.stream_samples).to(s.device), keyed,
                        settings.backends, repeats=settings.repeats, warmup=settings.warmup,
                        stream_samples=settings.stream_samples, threads=settings.threads,
                        outcome_inputs=_inputs(s.splits.test).to(s.device), **{**s.fields, "device": s.device})


def step_serving(s: CellState) -> Rows:
    """The serving scenario (:mod:`fractalbench.harness.metrics.serving`) for the operating points the
    latency stream times (:func:`stream_points`; a static model: its one path), in this process."""
    from fractalbench.harness.metrics.serving import serving_rows
    from fractalbench.harness.metrics.settings import resolve_policy

    settings = s.suite.serving
    points = list(stream_points(s)) or [None]
    if len(points) > settings.max_points:  # spread over the points, cheapest to dearest as the stream lists them
        step = (len(points) - 1) / max(1, settings.max_points - 1)
        points = [points[round(i * step)] for i in range(settings.max_points)]
    keyed = []
    for point in points:
        description, decider = resolve_policy(point)
        key = ({"policy": point.policy, "threshold": point.threshold} if point is not None
               else {"policy": "default", "threshold": None})
        keyed.append(({**key, "policy_description": description}, decider))
    inputs = _inputs(s.splits.test, max(64, settings.max_batch * 4))
    return serving_rows(s.model, inputs, keyed, settings, **{**s.fields, "device": s.device})


def step_extras(s: CellState) -> Rows:
    """Model-specific rows and artifacts from the contract's ``extra_results`` hook (FractalBrainNet's
    patterns), on up to 32 test images."""
    s.model.to(s.device).eval()
    with torch.no_grad():
        extras = contract.extra_results(s.model, _inputs(s.splits.test, 32).to(s.device))
    folder = s.store.artifact_dir(s.cell.cell_id) if extras.artifacts else None
    for name, array in extras.artifacts.items():
        np.save(folder / f"{slug(name)}.npy", np.asarray(array))
    return [s.row(r.metric, r.value, r.unit, **{"split": "test", **r.fields}) for r in extras.rows]


# ----- the plan -----------------------------------------------------------------------------------

def _always(_: CellState) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    """A measurement step: ``run(state) -> rows``; see the module docstring for the other fields."""

    name: str
    run: Callable[[CellState], Rows]
    wanted_by: frozenset[str] = frozenset()
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    applies: Callable[[CellState], bool] = _always
    on_demand: bool = False  # runs only when a chosen step needs what it produces


def _m(*names: str) -> frozenset[str]:
    return frozenset(names)


STEPS: tuple[Step, ...] = (
    Step("parameters", step_parameters),
    Step("train", step_train, produces=("checkpoint",)),
    Step("accuracy", step_accuracy, _m("accuracy", "sweep"), produces=("test_exits", "val_exits")),
    Step("cost_table", step_cost_table, produces=("cost_table",), on_demand=True),
    Step("exit_stats", step_exit_stats, _m("accuracy"), needs=("test_exits", "cost_table")),
    Step("threshold_sweep", step_threshold_sweep, _m("sweep"), needs=("val_exits", "test_exits", "cost_table"),
         produces=("points",), applies=lambda s: s.kind == "early_exit"),
    Step("learned_decisions", step_learned_decisions, _m("sweep", "cost"), needs=("cost_table",), produces=("points",),
         applies=lambda s: s.kind in LEARNED_POINT),
    Step("cost", step_cost, _m("cost"), needs=("cost_table",), reads=("points",)),
    Step("length_scaling", step_length_scaling, _m("cost"),
         applies=lambda s: bool(s.suite.cost.lengths) and contract.has_length_variants(s.model)),
    Step("attribute_sweep", step_attribute_sweep, _m("accuracy", "sweep", "cost"), needs=("cost_table",),
         applies=lambda s: s.cell.model.attribute_sweep is not None),
    Step("save_weights", step_save_weights, reads=("checkpoint",), produces=("weights",), on_demand=True),
    Step("latency", step_latency, _m("latency"), needs=("weights",), reads=("points",)),
    Step("memory", step_memory, _m("memory"), needs=("weights",)),
    Step("backends", step_backends, _m("latency"), reads=("points",),
         applies=lambda s: bool(s.suite.latency.backends)),
    Step("serving", step_serving, _m("serving"), reads=("points",)),
    Step("extras", step_extras, _m("patterns")),
)
"""Every step, in the one order they run in."""

INPUTS = ("cell", "suite", "store", "splits", "spec", "model", "fields", "progress")


def check_step_order(steps: tuple[Step, ...] = STEPS) -> None:
    """ValueError unless every need and read of a step is an input or produced by an earlier step."""
    available = set(INPUTS)
    for step in steps:
        missing = [n for n in (*step.needs, *step.reads) if n not in available]
        if missing:
            raise ValueError(f"step {step.name!r} needs {missing}, which no earlier step produces")
        available.update(step.produces)


def plan_steps(state: CellState, metrics: set[str] | frozenset[str]) -> list[Step]:
    """The steps one cell runs: those its suite's metrics want (or every cell needs) and that apply
    to its model, plus the producers of everything they need, in the order of :data:`STEPS`."""
    chosen = {s.name for s in STEPS
              if not s.on_demand and (not s.wanted_by or s.wanted_by & metrics) and s.applies(state)}
    for step in reversed(STEPS):  # needs point backwards, so one reverse pass closes the set
        if step.name in chosen:
            for need in step.needs:
                producer = next(p for p in STEPS if need in p.produces)
                chosen.add(producer.name)
    return [s for s in STEPS if s.name in chosen]
