"""What early-exit papers report beside accuracy per exit: the oracle exit, overthinking and the
calibration of every exit. Pure functions of the exit logits, the labels and the cost per exit.

Definitions (K exits 0..K-1, N samples; "right at exit k": the top-1 prediction of exit k, the
largest logit as in :func:`fractalbench.harness.evaluate.topk_correct`, is the label):

- Oracle exit (Kaya et al. 2019, "Shallow-Deep Networks: Understanding and Mitigating Network
  Overthinking", ICML): per sample the earliest exit at which it is right (none when it is right
  nowhere). Oracle accuracy = % of samples right at any exit. Oracle cost = the mean over samples
  of ``exit_macs[oracle exit]``, where a sample right nowhere runs to the last exit;
  ``exit_macs[k]`` is the cumulative MACs of the forced path to exit k (the cost table's
  ``exits``, batch 1), which includes the heads of the exits before k.
- Overthinking (Kaya et al. 2019): destructive = % of samples right at some exit before the last
  but wrong at the last (so oracle accuracy = last-exit accuracy + destructive overthinking);
  wasteful = % of samples right at some exit before the last and right at the last too (the
  compute after their earliest right exit was not needed).
- Expected calibration error of one exit (Naeini et al. 2015; Guo et al. 2017, "On Calibration
  of Modern Neural Networks"): confidence = the largest softmax probability; ``bins`` equal-width
  bins over [0, 1], bin m = [m / bins, (m + 1) / bins), the last one closed ([.., 1], so a
  confidence of exactly 1.0 is in it); ECE = sum over bins of (n_bin / N) x
  |accuracy_bin - mean confidence_bin|, in percent. The reliability data per bin: lower and upper
  edge, count, mean confidence and accuracy (fractions in [0, 1]; None for an empty bin).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fractalbench.harness.results import make_row
from fractalbench.harness.stats import wilson_interval

ECE_BINS = 15

ORACLE_DEFINITION = ("per sample the earliest exit whose top-1 prediction is right (Kaya et al. 2019); "
                     "oracle_top1 = % of samples right at any exit")
ORACLE_MACS_DEFINITION = ("mean over samples of the forced-path MACs (batch 1) of the sample's earliest right exit; "
                          "a sample right at no exit runs to the last exit")
OVERTHINKING_DEFINITION = ("destructive overthinking (Kaya et al. 2019): % of samples right at some exit before the "
                           "last but wrong at the last; oracle_top1 = last exit's top1 + overthinking")
WASTEFUL_DEFINITION = ("wasteful overthinking (Kaya et al. 2019): % of samples right at some exit before the last and "
                       "right at the last too (the compute after their earliest right exit was not needed)")
ECE_DEFINITION = ("expected calibration error: confidence = max softmax probability; equal-width bins over [0, 1] "
                  "([lower, upper), the last closed); ECE = sum_bins n_bin / N x |accuracy_bin - mean confidence_bin|,"
                  " in %; reliability: per bin lower, upper, count, confidence and accuracy (fractions, None if empty)")


def _logits(logits: Tensor | np.ndarray) -> Tensor:
    t = torch.as_tensor(logits)
    if t.dim() != 2:
        raise ValueError(f"exit logits must be [N, classes], got shape {tuple(t.shape)}")
    return t.detach().cpu()


def _labels(labels: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(labels).detach().cpu().long().reshape(-1)


def correct_matrix(exit_logits: Sequence[Tensor | np.ndarray], labels: Tensor | np.ndarray) -> np.ndarray:
    """bool [K, N]: whether the top-1 prediction of exit k is right for sample i (the bits of the
    exit's ``top1`` row: the largest logit, as :func:`fractalbench.harness.evaluate.topk_correct` picks it)."""
    y = _labels(labels)
    if not exit_logits:
        raise ValueError("need the logits of at least one exit")
    rows = []
    for k, logits in enumerate(exit_logits):
        t = _logits(logits)
        if t.shape[0] != y.shape[0]:
            raise ValueError(f"exit {k} has {t.shape[0]} samples; there are {y.shape[0]} labels")
        rows.append((t.topk(1, dim=-1).indices[:, 0] == y).numpy())
    return np.stack(rows)


def earliest_right_exit(correct: np.ndarray) -> np.ndarray:
    """int [N]: per sample the first exit k with ``correct[k]`` true; -1 where it is right nowhere."""
    correct = np.asarray(correct, dtype=bool)
    first = np.argmax(correct, axis=0)
    return np.where(correct.any(axis=0), first, -1)


@dataclass(frozen=True)
class Oracle:
    """The oracle exit of every sample (``exit_index``: earliest right exit, -1 right nowhere),
    ``right`` samples right at any exit out of ``n``, and the mean cost ``macs`` (module docstring)."""

    exit_index: np.ndarray
    right: int
    n: int
    macs: float

    @property
    def accuracy(self) -> float:
        """% of samples right at any exit."""
        return 100.0 * self.right / self.n


def oracle(correct: np.ndarray, exit_macs: Sequence[float]) -> Oracle:
    """The oracle exit and its cost from ``correct`` [K, N] and the cumulative MACs of each exit."""
    correct = np.asarray(correct, dtype=bool)
    macs = np.asarray(exit_macs, dtype=np.float64)
    if macs.shape != (correct.shape[0],):
        raise ValueError(f"{correct.shape[0]} exits but {macs.size} exit costs")
    if correct.shape[1] == 0:
        raise ValueError("the oracle of an empty set is undefined")
    first = earliest_right_exit(correct)
    leaves = np.where(first < 0, correct.shape[0] - 1, first)
    return Oracle(first, int((first >= 0).sum()), int(correct.shape[1]), float(macs[leaves].mean()))


@dataclass(frozen=True)
class Overthinking:
    """Counts out of ``n``: ``destructive`` (right before the last exit, wrong at the last) and
    ``wasteful`` (right before the last exit and at the last)."""

    destructive: int
    wasteful: int
    n: int

    @property
    def destructive_percent(self) -> float:
        return 100.0 * self.destructive / self.n

    @property
    def wasteful_percent(self) -> float:
        return 100.0 * self.wasteful / self.n


def overthinking(correct: np.ndarray) -> Overthinking:
    """Destructive and wasteful overthinking from ``correct`` [K, N] (K >= 2)."""
    correct = np.asarray(correct, dtype=bool)
    if correct.shape[0] < 2:
        raise ValueError("overthinking needs at least two exits")
    if correct.shape[1] == 0:
        raise ValueError("overthinking of an empty set is undefined")
    early, last = correct[:-1].any(axis=0), correct[-1]
    return Overthinking(int((early & ~last).sum()), int((early & last).sum()), int(correct.shape[1]))


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin: edges, samples in it, their mean confidence and accuracy (fractions;
    None when the bin is empty)."""

    lower: float
    upper: float
    count: int
    confidence: float | None
    accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"lower": self.lower, "upper": self.upper, "count": self.count, "confidence": self.confidence,
                "accuracy": self.accuracy}


@dataclass(frozen=True)
class Calibration:
    """The ECE (%) of one exit over ``n`` samples and its reliability bins."""

    ece: float
    n: int
    bins: tuple[ReliabilityBin, ...]


def confidences(logits: Tensor | np.ndarray) -> np.ndarray:
    """float64 [N]: the largest softmax probability of each sample (computed in float64)."""
    return torch.softmax(_logits(logits).double(), dim=-1).max(dim=-1).values.numpy()


def bin_index(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """int [N]: the bin of each confidence, bins [m / bins, (m + 1) / bins), the last closed at 1."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)


def calibration(logits: Tensor | np.ndarray, labels: Tensor | np.ndarray, bins: int = ECE_BINS) -> Calibration:
    """The expected calibration error (%) of one exit and its reliability data (module docstring)."""
    if bins < 1:
        raise ValueError(f"need at least one bin, got {bins}")
    conf = confidences(logits)
    right = correct_matrix([logits], labels)[0].astype(np.float64)
    if conf.size == 0:
        raise ValueError("the calibration of an empty set is undefined")
    index, edges = bin_index(conf, bins), np.linspace(0.0, 1.0, bins + 1)
    out, ece = [], 0.0
    for m in range(bins):
        inside = index == m
        count = int(inside.sum())
        mean_conf = float(conf[inside].mean()) if count else None
        acc = float(right[inside].mean()) if count else None
        if count:
            ece += count / conf.size * abs(acc - mean_conf)
        out.append(ReliabilityBin(float(edges[m]), float(edges[m + 1]), count, mean_conf, acc))
    return Calibration(100.0 * ece, int(conf.size), tuple(out))


# ----- rows -----------------------------------------------------------------------------------------

def _percent_row(metric: str, right: int, n: int, fields: dict[str, Any], detail: dict[str, Any]) -> dict[str, Any]:
    """A % row with its n and 95 % Wilson interval (filled here: these are info rows)."""
    low, high = wilson_interval(right, n)
    return make_row(metric, 100.0 * right / n, "%", **fields, n=n, ci_low=100.0 * low, ci_high=100.0 * high,
                    detail=detail)


def _oracle_rows(correct: np.ndarray, exit_macs: Sequence[float], fields: dict[str, Any]) -> list[dict[str, Any]]:
    k, n = correct.shape
    orc, over = oracle(correct, exit_macs), overthinking(correct)
    counts = np.bincount(orc.exit_index[orc.exit_index >= 0], minlength=k).tolist()
    nowhere = n - orc.right
    macs = [float(m) for m in exit_macs]
    return [
        _percent_row("oracle_top1", orc.right, n, fields,
                     {"definition": ORACLE_DEFINITION, "right": orc.right, "oracle_exit_counts": counts,
                      "right_nowhere": nowhere}),
        make_row("oracle_macs", orc.macs, "MACs", **fields, n=n,
                 detail={"definition": ORACLE_MACS_DEFINITION, "exit_macs": macs, "oracle_exit_counts": counts,
                         "right_nowhere": nowhere, "fraction_of_last_exit": orc.macs / macs[-1] if macs[-1] else None}),
        _percent_row("overthinking", over.destructive, n, fields,
                     {"definition": OVERTHINKING_DEFINITION, "count": over.destructive}),
        _percent_row("overthinking_wasteful", over.wasteful, n, fields,
                     {"definition": WASTEFUL_DEFINITION, "count": over.wasteful}),
    ]


def exit_stat_rows(exit_logits: Sequence[Tensor | np.ndarray], labels: Tensor | np.ndarray,
                   exit_macs: Sequence[float], *, bins: int = ECE_BINS, split: str = "test",
                   **fields: Any) -> list[dict[str, Any]]:
    """Result rows on ``split``: ``oracle_top1``, ``oracle_macs``, ``overthinking`` and
    ``overthinking_wasteful`` for models with more than one exit, and ``ece`` of every exit
    (``exit`` = k, detail: bins, reliability per bin, definition). ``fields``: the cell's row fields."""
    if len(exit_macs) != len(exit_logits):
        raise ValueError(f"{len(exit_logits)} exits but {len(exit_macs)} exit costs")
    fields = {**fields, "split": split}
    correct = correct_matrix(exit_logits, labels)
    rows = _oracle_rows(correct, exit_macs, fields) if len(exit_logits) > 1 else []
    for k, logits in enumerate(exit_logits):
        cal = calibration(logits, labels, bins)
        rows.append(make_row("ece", cal.ece, "%", **{**fields, "exit": k}, n=cal.n,
                             detail={"bins": bins, "reliability": [b.to_dict() for b in cal.bins],
                                     "definition": ECE_DEFINITION}))
    return rows
