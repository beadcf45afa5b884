"""Train one model with DistributedDataParallel under ``torchrun`` (or alone without it).

    torchrun --standalone --nproc_per_node 2 -m fractalbench.harness.distributed --model resnet20 --out ckpt.pt

Uses the gloo backend on CPU and NCCL on CUDA. Rank 0 writes a checkpoint (loadable with
``weights_only=True``) with the final weights and the test top-1 accuracy in ``extra``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fractalbench.harness.distributed", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--kwargs", default="{}", help="builder options as JSON")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="train on un-augmented images (exact comparisons)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from fractalbench.harness.checkpoints import save_checkpoint
    from fractalbench.harness.data import Augmented, DatasetConfig, load_dataset
    from fractalbench.harness.evaluate import collect_exit_logits, topk_accuracy
    from fractalbench.harness.registry import ModelSpec
    from fractalbench.harness.train import TrainConfig, distributed_env, train_model

    args = parse_args(argv)
    rank, world = distributed_env()
    device = args.device
    if world > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    try:
        splits = load_dataset(DatasetConfig(args.dataset, image_size=args.image_size))
        train_set = splits.train.base if args.no_augment and isinstance(splits.train, Augmented) else splits.train
        spec = ModelSpec(args.model, json.loads(args.kwargs), splits.num_classes, splits.in_chans)
        torch.manual_seed(args.seed)
        model = spec.build()
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                          seed=args.seed, weight_decay=0.0, momentum=0.9, schedule="none")
        train_model(model, train_set, cfg, device=device)
        if rank == 0:
            logits, labels = collect_exit_logits(model, splits.test, 256, device)
            top1 = topk_accuracy(logits[-1], labels, 1)
            save_checkpoint(args.out, model.cpu(), spec=spec.to_dict(), epoch=args.epochs,
                            extra={"top1": top1, "world_size": world})
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
