"""Wall time of independent single-thread cells run one after the other (--jobs 1) and side by side (--jobs N).

    .venv/bin/python benchmarks/bench_jobs.py              # 4 cells of ResNet-20, 16x16 digits, 2 epochs
    .venv/bin/python benchmarks/bench_jobs.py --jobs 2 --cells 4 --epochs 2

Each cell is one seed of ResNet-20 (``seeds: [0..cells-1]``), trained and measured with one torch
thread (``OMP_NUM_THREADS=1``, so the rule of fractalbench.harness.executors also gives each of the N cell
processes one thread). Both runs are ``fractalbench run`` in a fresh process into fresh run
directories; the script prints each wall time (and the CPU time of the run and its cell processes:
each cell process pays ~3 CPU s of start-up), their ratio, the 1-minute load average before and
after (other work on the machine shares its cores and slows both runs), and whether both runs
have the same top-1 values (they must: threads and seeds are the same).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_suite(folder: Path, cells: int, epochs: int, image_size: int) -> Path:
    """A suite of ``cells`` independent ResNet-20 cells (one per seed)."""
    suite = {"name": "bench_jobs", "description": "independent single-thread cells for benchmarks/bench_jobs.py",
             "seeds": list(range(cells)), "datasets": [{"name": "digits", "image_size": image_size}],
             "models": ["resnet20"], "train": {"epochs": epochs, "batch_size": 64}, "metrics": ["accuracy"]}
    path = folder / "bench_jobs.yaml"
    path.write_text(yaml.safe_dump(suite), encoding="utf-8")
    return path


def timed_run(suite: Path, out: Path, jobs: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of it and its cell processes) of one ``fractalbench run SUITE --jobs
    JOBS`` (a fresh process, one thread per cell)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "fractalbench", "run", str(suite), "--out", str(out), "--jobs", str(jobs),
               "--no-report", "--no-progress"]
    cpu = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"--jobs {jobs} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return took, _children_cpu() - cpu


def _children_cpu() -> float:
    """User + system CPU seconds of every finished descendant of this process."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def top1(out: Path) -> dict[str, float]:
    from fractalbench.harness.results import load_run

    frame = load_run(out)
    return {r.cell_id: r.value for r in frame[frame.metric == "top1"].itertuples()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--jobs", type=int, default=2, help="the parallel run's --jobs (default 2)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        folder = Path(tmp)
        suite = write_suite(folder, args.cells, args.epochs, args.image_size)
        load_before = os.getloadavg()[0]
        one = timed_run(suite, folder / "jobs1", 1)
        many = timed_run(suite, folder / f"jobs{args.jobs}", args.jobs)
        load_after = os.getloadavg()[0]
        same = top1(folder / "jobs1") == top1(folder / f"jobs{args.jobs}")
    print(f"{args.cells} cells (resnet20, digits {args.image_size}px, {args.epochs} epochs, 1 thread each) "
          f"on {os.cpu_count()} CPUs")
    for jobs, (wall, cpu) in ((1, one), (args.jobs, many)):
        print(f"--jobs {jobs}: {wall:.1f} s wall, {cpu:.1f} CPU s (run and cell processes)")
    print(f"ratio jobs1/jobs{args.jobs}: {one[0] / many[0]:.2f}x wall")
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f}; same top-1 values: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
