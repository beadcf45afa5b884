"""How long a suite's training takes on this machine, per model, from a short timed slice of each
model's own recipe (the suite's training settings with the entry's overrides, attribute-sweep
stages included), extrapolated to the recipe's steps.

Each model is built as the runner builds it and trained by ``fractalbench.harness.train.train_model`` with its
suite settings (optimizer, precision, compile, batch size) on in-memory uint8 images of the
dataset's shape (random pixels: the cost does not depend on them). One untimed slice first
(compilation, allocator, kernel selection), then ``--steps`` timed steps; the estimate is
steps/epoch x epochs x seconds/step, with steps/epoch from ``--train-images`` (CIFAR-10 with the
suite's 10 % validation split: 45,000). Not included: evaluation and measurement (sweeps, latency
streams, memory), and compilation (one slice per model, printed separately). A run's own record
of each epoch is in its checkpoints (``epoch_seconds``); this is the estimate before running.

    python benchmarks/bench_suite_training.py [SUITE] [--steps 30] [--train-images 45000] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fractalbench.harness._images import UInt8Images  # noqa: E402
from fractalbench.harness.data import Augmented, RandomCropFlip  # noqa: E402
from fractalbench.harness.registry import ModelSpec  # noqa: E402
from fractalbench.harness.suites import load_suite, sweep_train_config, train_config_for  # noqa: E402
from fractalbench.harness.train import TrainConfig, train_model  # noqa: E402


def images(n: int, classes: int = 10, side: int = 32) -> Augmented:
    gen = torch.Generator().manual_seed(0)
    data = UInt8Images(torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen),
                       torch.randint(0, classes, (n,), generator=gen),
                       torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26]))
    return Augmented(data, RandomCropFlip(4, flip=True))


def seconds_per_step(model: torch.nn.Module, cfg: TrainConfig, steps: int) -> tuple[float, float]:
    """(first slice's seconds, seconds per step of the timed slice); the model is trained in place."""
    data = images(cfg.batch_size * steps)
    first = time.perf_counter()
    train_model(model, data, replace(cfg, epochs=1, warmup_epochs=0.0, max_steps_per_epoch=max(2, steps // 5)))
    first = time.perf_counter() - first
    start = time.perf_counter()
    train_model(model, data, replace(cfg, epochs=1, warmup_epochs=0.0, max_steps_per_epoch=steps))
    return first, (time.perf_counter() - start) / steps


def stages(entry, suite):  # noqa: ANN001, ANN201 - (label, config, attributes to set) per training stage
    out = [("stage 1" if entry.attribute_sweep else "train", train_config_for(suite, entry), {})]
    sweep = entry.attribute_sweep
    if sweep is not None and (cfg := sweep_train_config(suite, entry)) is not None and cfg.epochs > 0:
        for value in sweep.values:
            out.append((f"{sweep.attribute}={value:g}", cfg, {**sweep.set, sweep.attribute: value}))
    return [(label, cfg, attrs) for label, cfg, attrs in out if cfg is not None and cfg.epochs > 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", nargs="?", default="cifar10")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train-images", type=int, default=45_000)
    parser.add_argument("--only", nargs="*", default=None, help="model labels to time (default: all)")
    args = parser.parse_args(argv)
    suite = load_suite(args.suite)
    print(f"suite {suite.name}: {args.steps} timed steps per stage, {args.train_images} training images, "
          f"{torch.get_num_threads()} threads")
    total = compile_total = 0.0
    for entry in suite.models:
        if args.only and entry.display not in args.only:
            continue
        torch.manual_seed(0)
        model = ModelSpec(entry.name, dict(entry.kwargs), 10, 3).build()
        for label, cfg, attrs in stages(entry, suite):
            staged = model
            if attrs:
                staged = copy.deepcopy(model)
                for key, value in attrs.items():
                    setattr(staged, key, value)
            first, per_step = seconds_per_step(staged, cfg, args.steps)
            steps = math.ceil(args.train_images / cfg.batch_size) * cfg.epochs
            estimate = steps * per_step
            total += estimate
            compile_total += first if cfg.compile else 0.0
            print(f"  {entry.display:28s} {label:10s} {cfg.epochs:3d} ep  {cfg.precision:4s}"
                  f"{' compiled' if cfg.compile else '         '}  {cfg.batch_size / per_step:6.0f} images/s  "
                  f"{estimate:7.0f} s  (first slice {first:.1f} s)", flush=True)
    print(f"training, all stages: {total:.0f} s = {total / 3600:.2f} h (+ {compile_total:.0f} s of first "
          "compiled slices; evaluation and measurement not included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
