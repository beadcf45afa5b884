"""The project's CI gate (benchmarks/gate.py). The default check measures the committed trained
checkpoints (benchmarks/gate_checkpoints/, the smoke suite's models trained on the digits) without
training and compares the run with the committed baseline run (benchmarks/gate_baseline/: cells and
per-sample outcomes): counts equal, accuracy rows paired (McNemar) and within the suite's points, exit
histograms by chi-square. The training-reproducibility check (the smoke suite retrained with pinned
kernels against benchmarks/baseline_smoke[_<vendor>].json) is slow and marked so. Refresh after an
intended change: `python benchmarks/gate.py refresh` (and `make baseline` for the training check).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fractalbench.harness.suites import load_suite


def _load_gate():
    """benchmarks/gate.py is a script beside the benchmarks, not part of the installed package."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gate.py"
    spec = importlib.util.spec_from_file_location("fractalbench_gate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gate = _load_gate()


def baseline_rows(path: Path | None = None) -> list[dict]:
    data = json.loads((path or gate.BASELINE).read_text(encoding="utf-8"))
    return data["rows"] if isinstance(data, dict) else data


def test_each_cpu_vendor_has_its_committed_baseline():
    intel, amd = gate.baseline_for("GenuineIntel"), gate.baseline_for("AuthenticAMD")
    assert intel.name == "baseline_smoke.json" and amd.name == "baseline_smoke_AuthenticAMD.json"
    assert gate.baseline_for("") == intel and intel.is_file() and amd.is_file()


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
def test_committed_baseline_covers_every_smoke_model(vendor):
    rows = baseline_rows(gate.baseline_for(vendor))
    models = {r["model"] for r in rows}
    pending = gate.PENDING_TRAINING_BASELINE.get(vendor, set())
    assert models | pending == {m.display for m in load_suite(gate.SUITE).models}
    assert not models & pending, "a pending model is in the baseline: take it off PENDING_TRAINING_BASELINE"
    assert not [r for r in rows if r["metric"] == "error"], "the baseline was written from a run with failed cells"
    for metric in ("params", "macs", "top1"):
        assert {r["model"] for r in rows if r["metric"] == metric} == models, metric
    assert {r["model"] for r in rows if r["metric"] == "policy_top1"} >= {"branchynet_resnet20_w8", "skipnet38"}


def test_gate_suite_loads_every_smoke_model_from_a_committed_checkpoint():
    suite = load_suite(str(gate.GATE_SUITE))
    smoke = load_suite(gate.SUITE)
    assert [m.display for m in suite.models] == [m.display for m in smoke.models]
    assert suite.train is None  # measured, never trained
    for entry in suite.models:
        if entry.name == "noop":  # no parameters, no checkpoint
            assert entry.weights is None
            continue
        for source in entry.weights:  # the model's checkpoint, or those of the cells it is assembled from
            assert (gate.HERE / source.source).is_file(), entry.display


def test_committed_baseline_run_was_measured_from_the_committed_checkpoints():
    """A checkpoint replaced without a refresh of the baseline is caught here (sha256 of each file)."""
    import hashlib

    for cell in sorted((gate.GATE_BASELINE / "cells").glob("*.json")):
        record = json.loads(cell.read_text(encoding="utf-8"))
        assert record["status"] == "ok", cell.name
        weights = record["meta"].get("weights")
        if weights is None:
            assert record["meta"]["model"] == "noop"
            continue
        for part in weights if isinstance(weights, list) else [weights]:  # a list: one per submodule
            name = Path(part["file"]).name
            assert hashlib.sha256((gate.CHECKPOINTS / name).read_bytes()).hexdigest() == part["sha256"], name
        assert (gate.GATE_BASELINE / "outcomes" / f"{cell.stem}.npz").is_file()


def test_gate_measures_the_checkpoints_and_matches_the_committed_baseline(tmp_path):
    run = tmp_path / "gate"
    gate.run_gate_suite(run)
    trained = [r for r in json.loads((run / "results.json").read_text())["rows"] if r["metric"] == "train_seconds"]
    assert not trained  # nothing was trained
    result = gate.check_gate(run, tmp_path / "compare.md")
    assert result.returncode == 0, (f"regression against {gate.GATE_BASELINE}:\n"
                                    f"{result.stdout[-4000:]}{result.stderr[-2000:]}")
    assert "no regressions" in result.stdout


def test_gate_fails_on_changed_outcomes(tmp_path):
    """The gate can fail: the baseline run with one model's test outcomes turned wrong (a third of
    its right answers) is a regression, paired by McNemar."""
    import shutil

    import numpy as np

    from fractalbench.harness.outcomes import CellOutcomes

    changed = tmp_path / "changed"
    shutil.copytree(gate.GATE_BASELINE, changed)
    cell = "resnet20__digits16__cpu"
    outcomes = CellOutcomes.load(changed / "outcomes" / f"{cell}.npz")
    (key, entry), = [(k, o) for k, o in outcomes.entries.items() if o.metric == "top1"]
    right = np.flatnonzero(entry.correct)[::3]
    bits = entry.correct.copy()
    bits[right] = False
    outcomes.add("top1", bits, exit=entry.exit)
    outcomes.save(changed / "outcomes" / f"{cell}.npz")
    record = json.loads((changed / "cells" / f"{cell}.json").read_text())
    for row in record["rows"]:
        if row["metric"] == "top1":
            row["value"] = 100.0 * bits.mean()
    (changed / "cells" / f"{cell}.json").write_text(json.dumps(record))
    result = gate.cli("compare", str(gate.GATE_BASELINE), str(changed), env=gate.MEASURE_ENV)
    assert result.returncode == 1 and "top1" in result.stdout and "REGRESSION" in result.stdout


@pytest.mark.slow
def test_smoke_suite_matches_committed_baseline(tmp_path):
    """Training reproducibility (slow): the smoke suite retrained with pinned kernels."""
    run = tmp_path / "smoke"
    gate.run_smoke(run)
    import pandas as pd

    from fractalbench.harness.catalogue import check_metric

    written = pd.read_csv(run / "results.csv")[["metric", "unit"]].fillna("").drop_duplicates()
    for metric, unit in written.itertuples(index=False):
        check_metric(metric, unit)  # every metric the smoke suite writes is in the catalogue, with its unit
    assert len(written) >= 20
    result = gate.check(run, tmp_path / "compare.md")
    assert result.returncode == 0, (f"regression against {gate.BASELINE.name}:\n"
                                    f"{result.stdout[-4000:]}{result.stderr[-2000:]}")
    assert "no regressions" in result.stdout


def test_gate_flags_a_changed_mac_count(tmp_path):
    """The gate can fail: a baseline whose MAC count differs by one is a regression."""
    data = json.loads(gate.BASELINE.read_text(encoding="utf-8"))
    rows = data["rows"] if isinstance(data, dict) else data
    row = next(r for r in rows if r["metric"] == "macs" and r["model"] == "resnet20")
    row["value"] += 1
    changed = tmp_path / "baseline.json"
    changed.write_text(json.dumps(data), encoding="utf-8")
    result = gate.cli("compare", str(changed), str(gate.BASELINE))
    assert result.returncode == 1 and "macs" in result.stdout
