"""How often `compare` calls an accuracy REGRESSION between runs of the same build (false alarms).

Runs one small suite (16x16 digits, one model, metrics accuracy + sweep) with 21 suite seeds,
compares seed 0 with each of the 20 others with :func:`fractalbench.reports.compare.compare` and prints how many
of the 20 comparisons had any accuracy REGRESSION (the false-alarm rate: the seeds change the
initialisation and the batch order, nothing else; the test samples are the same, so every accuracy
row is compared by McNemar's exact test), and how many accuracy rows each comparison tested (the
Holm family). Then a synthetic check on 10,000 samples: 100 of the baseline's right answers made
wrong (a drop of exactly ``accuracy_points`` = 1) must be caught.

    python benchmarks/compare_false_alarms.py                 # a temporary folder
    python benchmarks/compare_false_alarms.py --out runs/fa   # keep the runs; finished ones are reused

Each run trains on one thread: resnet20, 2 epochs, took 4-8 s a run here (15 s while the cores were busy).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fractalbench.harness.outcomes import CellOutcomes, outcomes_path  # noqa: E402
from fractalbench.harness.results import CellRecord, RunStore, make_row  # noqa: E402
from fractalbench.harness.runner import run_suite  # noqa: E402
from fractalbench.harness.suites import parse_suite  # noqa: E402
from fractalbench.reports.compare import ACCURACY_METRICS, REGRESSION, compare  # noqa: E402


def seed_suite(seed: int, model: str, epochs: int):
    raw = {"name": "false-alarms", "seed": seed, "devices": ["cpu"],
           "datasets": [{"name": "digits", "image_size": 16}], "models": [model],
           "train": {"epochs": epochs, "batch_size": 64}, "metrics": ["accuracy", "sweep"]}
    return parse_suite(raw, "false_alarms.yaml")


def run_seeds(out: Path, seeds: range, model: str, epochs: int) -> list[Path]:
    """One run directory per seed under ``out`` (cells already finished there are kept)."""
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        summary = run_suite(seed_suite(seed, model, epochs), out / f"seed{seed:02d}")
        if summary.failed:
            raise SystemExit(f"seed {seed}: cells failed: {summary.failed}")
        state = "reused" if summary.skipped else f"{time.perf_counter() - t0:.1f} s"
        print(f"  seed {seed:2d}: {state}", flush=True)
        runs.append(out / f"seed{seed:02d}")
    return runs


def false_alarms(runs: list[Path]) -> None:
    """Compare runs[0] with each other run and print the accuracy verdicts."""
    alarms, sizes = 0, []
    for seed, run in enumerate(runs[1:], 1):
        result = compare(runs[0], run)
        acc = [r for r in result.results if r.key.get("metric") in ACCURACY_METRICS and r.p_value is not None]
        flagged = [r for r in acc if r.status == REGRESSION]
        alarms += bool(flagged)
        sizes.append(len(acc))
        methods = sorted({r.note.split(",")[0] for r in acc})
        worst = min(acc, key=lambda r: r.p_value)
        print(f"  seed 0 vs {seed:2d}: {len(acc)} accuracy rows ({'; '.join(methods)}), "
              f"{len(flagged)} REGRESSION; smallest adjusted p {worst.p_value:.3g} "
              f"({worst.key['metric']} {worst.change}: {worst.note.split(';')[0]})")
    n = len(runs) - 1
    print(f"comparisons with any accuracy REGRESSION: {alarms} of {n}")
    print(f"false-alarm rate: {alarms / n:.3f}")
    print(f"accuracy rows per comparison (Holm family): {sorted(set(sizes))}")


def write_synthetic(path: Path, right: np.ndarray) -> Path:
    """A run directory with one top1 row (n = len(right)) and its per-sample outcomes."""
    store = RunStore(path)
    path.mkdir(parents=True, exist_ok=True)
    store.write_meta("suite.json", {"name": "synthetic", "digest": "synthetic", "content": {"name": "synthetic"}})
    cell = "synthetic__digits__cpu"
    row = make_row("top1", 100.0 * float(right.mean()), "%", model="synthetic", variant="synthetic",
                   dataset="digits", device="cpu", exit=0, split="test", n=right.size, cell_id=cell)
    store.write_cell(CellRecord(cell, "ok", [row]))
    outcomes = CellOutcomes(np.arange(right.size) % 10)
    outcomes.add("top1", right, exit=0)
    outcomes.save(outcomes_path(path, cell))
    return path


def synthetic_check(folder: Path) -> None:
    """10,000 samples, 90 % right; the candidate loses 100 right answers (-1.00 point)."""
    right = np.zeros(10_000, dtype=bool)
    right[:9_000] = True
    worse = right.copy()
    worse[np.flatnonzero(right)[:100]] = False
    result = compare(write_synthetic(folder / "base", right), write_synthetic(folder / "cand", worse))
    row = next(r for r in result.results if r.key.get("metric") == "top1")
    caught = "caught" if row.status == REGRESSION else "NOT caught"
    print(f"10,000-sample synthetic check: 100 right->wrong flips ({row.change}) {caught}: {row.status}, "
          f"p = {row.p_value:.3g} (2^-100 = {2.0**-100:.3g}); {row.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the runs (kept; finished runs are reused)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=21, help="seeds 0..N-1; seed 0 is the baseline")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="false_alarms_") as tmp:
        out = args.out or Path(tmp)
        print(f"{args.seeds} runs of {args.model} ({args.epochs} epochs, digits 16x16) in {out}", flush=True)
        runs = run_seeds(out, range(args.seeds), args.model, args.epochs)
        false_alarms(runs)
        synthetic_check(Path(tmp) / "synthetic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
