"""A shared cascade for early-exit models built as stages + heads.

Exit ``k`` is ``heads[k](stages[k](...stages[0](x)))``. A sample that leaves at exit k runs
stages 0..k, heads 0..k and the decisions at exits 0..k-1; nothing after. BranchyNet, SDN
wrappers and the FractalBrainNet early-exit variant subclass :class:`EarlyExitNetwork`.

Cost roles (:func:`fractalbench.harness.contract.cost_roles`): every module in ``heads`` is an exit head (the
last exit's classifier too); the stages are the backbone.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.harness.contract import CostUnit, DynamicModel, DynamicOutput, Trace, check_exit_index, check_mode
from fractalbench.harness.policies import ExitPolicy, default_policy

Features = Tensor | list | tuple  # what a stage passes on: one tensor, or several (e.g. one per scale)


def select_rows(h: Features, keep: Tensor) -> Features:
    """The samples ``keep`` (a boolean mask or an index) of features ``h``: a tensor, or a list or
    tuple of them (multi-scale features, as MSDNet's), indexed alike."""
    if isinstance(h, Tensor):
        return h[keep]
    if isinstance(h, (list, tuple)):
        return type(h)(select_rows(part, keep) for part in h)
    raise TypeError(f"a stage passed on {type(h).__name__}; early-exit features are a tensor or a list/tuple of them")


def leading_rows(h: Any) -> int:
    """How many samples features ``h`` hold (the first tensor's first dimension; 0 without a tensor)."""
    if isinstance(h, Tensor):
        return int(h.shape[0])
    if isinstance(h, (list, tuple)):
        return next((leading_rows(part) for part in h if leading_rows(part)), 0)
    return 0


class EarlyExitNetwork(DynamicModel):
    """Stages and heads in a cascade. ``exit_weights`` weight the exit losses in training. A stage may
    pass on one tensor or a list/tuple of tensors (features at several scales); compaction keeps the
    same samples in each."""

    dynamic_kind = "early_exit"
    cost_roles = {"heads": ("heads",)}

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module],
                 exit_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError(f"need one head per stage, got {len(stages)} stages and {len(heads)} heads")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        weights = list(exit_weights) if exit_weights is not None else [1.0] * len(heads)
        if len(weights) != len(heads):
            raise ValueError(f"exit_weights needs {len(heads)} values, got {len(weights)}")
        self.exit_weights = [float(w) for w in weights]

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.heads[-1](x)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            outs.append(head(x))
        return outs

    def forced_forward(self, x: Tensor, exit_index: int, policy: ExitPolicy | None = None) -> Tensor:
        check_exit_index(self, exit_index)
        policy = policy or default_policy()
        state = policy.init_state(x.shape[0], x.device)
        for k in range(exit_index + 1):
            x = self.stages[k](x)
            logits = self.heads[k](x)
            if k < exit_index:
                _, state = policy.decide(k, logits, state)  # the decision is part of the path
        return logits

    def dynamic_forward(self, x: Tensor, policy: ExitPolicy | None = None, mode: str = "compact") -> DynamicOutput:
        check_mode(mode)
        policy = policy or default_policy()
        if mode == "mask":
            return self._masked_forward(x, policy)
        n, last = x.shape[0], self.num_exits - 1
        device = x.device
        index = torch.arange(n, device=device)
        exit_index = torch.full((n,), last, dtype=torch.long, device=device)
        state = policy.init_state(n, device)
        out: Tensor | None = None
        h = x
        for k in range(self.num_exits):
            h = self.stages[k](h)
            logits = self.heads[k](h)
            if out is None:
                out = logits.new_empty((n, logits.shape[-1]))
            if k == last:
                out[index] = logits
                break
            leave, state = policy.decide(k, logits, state)
            if leave.any():
                out[index[leave]] = logits[leave]
                exit_index[index[leave]] = k
                stay = ~leave
                if not stay.any():
                    break
                h, index = select_rows(h, stay), index[stay]
                state = {name: v[stay] for name, v in state.items()}
        return DynamicOutput(out, Trace(exit_index, self._one_hot_counts(exit_index)))

    def _masked_forward(self, x: Tensor, policy: ExitPolicy) -> DynamicOutput:
        """Labelled variant: every stage and head runs on every sample, then the policy selects."""
        all_logits = self.forward_exits(x)
        exit_index = policy.simulate(all_logits)
        stacked = torch.stack(all_logits)  # [K, N, C]
        out = stacked[exit_index, torch.arange(x.shape[0], device=x.device)]
        ran_everything = torch.full_like(exit_index, self.num_exits - 1)
        return DynamicOutput(out, Trace(exit_index, self._one_hot_counts(ran_everything)))

    def trace_for_exits(self, exit_index: Tensor) -> Trace:
        """What compact inference records: the units of the path to each sample's exit."""
        return Trace(exit_index, self._one_hot_counts(exit_index))

    def _one_hot_counts(self, exit_index: Tensor) -> dict[str, Tensor]:
        return {f"exit_{k}": (exit_index == k).float() for k in range(self.num_exits)}

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {f"exit_{k}": w * F.cross_entropy(logits, y)
                for k, (w, logits) in enumerate(zip(self.exit_weights, self.forward_exits(x)))}

    def cost_units(self) -> list[CostUnit]:
        return [CostUnit(f"exit_{k}", (lambda x, k=k: self.forced_forward(x, k)))
                for k in range(self.num_exits)]
