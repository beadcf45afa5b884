"""Accuracy: top-1 and top-5 per exit and under a policy (percent of samples)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fractalbench.harness._images import loader_workers
from fractalbench.harness.contract import Trace, dynamic_forward, forward_exits


def topk_correct(logits: Tensor, labels: Tensor, k: int = 1) -> Tensor:
    """Per sample (bool [N]): whether its label is among the ``k`` largest logits."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels[:, None]).any(dim=-1)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Percent of samples whose label is among the ``k`` largest logits (the mean of :func:`topk_correct`)."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return 100.0 * int(topk_correct(logits, labels, k).sum()) / len(labels)


def _loader(ds: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=loader_workers(ds))


@torch.no_grad()
def collect_exit_logits(model: nn.Module, ds: Dataset, batch_size: int = 256,
                        device: str = "cpu") -> tuple[list[Tensor], Tensor]:
    """Logits of every exit for every sample (list of K tensors [N, C], on CPU) and the labels."""
    model.eval().to(device)
    per_exit: list[list[Tensor]] = []
    labels = []
    for x, y in _loader(ds, batch_size):
        outs = forward_exits(model, x.to(device))
        if not per_exit:
            per_exit = [[] for _ in outs]
        for k, o in enumerate(outs):
            per_exit[k].append(o.float().cpu())
        labels.append(y)
    return [torch.cat(p) for p in per_exit], torch.cat(labels)


@torch.no_grad()
def forward_logits(model: nn.Module, ds: Dataset, batch_size: int = 256, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """``model(x)`` for every sample (logits [N, C] on CPU) and the labels: the plain forward,
    which for most models is the last exit and for some (FractalNet) the joined full network."""
    model.eval().to(device)
    logits, labels = [], []
    for x, y in _loader(ds, batch_size):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def run_policy(model: nn.Module, ds: Dataset, policy: Any = None, batch_size: int = 256, device: str = "cpu",
               mode: str = "compact") -> tuple[Tensor, Trace, Tensor]:
    """The real dynamic forward over a dataset: (logits [N, C], concatenated trace, labels)."""
    model.eval().to(device)
    logits, traces, labels = [], [], []
    for x, y in _loader(ds, batch_size):
        out = dynamic_forward(model, x.to(device), policy, mode)
        logits.append(out.logits.float().cpu())
        traces.append(out.trace.to("cpu"))
        labels.append(y)
    return torch.cat(logits), Trace.concat(traces), torch.cat(labels)


def accuracy_rows(exit_logits: list[Tensor], labels: Tensor, num_classes: int, split: str = "test",
                  **fields: Any) -> list[dict[str, Any]]:
    """Rows of top-1 (and top-5 when classes > 5) accuracy per exit."""
    from fractalbench.harness.results import make_row

    rows = []
    for k, logits in enumerate(exit_logits):
        rows.append(make_row("top1", topk_accuracy(logits, labels, 1), "%", exit=k, split=split, n=len(labels),
                             **fields))
        if num_classes > 5:
            rows.append(make_row("top5", topk_accuracy(logits, labels, 5), "%", exit=k, split=split, n=len(labels),
                                 **fields))
    return rows
