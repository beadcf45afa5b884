"""Wall-time targets of the shipped suites on this project's reference machine (2 CPU cores):
`smoke` within 3 minutes, `default` (the main job, `make run`) within 5, and a second run of the same
command with nothing left to do within 10 seconds (it builds no model and keeps a current report).
Run with `make bench` (they are marked slow) or `python benchmarks/test_suite_wall_time.py SUITE` to
print the times of one suite."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = {"smoke": 180.0, "default": 300.0}
RESUME_SECONDS = 10.0


def time_suite(suite: str, out: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fractalbench", "run", suite, "--out", str(out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"suite {suite} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    if " 0 failed" not in proc.stdout:
        raise RuntimeError(f"suite {suite} had failed cells:\n{proc.stdout[-3000:]}")
    return took


@pytest.mark.slow
@pytest.mark.parametrize("suite", sorted(TARGET_SECONDS))
def test_suite_finishes_within_target(suite, tmp_path):
    took = time_suite(suite, tmp_path / suite)
    again = time_suite(suite, tmp_path / suite)
    print(f"{suite}: {took:.1f} s (target {TARGET_SECONDS[suite]:.0f} s); nothing to do: {again:.1f} s "
          f"(target {RESUME_SECONDS:.0f} s)")
    assert took < TARGET_SECONDS[suite]
    assert again < RESUME_SECONDS


if __name__ == "__main__":
    import tempfile

    for name in sys.argv[1:] or sorted(TARGET_SECONDS):
        with tempfile.TemporaryDirectory() as tmp:
            first = time_suite(name, Path(tmp) / name)
            again = time_suite(name, Path(tmp) / name)
            print(f"{name}: {first:.1f} s (target {TARGET_SECONDS[name]:.0f} s); nothing to do: {again:.1f} s "
                  f"(target {RESUME_SECONDS:.0f} s)")
