"""Exit policies: per-sample decisions at each exit of a multi-exit model.

A policy decides, at exit ``k``, which of the samples still in flight leave there. It keeps
per-sample state (a dict of tensors with the batch as first axis) so that a cascade can drop
finished samples from the state together with their features (compaction). The last exit always
takes every remaining sample.

- ``confidence``: leave at k when the max softmax probability >= threshold[k].
- ``entropy`` (BranchyNet): leave at k when the softmax entropy (nats) <= threshold[k].
- ``patience`` (PABEE-style): leave at k when the arg-max prediction has stayed the same for
  ``patience`` consecutive exits (the count includes exit k's agreement with exit k-1).

``simulate`` runs the very same ``decide`` code on precomputed logits of every exit; calibration
uses it to sweep thresholds without re-running the network, and tests check that it agrees with
the real cascade.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

POLICY_NAMES = ("confidence", "entropy", "patience")

State = dict[str, Tensor]


def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) along the last axis."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@dataclass
class ExitPolicy:
    """Base class. ``thresholds[k]`` applies at exit k (len = num_exits - 1, or one shared value)."""

    thresholds: tuple[float, ...] = ()
    name: str = "base"

    def threshold_at(self, k: int) -> float:
        if not self.thresholds:
            raise ValueError(f"policy {self.name!r} has no thresholds; calibrate it or give some")
        return self.thresholds[k] if len(self.thresholds) > 1 else self.thresholds[0]

    def init_state(self, n: int, device: torch.device) -> State:
        return {}

    def decide(self, k: int, logits: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self) -> str:
        vals = ",".join(f"{t:.4g}" for t in self.thresholds)
        return f"{self.name}[{vals}]"

    @torch.no_grad()
    def simulate(self, exit_logits: Sequence[Tensor]) -> Tensor:
        """Exit index [N] each sample would take, given logits of every exit for all samples."""
        n = exit_logits[0].shape[0]
        device = exit_logits[0].device
        state = self.init_state(n, device)
        exit_index = torch.full((n,), len(exit_logits) - 1, dtype=torch.long, device=device)
        undecided = torch.ones(n, dtype=torch.bool, device=device)
        for k, logits in enumerate(exit_logits[:-1]):
            leave, state = self.decide(k, logits, state)
            newly = leave & undecided
            exit_index[newly] = k
            undecided &= ~leave
        return exit_index


@dataclass
class ConfidencePolicy(ExitPolicy):
    name: str = "confidence"

    def decide(self, k: int, logits: Tensor, state: State) -> tuple[Tensor, State]:
        conf = torch.softmax(logits.float(), dim=-1).amax(dim=-1)
        return conf >= self.threshold_at(k), state


@dataclass
class EntropyPolicy(ExitPolicy):
    name: str = "entropy"

    def decide(self, k: int, logits: Tensor, state: State) -> tuple[Tensor, State]:
        return softmax_entropy(logits) <= self.threshold_at(k), state


@dataclass
class PatiencePolicy(ExitPolicy):
    """``thresholds`` holds one value: the patience (a whole number >= 1)."""

    name: str = "patience"

    def init_state(self, n: int, device: torch.device) -> State:
        return {
            "previous": torch.full((n,), -1, dtype=torch.long, device=device),
            "streak": torch.zeros(n, dtype=torch.long, device=device),
        }

    def decide(self, k: int, logits: Tensor, state: State) -> tuple[Tensor, State]:
        patience = self.threshold_at(k)
        pred = logits.argmax(dim=-1)
        streak = torch.where(pred == state["previous"], state["streak"] + 1, torch.zeros_like(state["streak"]))
        return streak >= patience, {"previous": pred, "streak": streak}


_POLICIES = {"confidence": ConfidencePolicy, "entropy": EntropyPolicy, "patience": PatiencePolicy}


def make_policy(name: str, thresholds: Sequence[float] | float) -> ExitPolicy:
    """Build a policy by name. Raises ValueError naming the allowed policies."""
    if name not in _POLICIES:
        raise ValueError(f"unknown exit policy {name!r}; allowed: {', '.join(POLICY_NAMES)}")
    if isinstance(thresholds, (int, float)):
        thresholds = (float(thresholds),)
    values = tuple(float(t) for t in thresholds)
    if any(math.isnan(t) for t in values):
        raise ValueError(f"policy {name!r}: thresholds must be numbers, got {values}")
    if name == "patience" and (len(values) != 1 or values[0] < 1 or values[0] != int(values[0])):
        raise ValueError(f"policy 'patience' takes one whole number >= 1, got {values}")
    return _POLICIES[name](thresholds=values)


def default_policy() -> ExitPolicy:
    """The policy used when none is given: never exits early (max-softmax >= 1.01)."""
    return ConfidencePolicy(thresholds=(1.01,))
