"""fractalbench as an installed package: a wheel built from this checkout, installed outside it, finds
its bundled suites and report templates through importlib.resources and runs a one-cell suite whose
latency worker starts from the installed package (not from the source tree). About 20 s."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SUITE = """\
name: installed
datasets: [{name: digits, image_size: 8}]
models: [linear]
train: {epochs: 1, batch_size: 64}
metrics: [accuracy, cost, latency]
latency: {repeats: 3, warmup: 1, stream_samples: 4, isolate: true}
"""


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(a working directory outside the checkout, the environment whose PYTHONPATH holds only the
    installed wheel's files)."""
    tmp = tmp_path_factory.mktemp("install")
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                  "-w", str(tmp / "dist"), str(ROOT)], tmp, dict(os.environ))
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("fractalbench-*.whl")
    target = tmp / "site"
    done = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                tmp, dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    return work, env


def test_wheel_imports_from_its_install_location(installed: tuple[Path, dict[str, str]]) -> None:
    work, env = installed
    code = ("import fractalbench, fractalbench.harness as h, fractalbench.reports as r, fractalbench.suites as s; "
            "print(fractalbench.__file__); print(h.__file__); print(r.__file__); print(s.__file__)")
    done = _run([sys.executable, "-c", code], work, env)
    assert done.returncode == 0, done.stderr
    assert all(line.startswith(env["PYTHONPATH"]) for line in done.stdout.split()), done.stdout
    # one namespace: the wheel installs no top-level harness/baselines/reports/suites to collide with
    top = sorted(p.name for p in Path(env["PYTHONPATH"]).iterdir() if p.name != "bin" and ".dist-info" not in p.name)
    assert top == ["fractalbench"]


SHADOWED = """\
from fractalbench import benchmark

frame = benchmark("branchynet_resnet20", {"name": "digits", "image_size": 8}, ["accuracy"],
                  train={"epochs": 1, "batch_size": 64}, out="run", report=True, as_frame=True)
print("top1 rows:", int((frame["metric"] == "top1").sum()))
"""


def test_a_users_baselines_and_reports_folders_do_not_shadow_fractalbench(
        installed: tuple[Path, dict[str, str]]) -> None:
    """The finding: from a folder holding a `baselines/` directory, "unknown model
    'branchynet_resnet20'"; with a `reports/` directory, report=True broke. Both folders (packages,
    even) beside the script now change nothing."""
    work, env = installed
    project = work / "project"
    for name in ("baselines", "reports", "harness", "suites"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text("raise ImportError('the user\\'s own package was imported')\n")
    (project / "script.py").write_text(SHADOWED, encoding="utf-8")
    done = _run([sys.executable, "script.py"], project, env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "top1 rows: 3" in done.stdout
    assert (project / "run" / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_installed_wheel_lists_suites_and_runs_one(installed: tuple[Path, dict[str, str]]) -> None:
    work, env = installed
    listed = _run([sys.executable, "-m", "fractalbench", "list", "suites"], work, env)
    assert listed.returncode == 0, listed.stderr
    for name in ("smoke", "default", "paper", "cost"):
        assert name in listed.stdout
    (work / "installed.yaml").write_text(SUITE, encoding="utf-8")
    run = _run([sys.executable, "-m", "fractalbench", "run", "installed.yaml", "--out", "run", "--no-progress"],
               work, env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "1 cell(s) finished" in run.stdout and "0 failed" in run.stdout
    import pandas as pd

    frame = pd.read_csv(work / "run" / "results.csv")
    assert frame["error"].isna().all(), frame[frame["error"].notna()]
    latency = frame[frame["metric"] == "latency"]
    assert len(latency) >= 1 and (latency["value"] > 0).all()  # measured in a worker started from the wheel
    assert '"isolated": true' in latency["detail"].iloc[0]
    assert (work / "run" / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
