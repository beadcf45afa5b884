"""Target: head-only SDN on a trained ResNet-56, with three budget fits, the whole cell in at most 15
minutes on a 2-core CPU.

Runs the `cifar10` suite's `sdn_resnet56` entry as one cell (its recipe: the internal classifiers
trained for 3 epochs with Adam on the frozen backbone; every metric of the suite: accuracy, the
threshold sweeps and the 0.25/0.5/0.75 budget fits on validation, MACs, latency per exit and per
policy, memory), with the backbone loaded straight from the public ResNet-56 weights (the suite
builds it on its adapted ResNet-56 cell; the cost of the cell is the same). Prints the cell's wall
time and each step's, and exits 1 when the cell takes longer than the target. Needs the public
weights and CIFAR-10 (../shared/data, unpacked under data/); run it with nothing else on the cores.

    python benchmarks/bench_head_only_sdn.py [--target-s 900] [--out runs/bench_head_only_sdn]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fractalbench.harness.runner import run_suite  # noqa: E402
from fractalbench.harness.suites import load_suite, parse_suite  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "data" / "weights" / "resnet56-4bfd9763.th"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-s", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_head_only_sdn")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    if not args.weights.is_file():
        print(f"skipped: {args.weights} is absent (the public ResNet-56 weights)")
        return 0
    raw = dict(load_suite("cifar10").raw)
    (entry,) = [dict(m) for m in raw["models"] if isinstance(m, dict) and m.get("label") == "sdn_resnet56"]
    entry["weights"] = str(args.weights)
    raw.update(name="bench_head_only_sdn", models=[entry])
    summary = run_suite(parse_suite(raw, "bench_head_only_sdn"), args.out)
    if summary.failed or not (summary.finished or summary.skipped):
        print(f"the cell failed: see {args.out}/cells")
        return 1
    record = json.loads((args.out / "cells" / "sdn_resnet56__cifar10__cpu.json").read_text())
    (cell,) = [r for r in record["rows"] if r["metric"] == "cell_seconds"]
    detail = json.loads(cell["detail"]) if isinstance(cell["detail"], str) else cell["detail"]
    budgets = sorted({r["policy"] for r in record["rows"] if "@budget" in str(r.get("policy"))})
    print(f"cell: {cell['value']:.0f} s (target {args.target_s:.0f} s) on {record['meta']['machine'].get('cpu')}, "
          f"{detail.get('threads')} threads; steps (s): {detail.get('steps')}")
    print(f"budget fits: {', '.join(budgets)}")
    return 0 if cell["value"] <= args.target_s else 1


if __name__ == "__main__":
    sys.exit(main())
