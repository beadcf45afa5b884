"""Threshold sweeps of early-exit cascades from the exit logits of one ``forward_exits`` pass.

For a cascade whose cost depends only on the exit a sample takes (the model's
``trace_for_exits`` says so by returning a trace), the exit, the prediction and the executed
units of every sample under every threshold follow exactly from the logits of all exits:
``policy.simulate`` gives the exits, the logits at those exits the predictions. So a sweep of any
size costs one pass over the test split plus a cheap simulation per point, instead of one real
dynamic forward per point.

It is checked, like the MACs oracle: on an evenly spread subset of the test split, every point
also runs the real stopping path (``dynamic_forward``, compact), which must take the same exit and
give the same prediction for every sample. Differences that come only from floating-point noise
between batch compositions are excused and counted apart: a sample whose simulated exit changes
when every threshold moves by ``TIE_EPS``, or whose two largest logits are within ``TIE_EPS``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from fractalbench.harness.policies import ExitPolicy, make_policy

TIE_EPS = 1e-4


def simulated_logits(policy: ExitPolicy | None, exit_logits: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(exit index [N], logits at that exit [N, C]) of every sample under ``policy``."""
    from fractalbench.harness.policies import default_policy

    exit_index = (policy or default_policy()).simulate(exit_logits)
    stacked = torch.stack(exit_logits)
    return exit_index, stacked[exit_index, torch.arange(exit_index.shape[0])]


def near_threshold(policy: ExitPolicy, exit_logits: list[Tensor]) -> Tensor:
    """Samples [N] whose simulated exit moves when every threshold moves by ``TIE_EPS`` (none for
    policies whose thresholds are counts, such as patience)."""
    n = exit_logits[0].shape[0]
    if policy.name == "patience" or not policy.thresholds:
        return torch.zeros(n, dtype=torch.bool)
    low = make_policy(policy.name, [t - TIE_EPS for t in policy.thresholds])
    high = make_policy(policy.name, [t + TIE_EPS for t in policy.thresholds])
    return low.simulate(exit_logits) != high.simulate(exit_logits)


def _near_tied_top2(logits: Tensor) -> Tensor:
    top2 = logits.float().topk(min(2, logits.shape[-1]), dim=-1).values
    return (top2[:, 0] - top2[:, -1]).abs() < TIE_EPS if top2.shape[-1] > 1 else torch.zeros(len(logits), dtype=bool)


def spread_indices(n: int, samples: int) -> list[int]:
    """``samples`` indices spread evenly over 0..n-1 (test splits are often sorted by class)."""
    m = min(n, samples)
    return sorted({int(i * n // m) for i in range(m)}) if m else []


def check_real_path(model: nn.Module, test: Dataset, deciders: list[ExitPolicy | None], exit_logits: list[Tensor],
                    samples: int, batch_size: int, device: str) -> dict[str, Any]:
    """Run every decider's real stopping path on a spread subset of ``test``; count the samples
    whose exit or prediction differs from the simulation (``mismatches``) and those excused as
    floating-point near-ties (``near_ties``)."""
    from fractalbench.harness.evaluate import run_policy

    index = spread_indices(len(test), samples)
    sub_logits = [logits[index] for logits in exit_logits]
    mismatches = near_ties = exit_diffs = prediction_diffs = 0
    for decider in deciders:
        real_logits, real_trace, _ = run_policy(model, Subset(test, index), decider, batch_size, device)
        sim_exit, sim_logits = simulated_logits(decider, sub_logits)
        exit_differs = real_trace.exit_index.cpu() != sim_exit
        prediction_differs = real_logits.argmax(-1) != sim_logits.argmax(-1)
        differs = exit_differs | prediction_differs
        tie = _near_tied_top2(sim_logits) & ~exit_differs
        if decider is not None:
            tie |= near_threshold(decider, sub_logits)
        mismatches += int((differs & ~tie).sum())
        near_ties += int((differs & tie).sum())
        exit_diffs += int(exit_differs.sum())
        prediction_diffs += int(prediction_differs.sum())
    return {"samples": len(index), "points": len(deciders), "checked": len(index) * len(deciders),
            "mismatches": mismatches, "near_ties_excused": near_ties, "exit_differences": exit_diffs,
            "prediction_differences": prediction_diffs, "tie_eps": TIE_EPS,
            "definition": "real stopping path (compact dynamic_forward) vs the sweep simulated from exit logits"}
