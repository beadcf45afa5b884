"""The project's CI gate: the `smoke` suite against the committed benchmarks/baseline_smoke.json.

Both the baseline and the gate's run train in a subprocess with one thread and pinned CPU kernels
(ATen AVX2 kernels, convolutions on ATen's reference kernels instead of oneDNN, whose blocking follows
the CPU's caches, and MKL's conditional numerical reproducibility at AVX2), so
a baseline written on one x86-64 machine reproduces on another whatever its core count or vector
width: training amplifies last-bit differences between kernels into accuracy differences. That
holds within one CPU vendor: an AMD EPYC (Zen 3) ran the same pinned kernels to different numbers
than the Intel machines the baseline was written on (FractalNet-tiny top-1 47.08 vs 28.97 %, the
same on every rerun on either), so AMD CPUs have their own baseline, baseline_smoke_AuthenticAMD.json,
and `refresh` writes the one of the CPU it runs on (refresh on both after an intended change).

    python benchmarks/gate.py refresh   # after an intended change: rewrite the baseline (make baseline)
    python benchmarks/gate.py check      # what CI runs (tests/test_smoke_gate.py): exit 1 on a regression
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.environment import cpuinfo_value

ROOT = Path(__file__).resolve().parent.parent


def baseline_for(vendor: str) -> Path:
    """The committed baseline of a CPU vendor: baseline_smoke.json (written on Intel) unless the
    vendor has its own, baseline_smoke_<vendor>.json."""
    own = ROOT / "benchmarks" / f"baseline_smoke_{vendor}.json"
    return own if vendor == "AuthenticAMD" else ROOT / "benchmarks" / "baseline_smoke.json"


BASELINE = baseline_for(cpuinfo_value("vendor_id"))  # GenuineIntel, AuthenticAMD or ""
SUITE = "smoke"
GATE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "FRACTALBENCH_ONEDNN": "0",
}


def cli(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``fractalbench ARGS`` in a subprocess with the gate's environment."""
    env = {**os.environ, **GATE_ENV}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_smoke(out: Path) -> subprocess.CompletedProcess:
    done = cli("run", SUITE, "--out", str(out))
    if done.returncode != 0 or " 0 failed" not in done.stdout:
        raise RuntimeError(f"the {SUITE} suite did not finish cleanly:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def check(run: Path, markdown: Path | None = None) -> subprocess.CompletedProcess:
    """Compare a finished run with the committed baseline (exit code 0, 1 regression, 2 bad input)."""
    args = ["compare", str(BASELINE), str(run)]
    if markdown is not None:
        args += ["--markdown", str(markdown)]
    return cli(*args)


def refresh(run: Path) -> subprocess.CompletedProcess:
    return cli("baseline", str(run), str(BASELINE))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["refresh"], ["check"]):
        print("usage: python benchmarks/gate.py refresh|check", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fractalbench-gate-") as tmp:
        run = Path(tmp) / SUITE
        print(run_smoke(run).stdout.strip().splitlines()[-2])
        done = refresh(run) if args == ["refresh"] else check(run)
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
