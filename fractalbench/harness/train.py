"""One trainer for every model, driven by the model's declared objective (named loss terms).

The loss minimised is the sum of ``contract.loss_terms(model, x, y)``; each term's epoch mean is
recorded. SGD or Adam, step or cosine schedule with an optional linear warm-up (``warmup_epochs``),
fp32 or bf16 autocast (``precision``), an optional ``torch.compile`` of the training step
(``compile``; inductor needs a C++ compiler), channels-last memory format (``channels_last``),
seeded shuffling, a checkpoint after every epoch (resumed when present), a progress bar, and a
clear error when the loss stops being finite.

Keeping a GPU busy: an in-memory image dataset is batched on the device (:mod:`fractalbench.harness._batches`:
uint8 images moved once, each batch gathered, normalised and augmented there, vectorised), and a
step never synchronises with the host: loss terms are summed on the device and a non-finite loss
is found when the host looks, every ``CHECK_EVERY`` steps and at the end of the epoch, still naming
the step where it began (:class:`_LossWatch`).

Under ``torchrun`` (WORLD_SIZE > 1) the same loop runs with DistributedDataParallel: each rank
takes an interleaved shard of every global batch (DistributedSampler), so with a batch of B and
W ranks the gradient equals single-process training on the same B samples (for models without
batch statistics; BatchNorm sees per-rank batches). Models where a step can leave parameters
without a gradient (unchosen experts, closed gates, dropped FractalNet columns) are wrapped with
``find_unused_parameters=True`` (see :func:`ddp_find_unused_parameters`).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fractalbench.harness import contract
from fractalbench.harness._batches import DeviceBatches, device_batches_for
from fractalbench.harness._images import loader_workers
from fractalbench.harness.checkpoints import CheckpointError, load_model_state, read_checkpoint, save_checkpoint
from fractalbench.harness.contract import LossTermsModule, ddp_find_unused_parameters

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "none")
#: Training arithmetic: fp32, bf16 autocast (weights, optimiser state and gradients stay fp32), or
#: auto: bf16 where the device computes it natively (a CPU with AVX512-BF16 or AMX, a GPU that supports
#: it), else fp32 (:func:`resolved_precision`; emulated bf16 is 8-12x slower than fp32 on an AVX2 CPU).
PRECISIONS = ("fp32", "bf16", "auto")
#: What training leaves unchanged: nothing, or the dense backbone a dynamic model is built on
#: (:func:`fractalbench.harness.contract.dense_backbone`), so only what the model adds (exit heads, gates, routers,
#: experts) trains, on a backbone in eval mode (its batch-norm statistics stay) with no autograd through it.
FREEZE = ("none", "backbone")


class TrainingError(RuntimeError):
    """Training could not go on (non-finite loss, ...). The message says where and why."""


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. ``lr`` is the peak learning rate; ``milestones`` are epochs (step)."""

    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0
    max_steps_per_epoch: int | None = None
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    sync_batchnorm: bool = False
    device_batches: bool = True
    freeze: str = "none"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.freeze not in FREEZE:
            raise ValueError(f"freeze {self.freeze!r} is not one of {', '.join(FREEZE)}")
        if self.warmup_epochs < 0 or (self.epochs > 0 and self.warmup_epochs > self.epochs):
            # epochs 0 (weights measured as loaded) trains nothing: an inherited warm-up does not matter
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must lie between 0 and epochs ({self.epochs})")


@dataclass
class TrainResult:
    epochs_run: int
    resumed_from_epoch: int
    seconds: float  # this call's
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: term -> mean
    epoch_seconds: list[float] = field(default_factory=list)  # per epoch, earlier (resumed) calls included

    @property
    def total_seconds(self) -> float | None:
        """Training time of every epoch, resumed ones included (None when a checkpoint from before
        epoch times were kept leaves some unknown)."""
        return sum(self.epoch_seconds) if len(self.epoch_seconds) == len(self.history) else None


def resolved_precision(precision: str, device: str = "cpu") -> str:
    """``fp32`` or ``bf16``: ``auto`` is bf16 where ``device`` computes it natively, else fp32."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    from fractalbench.harness.environment import cpu_native_bf16

    return "bf16" if cpu_native_bf16() else "fp32"


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def distributed_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def frozen_part(model: nn.Module, freeze: str) -> nn.Module | None:
    """The module ``freeze`` keeps fixed (None for ``none``); ValueError when the model has no such part."""
    if freeze == "none":
        return None
    backbone = contract.dense_backbone(model)
    if backbone is None:
        raise ValueError(f"freeze: backbone needs a model built on a dense backbone (SDN, BranchyNet, SkipNet, the MoE "
                         f"ResNets: the dense_backbone hook); {type(model).__name__} has none")
    own = {id(p) for p in backbone.parameters()}
    if all(id(p) in own for p in model.parameters()):
        raise ValueError(f"freeze: backbone leaves nothing of {type(model).__name__} to train (it is its backbone)")
    return backbone


class _Frozen:
    """Within the block: ``part``'s parameters need no gradient and its modules stay in eval mode
    (:meth:`hold`, after every ``model.train()``); afterwards every parameter is as it was."""

    def __init__(self, part: nn.Module | None) -> None:
        self.part = part
        self.before: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> _Frozen:
        if self.part is not None:
            self.before = [(p, p.requires_grad) for p in self.part.parameters()]
            for p, _ in self.before:
                p.requires_grad_(False)
        return self

    def hold(self) -> None:
        if self.part is not None:
            self.part.eval()

    def __exit__(self, *exc: Any) -> None:
        for p, flag in self.before:
            p.requires_grad_(flag)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":  # decoupled weight decay (Loshchilov and Hutter 2019), the transformers' optimiser
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Step -> multiple of ``cfg.lr``. A warm-up of ``warmup_epochs`` rises linearly from lr/W to lr over
    its W steps (Goyal et al. 2017); the cosine decay then runs over the steps after it, the step
    schedule's milestones stay where they are."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "cosine":
        span = max(1, total - warm)

        def base(s: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(max(s - warm, 0), span) / span))
    elif cfg.schedule == "step":
        bounds = [m * steps_per_epoch for m in cfg.milestones]

        def base(s: int) -> float:
            return cfg.gamma ** sum(s >= b for b in bounds)
    else:
        def base(s: int) -> float:
            return 1.0
    if not warm:
        return base
    return lambda s: base(s) * min(1.0, (s + 1) / warm)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))


@dataclass
class _Loop:
    """One training run's moving parts (built by :func:`train_model`)."""

    objective: nn.Module
    sampler: DistributedSampler
    loader: DataLoader | DeviceBatches
    steps: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rank: int


def _loader(train_set: Dataset, sampler: DistributedSampler, batch_size: int, cfg: TrainConfig,
            device: str) -> DataLoader | DeviceBatches:
    """Batches on the device (:mod:`fractalbench.harness._batches`) when the dataset allows it, else a DataLoader."""
    fast = device_batches_for(train_set) if cfg.device_batches else None
    if fast is not None:
        return DeviceBatches(*fast, sampler, batch_size, device, cfg.seed)
    workers = loader_workers(train_set)
    return DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def _make_loop(model: nn.Module, train_set: Dataset, cfg: TrainConfig, device: str = "cpu") -> _Loop:
    rank, world = distributed_env()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    if cfg.sync_batchnorm and world > 1:  # batch statistics over every rank's shard (in place: the model's own)
        _sync_batchnorm(model)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    objective: nn.Module = LossTermsModule(model)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, find_unused_parameters=ddp_find_unused_parameters(model))
    if cfg.compile:  # the training step only; the model (and its checkpoint) stays the plain module
        objective = torch.compile(objective)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,  # type: ignore[arg-type]
                                 seed=cfg.seed, drop_last=True)
    loader = _loader(train_set, sampler, cfg.batch_size // world, cfg, device)
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    if steps == 0:
        raise ValueError(f"the training set ({len(train_set)} samples) is smaller "  # type: ignore[arg-type]
                         f"than one batch ({cfg.batch_size})")
    opt = make_optimizer(model, cfg)
    return _Loop(objective, sampler, loader, steps, opt, make_scheduler(opt, cfg, steps), rank)


def _sync_batchnorm(model: nn.Module) -> None:
    """Replace every BatchNorm child of ``model`` with SyncBatchNorm (same parameters and buffers)."""
    for name, child in model.named_children():
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(child)
        if converted is not child:
            setattr(model, name, converted)


def _resume(model: nn.Module, loop: _Loop, checkpoint: Path | None) -> tuple[int, list[dict[str, float]], list[float]]:
    """(first epoch to run, history so far, epoch seconds so far) from ``checkpoint`` when it exists."""
    if checkpoint is None or not checkpoint.exists():
        return 0, [], []
    state = read_checkpoint(checkpoint)
    load_model_state(model, state, checkpoint)
    try:
        loop.opt.load_state_dict(state["optimizer"])
        loop.sched.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint} has optimizer state that does not fit: {exc}") from None
    log.info("resumed %s at epoch %d", checkpoint, int(state["epoch"]))
    extra = state.get("extra", {})
    return int(state["epoch"]), list(extra.get("history", [])), [float(t) for t in extra.get("epoch_seconds", [])]


CHECK_EVERY = 25  # steps between the host's looks at the loss (the only synchronisation in an epoch)


class _LossWatch:
    """Loss sums and the first non-finite step, kept on the device: stepping never waits for the
    device; :meth:`check` (every CHECK_EVERY steps and at the end of the epoch) reads one flag."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.sums, self.first_bad, self.bad_terms = epoch, {}, None, None

    def add(self, step: int, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        values = {**{k: v.detach().float() for k, v in terms.items()}, "loss": loss.detach().float()}
        for k, v in values.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        stacked = torch.stack(list(values.values()))
        bad = ~torch.isfinite(loss.detach())
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.bad_terms = torch.zeros_like(stacked)
        new = bad & (self.first_bad < 0)
        self.first_bad = torch.where(new, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_terms = torch.where(new, stacked, self.bad_terms)

    def check(self, step: int) -> None:
        if self.first_bad is None or int(self.first_bad) < 0:
            return
        names = list(self.sums)
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in zip(names, self.bad_terms.tolist()))
        raise TrainingError(f"loss is not finite at epoch {self.epoch + 1}, step {int(self.first_bad) + 1} "
                            f"({detail}; seen at step {step + 1}); lower the learning rate or check the data")


def _train_epoch(loop: _Loop, epoch: int, cfg: TrainConfig, device: str, progress: bool) -> dict[str, float]:
    """One epoch of optimisation; the epoch mean of every loss term (and of their sum, ``loss``)."""
    watch = _LossWatch(epoch)
    bf16 = resolved_precision(cfg.precision, device) == "bf16"
    bar = _progress(loop.steps, f"epoch {epoch + 1}/{cfg.epochs}", progress and loop.rank == 0)
    step = -1
    for step, (x, y) in enumerate(itertools.islice(loop.loader, loop.steps)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            terms = loop.objective(x, y)
        loss = sum(terms.values())
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        loop.opt.step()
        loop.sched.step()
        watch.add(step, terms, loss)
        if (step + 1) % CHECK_EVERY == 0:
            watch.check(step)
            if bar is not None:
                bar.set_postfix(loss=f"{float(watch.sums['loss']) / (step + 1):.3f}")
        if bar is not None:
            bar.update(1)
    watch.check(step)
    if bar is not None:
        bar.close()
    return {k: float(v) / loop.steps for k, v in watch.sums.items()}


def train_model(model: nn.Module, train_set: Dataset, cfg: TrainConfig, *, device: str = "cpu",
                checkpoint: Path | None = None, spec: dict[str, Any] | None = None, progress: bool = False,
                on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs; resume from ``checkpoint`` if it exists."""
    seed_everything(cfg.seed)
    model.to(device)
    with _Frozen(frozen_part(model, cfg.freeze)) as frozen:
        loop = _make_loop(model, train_set, cfg, device)
        result = _run_epochs(model, train_set, cfg, loop, frozen, device, checkpoint, spec, progress, on_epoch)
    model.eval()
    return result


def _run_epochs(model: nn.Module, train_set: Dataset, cfg: TrainConfig, loop: _Loop, frozen: _Frozen, device: str,
                checkpoint: Path | None, spec: dict[str, Any] | None, progress: bool,
                on_epoch: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
    start_epoch, history, epoch_seconds = _resume(model, loop, checkpoint)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        model.train()
        frozen.hold()
        contract.on_train_epoch(model, epoch, cfg.epochs)  # e.g. SDN's loss-weight ramp
        loop.sampler.set_epoch(epoch)
        if isinstance(loop.loader, DeviceBatches):
            loop.loader.set_epoch(epoch)
        # a per-epoch generator keeps augmentation identical whether or not training was resumed
        torch.manual_seed(cfg.seed * 1000 + epoch)
        means = _train_epoch(loop, epoch, cfg, device, progress)
        history.append(means)
        if epoch == cfg.epochs - 1:
            contract.on_train_end(model, train_set, cfg.batch_size, device)  # e.g. FractalNet's BN per path
        epoch_seconds.append(time.perf_counter() - started)
        if checkpoint is not None and loop.rank == 0:
            save_checkpoint(checkpoint, model, spec=spec, optimizer=loop.opt, scheduler=loop.sched, epoch=epoch + 1,
                            extra={"history": history, "epoch_seconds": epoch_seconds})
        if on_epoch is not None:
            on_epoch(epoch + 1, means)
    return TrainResult(cfg.epochs - start_epoch, start_epoch, time.perf_counter() - t0, history, epoch_seconds)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
