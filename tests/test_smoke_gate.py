"""The project's own CI gate (issue #7): the `smoke` suite, run in a subprocess with the gate's
pinned environment (benchmarks/gate.py), compared with the baseline committed in
benchmarks/baseline_smoke.json on its deterministic metrics (parameters, MACs/FLOPs, accuracy and
exit fractions on the fixed seed). A changed MAC or parameter count, an accuracy drop beyond the
threshold or a failed cell fails CI. Refresh after an intended change: `make baseline`.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from harness.suites import load_suite


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
    assert models == {m.display for m in load_suite(gate.SUITE).models}
    assert not [r for r in rows if r["metric"] == "error"], "the baseline was written from a run with failed cells"
    for metric in ("params", "macs", "top1"):
        assert {r["model"] for r in rows if r["metric"] == metric} == models, metric
    assert {r["model"] for r in rows if r["metric"] == "policy_top1"} >= {"branchynet_resnet20_w8", "skipnet38"}


def test_smoke_suite_matches_committed_baseline(tmp_path):
    run = tmp_path / "smoke"
    gate.run_smoke(run)
    import pandas as pd

    from harness.catalogue import check_metric

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
