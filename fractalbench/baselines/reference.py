"""Reference models for the harness itself (not from a paper).

- ``noop``: does nothing; returns constant logits (class 0 first, then 1, 2, ...). Measured like any model, it gives the
  harness's own overhead (MLPerf LoadGen keeps such a null backend for the same reason).
- ``linear``: multinomial logistic regression on the image average-pooled to 8x8 (so any input
  size works) and flattened. No batch statistics, so
  distributed training must match single-process training to float rounding (the DDP test).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fractalbench.harness.registry import ModelCard, register_model


class NullModel(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # strictly decreasing, so the prediction is class 0 (top-5: classes 0..4), free of ties
        self.register_buffer("logits", -torch.arange(num_classes, dtype=torch.float32)[None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1)


class LinearClassifier(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, pooled: int = 8) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.fc = nn.Linear(in_chans * pooled * pooled, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))


@register_model(card=ModelCard(family="reference", paper="none: harness overhead (does nothing)"))
def noop(*, num_classes: int = 10, in_chans: int = 3) -> NullModel:
    return NullModel(num_classes)


@register_model(card=ModelCard(family="reference", paper="none: multinomial logistic regression"))
def linear(*, num_classes: int = 10, in_chans: int = 3, pooled: int = 8) -> LinearClassifier:
    return LinearClassifier(num_classes, in_chans, pooled)
