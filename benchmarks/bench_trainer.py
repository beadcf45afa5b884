"""Trainer throughput against a bare PyTorch loop on the same model, batch and data (issue 14).

Both train the same model (default resnet20, batch 128, SGD with momentum, bf16 autocast optional)
on the same in-memory uint8 images (CIFAR-10 shaped, 3x32x32; random pixels, the cost does not
depend on them):

- trainer: ``fractalbench.harness.train.train_model`` for one epoch of ``--steps`` steps: batches gathered,
  normalised and augmented (random crop and flip per sample) on the device, loss terms summed on
  the device, the scheduler stepped, the finiteness check every 25 steps;
- bare: ``for x, y in batches: loss = cross_entropy(model(x), y); zero_grad; backward; step`` on
  the same gathered and normalised batches, no augmentation, no bookkeeping.

They alternate for ``--rounds`` rounds (so drift and interference hit both), after one warm-up of
each; the result is images/s of each and the median of the per-round ratios trainer / bare. The
target is >= 0.95.

    python benchmarks/bench_trainer.py [--model resnet20] [--steps 20] [--rounds 3] [--bf16] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fractalbench.harness._images import UInt8Images  # noqa: E402
from fractalbench.harness.data import Augmented, RandomCropFlip  # noqa: E402
from fractalbench.harness.registry import create_model  # noqa: E402
from fractalbench.harness.train import TrainConfig, train_model  # noqa: E402


def dataset(n: int) -> UInt8Images:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return UInt8Images(pixels, labels, torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26]))


def trainer_seconds(model: torch.nn.Module, data: UInt8Images, args: argparse.Namespace) -> float:
    cfg = TrainConfig(epochs=1, batch_size=args.batch, lr=0.05, max_steps_per_epoch=args.steps,
                      precision="bf16" if args.bf16 else "fp32")
    start = time.perf_counter()
    train_model(model, Augmented(data, RandomCropFlip(4, flip=True)), cfg, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bare_seconds(model: torch.nn.Module, data: UInt8Images, args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    pixels, labels = data.images.to(device), data.labels.to(device)
    mean, std = data.mean.to(device), data.std.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.to(device).train()
    order = torch.randperm(len(data))
    start = time.perf_counter()
    for step in range(args.steps):
        index = order[step * args.batch:(step + 1) * args.batch].to(device)
        x = (pixels[index].float().div_(255.0) - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(x), labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = dataset(args.batch * args.steps)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10)
    images = args.batch * args.steps
    trainer_seconds(model, data, args), bare_seconds(model, data, args)  # warm-up (allocator, kernels)
    ratios, rates = [], {"trainer": [], "bare": []}
    for _ in range(args.rounds):
        t, b = trainer_seconds(model, data, args), bare_seconds(model, data, args)
        rates["trainer"].append(images / t)
        rates["bare"].append(images / b)
        ratios.append(b / t)
    print(f"{args.model}, batch {args.batch}, {args.steps} steps, {args.device}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for name, values in rates.items():
        print(f"  {name:8s} images/s: " + ", ".join(f"{v:.0f}" for v in values))
    print(f"  trainer / bare (median of rounds): {statistics.median(ratios):.3f}  (rounds: "
          + ", ".join(f"{r:.3f}" for r in ratios) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
