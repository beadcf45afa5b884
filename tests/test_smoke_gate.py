"""The project's own CI gate (issue #7): the `smoke` suite, run as a user runs it, compared with the
baseline committed in benchmarks/baseline_smoke.json on its deterministic metrics (parameters,
MACs/FLOPs, accuracy and exit fractions on the fixed seed). A changed MAC count, a parameter
count or an accuracy drop beyond the suite's threshold fails CI.

Refresh the baseline after an intended change (README, "Comparing runs and the CI gate"):
    fractalbench run smoke --out runs/smoke && fractalbench baseline runs/smoke benchmarks/baseline_smoke.json
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness.suites import load_suite

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "benchmarks" / "baseline_smoke.json"


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def baseline_rows() -> list[dict]:
    data = json.loads(BASELINE.read_text(encoding="utf-8"))
    return data["rows"] if isinstance(data, dict) else data


def test_committed_baseline_covers_every_smoke_model():
    rows = baseline_rows()
    models = {r["model"] for r in rows}
    assert models == {m.display for m in load_suite("smoke").models}
    assert not [r for r in rows if r["metric"] == "error"], "the baseline was written from a run with failed cells"
    for metric in ("params", "macs", "top1"):
        assert {r["model"] for r in rows if r["metric"] == metric} == models, metric
    assert {r["model"] for r in rows if r["metric"] == "policy_top1"} >= {"branchynet_resnet20_w8", "skipnet38"}


def test_smoke_suite_matches_committed_baseline(tmp_path):
    run = tmp_path / "smoke"
    done = cli("run", "smoke", "--out", str(run))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "0 failed" in done.stdout
    gate = cli("compare", str(BASELINE), str(run), "--markdown", str(tmp_path / "compare.md"))
    assert gate.returncode == 0, f"regression against {BASELINE.name}:\n{gate.stdout[-4000:]}{gate.stderr[-2000:]}"
    assert (tmp_path / "compare.md").read_text(encoding="utf-8").strip()
