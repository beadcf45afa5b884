"""The typed state the measurement steps of a cell share (:mod:`fractalbench.harness.steps`).

:class:`CellState` holds what a cell is given (its suite entry, data, model, row fields) and what
its steps produce (exit logits, the cost table, operating points, per-sample outcomes).
An operating point (:class:`OperatingPoint`) is keyed by ``policy`` and ``threshold`` on every row
that describes it: its accuracy, its expected cost and its latency.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fractalbench.harness import contract
from fractalbench.harness.data import DataSplits
from fractalbench.harness.evaluate import topk_correct
from fractalbench.harness.metrics.flops import CostTable
from fractalbench.harness.outcomes import CellOutcomes
from fractalbench.harness.policies import ExitPolicy
from fractalbench.harness.registry import ModelSpec
from fractalbench.harness.results import RunStore, make_row
from fractalbench.harness.suites import Suite

Rows = list[dict[str, Any]]


@dataclass
class ExitLogits:
    """Logits of every exit on one split (K tensors [N, classes], on the CPU) and the labels [N]."""

    logits: list[Tensor]
    labels: Tensor


@dataclass
class OperatingPoint:
    """One way to run a dynamic model. ``policy`` names it (``confidence``, ``confidence@budget0.25``,
    ``gates``, ``router``), ``threshold`` is the grid value (None for fitted or learned points),
    ``decider`` the ExitPolicy (None: the model's own gates or router), ``fitted_on`` the split its
    thresholds came from, ``trace`` the test split's per-sample trace once it has run."""

    policy: str
    threshold: float | None
    decider: ExitPolicy | None
    fitted_on: str
    detail: dict[str, Any] = field(default_factory=dict)
    trace: contract.Trace | None = None

    @property
    def key(self) -> dict[str, Any]:
        """The row fields that identify this point on accuracy, cost and latency rows."""
        return {"policy": self.policy, "threshold": self.threshold}

    @property
    def is_budget_fit(self) -> bool:
        return "budget_macs" in self.detail


def data_record(dataset: Any, splits: DataSplits) -> dict[str, Any]:
    """What a checkpoint records of the data its model was trained on, so that ``fractalbench evaluate``
    measures it on the same data: the dataset entry (without where it lies on disk), the image side
    the model saw and the input normalisation (mean/std and where it came from)."""
    from dataclasses import asdict

    entry = {k: v for k, v in asdict(dataset).items() if k not in ("root", "download", "memory_limit_mb")}
    return {"dataset": entry, "image_size": int(splits.image_size), "num_classes": int(splits.num_classes),
            "in_chans": int(splits.in_chans), "normalisation": splits.info.get("normalisation")}


@dataclass
class CellState:
    """What the steps of one cell share. The first fields are given; the rest are produced by steps."""

    cell: Any  # fractalbench.harness.runner.Cell
    suite: Suite
    store: RunStore
    splits: DataSplits
    spec: ModelSpec
    model: nn.Module
    fields: dict[str, Any]
    progress: bool = False
    checkpoint: Path | None = None  # produced by train (when it trains)
    weights: Path | None = None  # produced by save_weights: the model as measured, for worker processes
    test_exits: ExitLogits | None = None
    val_exits: ExitLogits | None = None
    cost_table: CostTable | None = None
    points: list[OperatingPoint] = field(default_factory=list)
    outcomes: CellOutcomes | None = None  # the test split's per-sample outcomes of every accuracy row
    previous_rows: list[dict[str, Any]] = field(default_factory=list)  # a remeasured cell's earlier record
    # fractalbench.harness.weights.Normalisation the loaded weights declared (None: the data's own)
    normalisation: Any = None

    def checkpoint_spec(self) -> dict[str, Any]:
        """What a checkpoint of this cell records to rebuild its model (and the input normalisation its
        weights were trained with, so that a cell starting from this checkpoint uses it too)."""
        spec = self.spec.to_dict()
        if self.normalisation is not None:
            spec["input_normalisation"] = self.normalisation.to_dict()
        spec["data"] = data_record(self.cell.dataset, self.splits)
        return spec

    def keep(self, metric: str, logits: Tensor, labels: Tensor, k: int = 1, exit_index: Tensor | None = None,
             **key: Any) -> float:
        """The top-k accuracy (%) of ``logits`` on the test ``labels``; its per-sample bits (and exits)
        are kept in :attr:`outcomes` under the row's metric, policy, threshold and exit."""
        correct = topk_correct(logits, labels, k)
        if self.outcomes is None:
            self.outcomes = CellOutcomes(labels.cpu().numpy())
        self.outcomes.add(metric, correct, exit_index=exit_index, **key)
        return 100.0 * int(correct.sum()) / len(labels)

    def row(self, metric: str, value: float | None, unit: str, **extra: Any) -> dict[str, Any]:
        return make_row(metric, value, unit, **{**self.fields, **extra})

    def need(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"step input {name!r} was not produced by an earlier step (see harness.steps.STEPS)")
        return value

    @property
    def device(self) -> str:
        return self.cell.device

    @property
    def kind(self) -> str:
        return contract.dynamic_kind(self.model)


def _inputs(ds: Any, limit: int | None = None) -> Tensor:
    n = len(ds) if limit is None else min(limit, len(ds))
    return torch.stack([ds[i][0] for i in range(n)])
