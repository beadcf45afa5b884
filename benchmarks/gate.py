"""The project's CI gate: committed trained checkpoints, measured, against a committed baseline run.

The gate measures instead of training. ``benchmarks/gate_checkpoints/`` holds the `smoke` suite's
models trained on the embedded digits (small: weights only); ``benchmarks/gate_suite.yaml`` loads
them (``weights:``, ``epochs: 0``) and measures accuracy per exit and per policy, the threshold sweeps
and budget fits, exact MACs and the exit histograms; ``benchmarks/gate_baseline/`` is that suite's run
as committed (cells, per-sample outcomes, no checkpoints). ``check`` runs the gate suite and compares
(``fractalbench compare``): counts must be equal, every accuracy row is compared paired on its test
outcomes (McNemar) and against the suite's ``accuracy_points``, exit histograms by chi-square.

One baseline serves every CPU. Training amplifies last-bit kernel differences into accuracy
differences (AMD and Intel trained FractalNet-tiny to 47.08 vs 28.97 % on the same pinned kernels),
but inference on fixed weights does not: ``flips`` runs the gate suite with oneDNN on and off and
counts the test outcomes that differ between the two (see :data:`MEASURED_FLIPS`), and the
comparison's rules are set above that.

    python benchmarks/gate.py check         # CI (tests/test_smoke_gate.py): exit 1 on a regression, < 1 minute
    python benchmarks/gate.py refresh       # after an intended change: retrain the checkpoints, rewrite the baseline
    python benchmarks/gate.py add LABEL...  # models just added to the smoke suite: train them alone, add their
                                            # checkpoints, rewrite the gate suite and the baseline run
    python benchmarks/gate.py remeasure     # after a change of what is measured (not of the weights): rewrite the
                                            # baseline run from the committed checkpoints, no training
    python benchmarks/gate.py flips         # outcomes that differ between oneDNN on and off
    python benchmarks/gate.py train-check   # training reproducibility (slow): the smoke suite retrained with pinned
                                            # kernels against benchmarks/baseline_smoke[_<vendor>].json
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from fractalbench.harness.environment import cpuinfo_value

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
CHECKPOINTS = HERE / "gate_checkpoints"
GATE_SUITE = HERE / "gate_suite.yaml"
GATE_BASELINE = HERE / "gate_baseline"
SUITE = "smoke"  # the suite whose models the gate's checkpoints are
#: Measured by `flips` (the numbers in the committed baseline's README entry): test outcomes of the
#: gate suite that differ between oneDNN on and off, over every accuracy row of every model.
MEASURED_FLIPS = {"AuthenticAMD": 0, "GenuineIntel": 0}
#: Across the vendors: the gate baseline measured on an AMD EPYC against the same suite measured on an
#: Intel Xeon (AMX): test outcomes that differ, over all 18 models (`count_flips` of the two runs).
MEASURED_FLIPS_ACROSS_VENDORS = 0
#: Smoke models a vendor's training baseline does not hold yet, because it can only be written on a
#: CPU of that vendor (`make train-baseline` there): the ViTs added on an Intel machine (issue 26).
PENDING_TRAINING_BASELINE: dict[str, set[str]] = {
    "AuthenticAMD": {"sdn_vit_lite_2_4", "switch_vit_lite_2_4", "expert_choice_vit_lite_2_4", "haltvit_lite_2_4"}}


def baseline_for(vendor: str) -> Path:
    """The training check's baseline of a CPU vendor: baseline_smoke.json (written on Intel) unless the
    vendor has its own, baseline_smoke_<vendor>.json."""
    own = HERE / f"baseline_smoke_{vendor}.json"
    return own if vendor == "AuthenticAMD" else HERE / "baseline_smoke.json"


BASELINE = baseline_for(cpuinfo_value("vendor_id"))  # GenuineIntel, AuthenticAMD or ""
#: The training check's pinned kernels: one thread, ATen AVX2 kernels, convolutions on ATen's reference
#: kernels instead of oneDNN (whose blocking follows the CPU's caches), MKL's reproducibility at AVX2.
GATE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "FRACTALBENCH_ONEDNN": "0",
}
#: The measuring gate: one thread (the numbers do not depend on it; the time does).
MEASURE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(*args: str, timeout: int = 1800, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``fractalbench ARGS`` in a subprocess with the training check's pinned environment (or ``env``)."""
    full = {**os.environ, **(GATE_ENV if env is None else env)}
    return subprocess.run([sys.executable, "-m", "fractalbench", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def _finished(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if done.returncode != 0 or " 0 failed" not in done.stdout:
        raise RuntimeError(f"{what} did not finish cleanly:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


# ----- the measuring gate --------------------------------------------------------------------------

def run_gate_suite(out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Measure the committed checkpoints (no training) into run directory ``out``."""
    return _finished(cli("run", str(GATE_SUITE), "--out", str(out), "--no-report", env=env or MEASURE_ENV),
                     f"the gate suite {GATE_SUITE.name}")


def check_gate(run: Path, markdown: Path | None = None) -> subprocess.CompletedProcess:
    """Compare a gate-suite run with the committed baseline run (exit 0, 1 regression, 2 bad input)."""
    args = ["compare", str(GATE_BASELINE), str(run)]
    if markdown is not None:
        args += ["--markdown", str(markdown)]
    return cli(*args, env=MEASURE_ENV)


def gate_suite_from_smoke() -> dict:
    """The gate suite: the smoke suite's models, each loading its committed checkpoint, measured untrained."""
    from fractalbench.harness.suites import load_suite

    smoke = load_suite(SUITE)
    raw = dict(smoke.raw)
    models = []
    for entry, written in zip(smoke.models, raw["models"]):
        item = dict(written) if isinstance(written, dict) else {"name": written}
        item.pop("train", None)
        item.pop("attribute_sweep", None)
        if (CHECKPOINTS / f"{entry.display}.pt").is_file():  # noop has no parameters, so no checkpoint
            item["weights"] = f"gate_checkpoints/{entry.display}.pt"
        elif entry.weights is not None:  # measured as assembled (epochs 0, e.g. a cascade of two cells): its
            item["weights"] = [  # sources, each cell's committed checkpoint instead of the cell
                {"source": f"gate_checkpoints/{w.cell_label}.pt" if w.kind == "cell" else w.source,
                 **({"into": w.into} if w.into else {})} for w in entry.weights]
        models.append(item)
    raw.pop("train", None)
    raw.update(name="gate", description="the smoke suite's trained checkpoints measured without training (CI gate)",
               models=models, metrics=["accuracy", "cost", "sweep"])
    return raw


def refresh_gate(models: list[str] | None = None) -> None:
    """Train the smoke suite (pinned kernels), keep each model's weights as the gate's checkpoints,
    write the gate suite and measure it into the committed baseline run. ``models``: train only these
    smoke models (labels; e.g. one just added to the suite) and keep the other checkpoints."""
    import torch

    from fractalbench.harness.checkpoints import CHECKPOINT_FORMAT

    with tempfile.TemporaryDirectory(prefix="fractalbench-gate-") as tmp:
        trained = Path(tmp) / SUITE
        _finished(cli("run", SUITE, "--out", str(trained), "--no-report", *(["--models", *models] if models else [])),
                  f"the {SUITE} suite")
        if CHECKPOINTS.exists() and not models:
            shutil.rmtree(CHECKPOINTS)
        CHECKPOINTS.mkdir(parents=True, exist_ok=True)
        for cell in sorted((trained / "cells").glob("*.json")):
            record = json.loads(cell.read_text(encoding="utf-8"))
            label = record["rows"][0]["model"]
            if models and label not in models:  # a cell it starts from, trained again: keep the committed one
                continue
            if not (trained / "artifacts" / cell.stem / "model.pt").is_file():
                continue  # a model without parameters (noop) has no checkpoint
            state = torch.load(trained / "artifacts" / cell.stem / "model.pt", map_location="cpu", weights_only=True)
            torch.save({"format": CHECKPOINT_FORMAT, "spec": state.get("spec", {}), "epoch": state.get("epoch", 0),
                        "model": state["model"], "optimizer": None, "scheduler": None, "extra": {}},
                       CHECKPOINTS / f"{label}.pt")
        header = "# Written by `python benchmarks/gate.py refresh`: the smoke suite's models, measured from their\n" \
                 "# committed checkpoints (benchmarks/gate_checkpoints/) without training.\n"
        GATE_SUITE.write_text(header + yaml.safe_dump(gate_suite_from_smoke(), sort_keys=False), encoding="utf-8")
    remeasure_gate("python benchmarks/gate.py refresh")


def remeasure_gate(command: str = "python benchmarks/gate.py remeasure") -> None:
    """Measure the committed checkpoints with the committed gate suite into the baseline run (after a
    change of what is measured, e.g. a new cost unit; the weights and so the outcomes stay)."""
    with tempfile.TemporaryDirectory(prefix="fractalbench-gate-") as tmp:
        measured = Path(tmp) / "gate"
        run_gate_suite(measured)
        if GATE_BASELINE.exists():
            shutil.rmtree(GATE_BASELINE)
        _finished_export(cli("export", str(measured), str(GATE_BASELINE), "--command", command, env=MEASURE_ENV))
        for table in ("results.csv", "results.json"):  # the rows are the cell files'; compare reads those
            (GATE_BASELINE / table).unlink(missing_ok=True)


def _finished_export(done: subprocess.CompletedProcess) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"export failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def count_flips(first: Path, second: Path) -> dict[str, int]:
    """Per cell: how many (accuracy row, test sample) outcomes differ between two runs of the gate
    suite, right/wrong or (for an operating point) the exit taken."""
    from fractalbench.harness.outcomes import load_run_outcomes

    a, b = load_run_outcomes(first), load_run_outcomes(second)
    flips = {}
    for cell, outcomes in a.items():
        other = b[cell].entries
        flips[cell] = sum(int((o.correct != other[key].correct).sum()) + (0 if o.exit_index is None else int(
            (o.exit_index != other[key].exit_index).sum())) for key, o in outcomes.entries.items())
    return flips


def measure_flips() -> dict[str, int]:
    with tempfile.TemporaryDirectory(prefix="fractalbench-flips-") as tmp:
        on, off = Path(tmp) / "onednn_on", Path(tmp) / "onednn_off"
        run_gate_suite(on, {**MEASURE_ENV, "FRACTALBENCH_ONEDNN": "1"})
        run_gate_suite(off, {**MEASURE_ENV, "FRACTALBENCH_ONEDNN": "0"})
        return count_flips(on, off)


# ----- the training reproducibility check ------------------------------------------------------------

def run_smoke(out: Path) -> subprocess.CompletedProcess:
    return _finished(cli("run", SUITE, "--out", str(out)), f"the {SUITE} suite")


def check(run: Path, markdown: Path | None = None) -> subprocess.CompletedProcess:
    """Compare a trained smoke run with the vendor's committed training baseline."""
    args = ["compare", str(BASELINE), str(run)]
    if markdown is not None:
        args += ["--markdown", str(markdown)]
    return cli(*args)


def refresh(run: Path) -> subprocess.CompletedProcess:
    return cli("baseline", str(run), str(BASELINE))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = ("check", "refresh", "add", "remeasure", "flips", "train-check", "train-refresh")
    if args and args[0] == "add" and len(args) > 1:
        refresh_gate(args[1:])
        print(f"gate: {', '.join(args[1:])} added to {CHECKPOINTS}, baseline run in {GATE_BASELINE}")
        return 0
    if len(args) != 1 or args[0] not in commands or args[0] == "add":
        print(f"usage: python benchmarks/gate.py {'|'.join(commands)} (add takes smoke model labels)", file=sys.stderr)
        return 2
    command = args[0]
    if command == "refresh":
        refresh_gate()
        print(f"gate: checkpoints in {CHECKPOINTS}, baseline run in {GATE_BASELINE}")
        return 0
    if command == "remeasure":
        remeasure_gate()
        print(f"gate: baseline run in {GATE_BASELINE}, measured from {CHECKPOINTS}")
        return 0
    if command == "flips":
        flips = measure_flips()
        print(json.dumps({"vendor": cpuinfo_value("vendor_id"), "flips": flips, "total": sum(flips.values())}))
        return 0
    with tempfile.TemporaryDirectory(prefix="fractalbench-gate-") as tmp:
        if command == "check":
            run = Path(tmp) / "gate"
            run_gate_suite(run)
            done = check_gate(run)
        else:
            run = Path(tmp) / SUITE
            print(run_smoke(run).stdout.strip().splitlines()[-2])
            done = refresh(run) if command == "train-refresh" else check(run)
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
