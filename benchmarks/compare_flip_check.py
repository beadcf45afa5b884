"""Does `compare` catch a deliberate drop on a real run? Flip right answers to wrong and compare.

Copies a run directory that kept per-sample outcomes (e.g. a CIFAR-10 run: 10,000 test images),
turns ``--flips`` of the right answers of one accuracy row (default: the last exit's top-1 of the
first cell with outcomes) into wrong ones, in its outcomes and in its row, and compares the copy
with the original: the row must be a REGRESSION (McNemar b = flips, c = 0) and no other row may be.
The original against an unchanged copy must show no accuracy regression.

    python benchmarks/compare_flip_check.py runs/cifar10 [--flips 100] [--cell CELL_ID]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fractalbench.harness.outcomes import CellOutcomes, load_run_outcomes, outcomes_path  # noqa: E402
from fractalbench.reports.compare import ACCURACY_METRICS, REGRESSION, compare  # noqa: E402


def copy_run(src: Path, dest: Path) -> Path:
    """The run's rows and outcomes (no checkpoints) in ``dest``."""
    for name in ("cells", "outcomes"):
        shutil.copytree(src / name, dest / name)
    for name in ("suite.json", "environment.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    return dest


def flip(run: Path, cell_id: str, flips: int, seed: int = 0) -> tuple[dict, float, float]:
    """Turn ``flips`` right answers of the cell's last-exit top-1 wrong; (row, before, after)."""
    outcomes = CellOutcomes.load(outcomes_path(run, cell_id))
    last = max((o for o in outcomes if o.metric == "top1" and o.exit is not None), key=lambda o: o.exit)
    right = np.flatnonzero(last.correct)
    chosen = np.random.default_rng(seed).choice(right, size=flips, replace=False)
    bits = last.correct.copy()
    bits[chosen] = False
    outcomes.add("top1", bits, exit=last.exit)
    outcomes.save(outcomes_path(run, cell_id))
    path = run / "cells" / f"{cell_id}.json"
    cell = json.loads(path.read_text())
    row = next(r for r in cell["rows"] if r["metric"] == "top1" and r["exit"] == last.exit and r["split"] == "test")
    before = row["value"]
    row["value"] = 100.0 * bits.sum() / bits.size
    path.write_text(json.dumps(cell))
    return row, before, row["value"]


def accuracy_regressions(result) -> list:
    return [r for r in result.results if r.status == REGRESSION and r.kind == "accuracy"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--flips", type=int, default=100)
    parser.add_argument("--cell", default=None, help="cell id (default: the first with outcomes)")
    args = parser.parse_args(argv)
    cells = sorted(load_run_outcomes(args.run))
    if not cells:
        print(f"{args.run} kept no per-sample outcomes (run or --remeasure it with this fractalbench)")
        return 2
    cell_id = args.cell or cells[0]
    with tempfile.TemporaryDirectory() as tmp:
        same = copy_run(args.run, Path(tmp) / "same")
        flipped = copy_run(args.run, Path(tmp) / "flipped")
        row, before, after = flip(flipped, cell_id, args.flips)
        unchanged = compare(args.run, same)
        result = compare(args.run, flipped)
    tested = sum(1 for r in result.results if r.kind == "accuracy" and r.key.get("metric") in ACCURACY_METRICS)
    print(f"run {args.run}, cell {cell_id}: top1 at exit {row['exit']} {before:.2f} -> {after:.2f} % "
          f"({args.flips} of {row['n']} answers flipped right -> wrong); {tested} accuracy rows compared")
    print(f"unchanged copy: {len(accuracy_regressions(unchanged))} accuracy regression(s)")
    found = accuracy_regressions(result)
    for r in found:
        print(f"  REGRESSION {r.key['model']} {r.key['metric']} exit {r.key['exit']}: p = {r.p_value:.3g}; {r.note}")
    caught = len(found) == 1 and found[0].key["exit"] == row["exit"] and found[0].key["metric"] == "top1"
    print(f"flipped copy: {'caught' if caught else 'NOT caught as expected'} ({len(found)} accuracy regression(s))")
    return 0 if caught and not accuracy_regressions(unchanged) else 1


if __name__ == "__main__":
    raise SystemExit(main())
