"""Runner steps: the declared order is consistent, each cell runs what its metrics and model need, and
the engine's layers import only downwards (harness/ knows no baseline and no report)."""
from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fractalbench.harness import steps
from fractalbench.harness.cells import Cell
from fractalbench.harness.data import DatasetConfig, load_dataset
from fractalbench.harness.registry import ModelSpec
from fractalbench.harness.results import RunStore
from fractalbench.harness.steps import STEPS, CellState, check_step_order, plan_steps
from fractalbench.harness.suites import parse_suite

HARNESS = Path(steps.__file__).resolve().parent


def state_for(model_name: str, tmp_path: Path, **entry) -> CellState:
    raw = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}],
           "models": [{"name": model_name, **entry}], "metrics": ["accuracy"]}
    suite = parse_suite(raw, "t.yaml")
    splits = load_dataset(DatasetConfig("digits", image_size=8))
    spec = ModelSpec(model_name, {}, splits.num_classes, splits.in_chans)
    cell = Cell(suite.models[0], suite.datasets[0], "cpu")
    return CellState(cell, suite, RunStore(tmp_path), splits, spec, spec.build(), {})


def names(state: CellState, *metrics: str) -> list[str]:
    return [s.name for s in plan_steps(state, frozenset(metrics))]


def test_declared_order_is_consistent_and_a_wrong_one_is_caught():
    check_step_order()
    by_name = {s.name: s for s in STEPS}
    swapped = tuple(s for s in STEPS if s.name != "cost_table") + (by_name["cost_table"],)
    with pytest.raises(ValueError, match="step 'exit_stats' needs \\['cost_table'\\]"):  # the first to need it
        check_step_order(swapped)


def test_every_needed_field_is_a_field_of_the_state():
    fields = set(CellState.__dataclass_fields__)
    for step in STEPS:
        assert set(step.needs) | set(step.reads) | set(step.produces) <= fields, step.name


def test_static_model_runs_only_what_its_metrics_ask(tmp_path):
    state = state_for("linear", tmp_path)
    assert names(state, "accuracy") == ["parameters", "train", "accuracy", "cost_table", "exit_stats"]
    assert names(state, "cost") == ["parameters", "train", "cost_table", "cost"]
    assert names(state, "latency", "memory") == ["parameters", "train", "save_weights", "latency", "memory"]


def test_early_exit_sweep_pulls_in_the_logits_and_the_cost_table(tmp_path):
    state = state_for("branchynet_resnet20", tmp_path)
    assert names(state, "sweep") == ["parameters", "train", "accuracy", "cost_table", "threshold_sweep"]
    assert "threshold_sweep" not in names(state, "cost")  # a cost-only suite does not sweep thresholds


def test_gated_model_has_its_learned_point_and_an_attribute_sweep_applies_only_where_declared(tmp_path):
    gated = state_for("skipnet38", tmp_path)
    assert names(gated, "cost") == ["parameters", "train", "cost_table", "learned_decisions", "cost"]
    swept = state_for("skipnet38", tmp_path, attribute_sweep={"attribute": "alpha", "values": [0.1]})
    assert names(swept, "accuracy") == ["parameters", "train", "accuracy", "cost_table", "exit_stats",
                                        "attribute_sweep"]


def test_a_step_that_needs_a_missing_input_says_which(tmp_path):
    state = state_for("branchynet_resnet20", tmp_path)
    with pytest.raises(RuntimeError, match="'val_exits' was not produced"):
        steps.step_threshold_sweep(state)


def test_operating_points_carry_one_key_on_accuracy_cost_and_latency_rows(tmp_path):
    """A budget point's accuracy, expected MACs and latency rows share (policy, threshold)."""
    state = state_for("branchynet_resnet20", tmp_path)
    latency = replace(state.suite.latency, isolate=False, repeats=2, warmup=0, stream_samples=4, cross_check=False)
    state.suite = state.suite.model_copy(update={"budgets": (0.5,), "latency": latency})
    torch.manual_seed(0)
    rows = []
    for step in plan_steps(state, frozenset({"sweep", "cost", "latency"})):
        rows.extend(step.run(state))
    key = ("confidence@budget0.5", None)
    by_metric = {r["metric"] for r in rows if (r["policy"], r["threshold"]) == key}
    assert {"policy_top1", "expected_macs", "latency", "latency_predicted"} <= by_metric
    grid = {(r["policy"], r["threshold"]) for r in rows if r["metric"] == "policy_top1" and r["threshold"] is not None}
    assert grid and grid <= {(r["policy"], r["threshold"]) for r in rows if r["metric"] == "expected_macs"}


def test_learned_decisions_carry_their_validation_accuracy_to_be_ranked_without_test(tmp_path):
    """A routed model's own routing is ranked against the budget fits by validation top-1 (a budget point
    at chance must never be chosen over a router that is right on validation)."""
    from fractalbench.harness.evaluate import run_policy, topk_accuracy

    state = state_for("switch_resnet20", tmp_path)
    state.suite = state.suite.model_copy(update={"budgets": (0.5,)})
    torch.manual_seed(0)
    rows = []
    for step in plan_steps(state, frozenset({"sweep", "cost"})):
        rows.extend(step.run(state))
    import json

    router = next(r for r in rows if r["metric"] == "policy_top1" and r["policy"] == "router")
    detail = json.loads(router["detail"]) if isinstance(router["detail"], str) else router["detail"]
    logits, _, labels = run_policy(state.model, state.splits.val, None, 256, "cpu")
    assert detail["validation_top1"] == pytest.approx(topk_accuracy(logits, labels, 1))
    assert detail["validation_expected_macs"] > 0 and detail["fitted_on"] == "train"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_engine_imports_no_baseline_and_no_report():
    """Only the registry's discovery imports ``baselines``; only the entry points (the CLI and the
    Python API, which write reports) import ``reports``."""
    offenders = []
    for path in sorted(HARNESS.rglob("*.py")):
        for module in _imports(path):
            top = module.removeprefix("fractalbench.").split(".")[0]
            if top == "baselines" and path.name != "registry.py":
                offenders.append(f"{path.name}: {module}")
            if top == "reports" and path.name not in ("cli.py", "api.py"):
                offenders.append(f"{path.name}: {module}")
    assert offenders == []


def _import_graph() -> dict[str, set[str]]:
    """harness module -> the harness modules it imports (at any level: top or inside functions)."""
    graph = {}
    for path in sorted(HARNESS.rglob("*.py")):
        name = "fractalbench.harness." + ".".join(path.relative_to(HARNESS).with_suffix("").parts)
        graph[name.removesuffix(".__init__")] = {m for m in _imports(path) if m.startswith("fractalbench.harness.")}
    return graph


def _reaches(graph: dict[str, set[str]], start: str, target: str) -> bool:
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module == target:
            return True
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return False


ENTRY_MODULES = [f"fractalbench.harness.{m}" for m in ("runner", "steps", "api", "executors", "cells")]


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_the_engine_has_no_import_circle_through_its_entry_modules(module):
    """runner, steps, api, executors and cells import nothing that imports them back (function-level
    imports included): the per-cell functions live in fractalbench.harness.cells, which runner and executors share."""
    graph = _import_graph()
    assert not _reaches(graph, module, module), f"{module} imports something that imports it back"


def test_every_third_party_package_imported_is_declared_in_pyproject():
    import importlib.metadata
    import re
    import sys

    root = HARNESS.parent
    requirements = [r for r in importlib.metadata.requires("fractalbench") or [] if "extra ==" not in r]
    declared = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    # optional imports (inside try/except ImportError), declared as extras: module -> its extra's distribution
    optional = {"pynvml": "nvidia-ml-py"}
    extras = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in importlib.metadata.requires("fractalbench")
              or [] if "extra ==" in r}
    assert set(optional.values()) <= extras, "an optional import's distribution must be declared as an extra"
    owners = {**importlib.metadata.packages_distributions(), **{m: [d] for m, d in optional.items()}}
    ours = {"fractalbench", "tests"}
    missing = set()
    for folder in ("harness", "baselines", "reports"):
        for path in sorted((root / folder).rglob("*.py")):
            for module in _imports(path):
                top = module.split(".")[0]
                if top in ours or top in sys.stdlib_module_names or top == "pytest":  # pytest: the plugin's
                    continue
                dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                if not dists & (declared | (extras & set(optional.values()) if top in optional else set())):
                    missing.add(f"{top} ({', '.join(sorted(dists))}) in {path.relative_to(root)}")
    assert not missing, sorted(missing)
