"""Exit-threshold calibration on precomputed per-exit logits (validation split only).

Inputs are what :func:`fractalbench.harness.evaluate.collect_exit_logits` returns: a list of K tensors
``[N, classes]`` (logits of every exit for every sample), the labels ``[N]``, and the cumulative
cost of each exit ``cost_per_exit[k]`` = MACs of the forced path to exit k (batch 1, earlier heads
and decisions included; ``CostTable.exits``). Nothing here runs a network: decisions come from
:meth:`fractalbench.harness.policies.ExitPolicy.simulate`, the same ``decide`` code the real cascade runs, so a
threshold fitted here picks the same exits in :func:`fractalbench.harness.contract.dynamic_forward`.

- :func:`sweep`: accuracy, expected MACs and exit histogram for every point of a threshold grid.
- :func:`fit_to_budget`: MSDNet-style budgeted thresholds (Huang et al., ICLR 2018, sec. 4.1
  "budgeted batch classification" and their ``dynamic_evaluate``): exit k takes a fraction
  p_k proportional to q^k of the samples (a geometric distribution with ratio q); each exit's
  threshold is set on the validation scores so that exactly that share of the samples still in
  flight leaves there; q is found by bisection so that the expected MACs stay within the budget.
- :func:`fit_grid`: the most accurate point of a grid within a budget (works for every policy,
  patience included).
- :func:`evaluate`: accuracy, expected MACs and histogram of a fitted policy on another split.
- :func:`fit_decision_threshold`: gated and routed models (SkipNet, MoE), whose decisions depend on
  the path taken, so nothing can be simulated: bisection over the threshold they decide at, each
  probe a real dynamic pass over the validation split. Budgets there are fractions of the model's
  own range (from the path where nothing optional runs to the one where everything does).

Units: accuracy in percent (top-1), costs in MACs (mean over samples of the cumulative cost of the
exit each sample took). Every fit records the split it was fitted on and refuses ``"test"``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fractalbench.harness.policies import (
    POLICY_NAMES,
    DecisionThreshold,
    ExitPolicy,
    make_policy,
    softmax_entropy,
    user_policy,
)

FIT_SPLITS = ("validation",)
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validation": "validation"}
BUDGET_POLICIES = ("confidence", "entropy")

# Thresholds that no sample can meet: max-softmax is <= 1, entropy is >= 0.
NEVER = {"confidence": 2.0, "entropy": -1.0}


@dataclass(frozen=True)
class OperatingPoint:
    """One policy setting measured on one split.

    thresholds: per exit (len K-1) or one shared value (patience: the patience).
    accuracy: top-1 in percent (None when no labels were given). expected_macs: mean MACs.
    exit_counts / exit_fractions: how many samples left at each exit.
    """

    policy: str
    thresholds: tuple[float, ...]
    accuracy: float | None
    expected_macs: float
    exit_counts: tuple[int, ...]
    exit_fractions: tuple[float, ...]
    split: str
    n: int

    def make_policy(self) -> ExitPolicy:
        return make_policy(self.policy, self.thresholds)


@dataclass(frozen=True)
class ThresholdFit:
    """Thresholds fitted on ``fitted_on`` (always ``"validation"``) to meet ``budget_macs``.

    policy: the fitted policy (per-exit thresholds). expected_macs / accuracy / exit_fractions:
    measured on the fitting split. meets_budget: False when even the cheapest setting costs more
    than the budget (then the cheapest setting is returned). q: the geometric ratio
    (:func:`fit_to_budget`; None for :func:`fit_grid`), target_fractions: the exit shares it asked for.
    """

    policy: ExitPolicy
    fitted_on: str
    budget_macs: float
    expected_macs: float
    accuracy: float | None
    exit_fractions: tuple[float, ...]
    meets_budget: bool
    method: str
    q: float | None = None
    target_fractions: tuple[float, ...] = ()
    detail: dict = field(default_factory=dict)


# ----- checks -------------------------------------------------------------------------------------

def check_fit_split(split: str) -> str:
    """Thresholds are fitted on the validation split only; ``"test"`` is refused."""
    key = str(split).lower()
    if key == "test":
        raise ValueError("refusing to fit exit thresholds on the test split: fit them on the validation split "
                         "(carved from the training data) and only evaluate on test")
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"cannot fit thresholds on split {split!r}; allowed: {', '.join(FIT_SPLITS)}")
    return _SPLIT_ALIASES[key]


def _check_inputs(exit_logits: Sequence[Tensor], labels: Tensor | None,
                  cost_per_exit: Sequence[float]) -> tuple[list[Tensor], Tensor]:
    if not exit_logits:
        raise ValueError("need the logits of at least one exit")
    logits = [torch.as_tensor(t).detach().float().cpu() for t in exit_logits]
    n = logits[0].shape[0]
    if n == 0:
        raise ValueError("need at least one sample")
    if any(t.dim() != 2 or t.shape[0] != n for t in logits):
        raise ValueError(f"every exit's logits must be [N, classes] with the same N; "
                         f"got shapes {[tuple(t.shape) for t in logits]}")
    if len(cost_per_exit) != len(logits):
        raise ValueError(f"cost_per_exit has {len(cost_per_exit)} values for {len(logits)} exits")
    costs = torch.tensor([float(c) for c in cost_per_exit], dtype=torch.float64)
    if labels is not None and torch.as_tensor(labels).shape[0] != n:
        raise ValueError(f"{torch.as_tensor(labels).shape[0]} labels for {n} samples")
    return logits, costs


def _check_policy(name: str) -> None:
    if name not in POLICY_NAMES:
        user_policy(name)  # ValueError naming the allowed ones when it is not a user's policy either


# ----- measuring one setting -----------------------------------------------------------------------

def _measure(policy: ExitPolicy, logits: list[Tensor], labels: Tensor | None, costs: Tensor,
             split: str) -> OperatingPoint:
    exit_index = policy.simulate(logits).cpu()
    n, k = exit_index.shape[0], len(logits)
    counts = torch.bincount(exit_index, minlength=k)
    accuracy = None
    if labels is not None:
        stacked = torch.stack(logits)  # [K, N, C]
        pred = stacked[exit_index, torch.arange(n)].argmax(-1)
        accuracy = 100.0 * (pred == torch.as_tensor(labels).cpu()).float().mean().item()
    return OperatingPoint(
        policy=policy.name, thresholds=tuple(policy.thresholds), accuracy=accuracy,
        expected_macs=float(costs[exit_index].mean().item()),
        exit_counts=tuple(int(c) for c in counts.tolist()),
        exit_fractions=tuple(float(c) / n for c in counts.tolist()), split=split, n=n)


def evaluate(policy: ExitPolicy, test_logits: Sequence[Tensor], test_labels: Tensor, cost_per_exit: Sequence[float],
             split: str = "test") -> OperatingPoint:
    """Accuracy (percent), expected MACs and exit histogram of ``policy`` on a split (default test)."""
    logits, costs = _check_inputs(test_logits, test_labels, cost_per_exit)
    return _measure(policy, logits, test_labels, costs, split)


# ----- grids and sweeps ------------------------------------------------------------------------------

def default_grid(policy_name: str, num_exits: int, num_classes: int, points: int = 11) -> list[float]:
    """Shared-threshold grids: confidence 0..1, entropy 0..log(classes) nats, patience 1..K-1."""
    _check_policy(policy_name)
    info = user_policy(policy_name)
    if info is not None:
        if not info.grid:
            raise ValueError(f"exit policy {policy_name!r} has no default grid; give its thresholds as `grid:` in "
                             "the suite's policies entry (or register it with grid=...)")
        return list(info.grid)
    if policy_name == "patience":
        return [float(p) for p in range(1, max(2, num_exits))]
    if points < 2:
        raise ValueError(f"a grid needs at least 2 points, got {points}")
    top = 1.0 if policy_name == "confidence" else math.log(max(2, num_classes))
    return [round(top * i / (points - 1), 6) for i in range(points)]


def sweep(policy_name: str, val_logits: Sequence[Tensor], val_labels: Tensor | None, cost_per_exit: Sequence[float],
          grid: Sequence[float | Sequence[float]] | None = None, split: str = "validation") -> list[OperatingPoint]:
    """Measure every grid point (a shared threshold, or a per-exit tuple) with ``policy.simulate``."""
    _check_policy(policy_name)
    logits, costs = _check_inputs(val_logits, val_labels, cost_per_exit)
    if grid is None:
        grid = default_grid(policy_name, len(logits), logits[0].shape[-1])
    return [_measure(make_policy(policy_name, t), logits, val_labels, costs, split) for t in grid]


def fit_grid(policy_name: str, val_logits: Sequence[Tensor], val_labels: Tensor, cost_per_exit: Sequence[float],
             budget_macs: float, grid: Sequence[float | Sequence[float]] | None = None,
             split: str = "validation") -> ThresholdFit:
    """The most accurate grid point whose expected MACs on validation are within the budget
    (ties: the cheaper one). When none is, the cheapest point, with ``meets_budget=False``."""
    fitted_on = check_fit_split(split)
    points = sweep(policy_name, val_logits, val_labels, cost_per_exit, grid, fitted_on)
    within = [p for p in points if p.expected_macs <= budget_macs]
    meets = bool(within)
    best = (max(within, key=lambda p: (p.accuracy, -p.expected_macs)) if meets
            else min(points, key=lambda p: p.expected_macs))
    return ThresholdFit(best.make_policy(), fitted_on, float(budget_macs), best.expected_macs, best.accuracy,
                        best.exit_fractions, meets, "grid", detail={"grid_points": len(points)})


# ----- MSDNet-style budgeted thresholds ---------------------------------------------------------------

def exit_scores(policy_name: str, logits: Tensor) -> Tensor:
    """Score that the policy thresholds, oriented so that higher = more confident:
    max softmax probability (confidence) or minus the entropy in nats (entropy)."""
    if policy_name == "confidence":
        return torch.softmax(logits.float(), dim=-1).amax(dim=-1)
    if policy_name == "entropy":
        return -softmax_entropy(logits)
    raise ValueError(f"budgeted fitting supports the threshold policies {', '.join(BUDGET_POLICIES)}, "
                     f"not {policy_name!r} (use fit_grid for it)")


def geometric_fractions(q: float, num_exits: int) -> list[float]:
    """p_k proportional to q^k, k = 0..K-1 (q = 0: everything at exit 0; q = inf: at the last)."""
    if q == 0:
        return [1.0] + [0.0] * (num_exits - 1)
    if math.isinf(q):
        return [0.0] * (num_exits - 1) + [1.0]
    logs = [k * math.log(q) for k in range(num_exits)]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    total = sum(weights)
    return [w / total for w in weights]


def thresholds_for_fractions(policy_name: str, logits: Sequence[Tensor],
                             fractions: Sequence[float]) -> tuple[float, ...]:
    """Per-exit thresholds so that ``floor(N * fractions[k])`` of the samples still in flight leave
    at exit k (more only on exact ties of the score). Each threshold lies midway (in float32, the
    precision ``decide`` compares in) between the score of the last sample that leaves and the next
    one, so that tiny numerical differences between batch sizes do not flip decisions."""
    scores = [exit_scores(policy_name, t).float() for t in logits[:-1]]
    n = logits[0].shape[0]
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for k, s in enumerate(scores):
        n_out = min(int(math.floor(n * fractions[k] + 1e-9)), int(remaining.sum()))
        if n_out <= 0:
            thresholds.append(NEVER[policy_name])
            continue
        ordered = torch.sort(s[remaining], descending=True).values
        cut = ordered[n_out - 1]
        if n_out < ordered.shape[0]:
            below = ordered[n_out]
            mid = (cut + below) / 2
            if below < mid <= cut:
                cut = mid
        remaining &= ~(s >= cut)
        # the policy's own threshold: confidence >= t, entropy <= t (score = -entropy)
        thresholds.append(float(cut) if policy_name == "confidence" else float(-cut))
    return tuple(thresholds)


def _fit_at(policy_name: str, q: float, logits: list[Tensor], labels: Tensor | None, costs: Tensor,
            split: str) -> tuple[ExitPolicy, OperatingPoint, list[float]]:
    fractions = geometric_fractions(q, len(logits))
    thresholds = thresholds_for_fractions(policy_name, logits, fractions)
    policy = make_policy(policy_name, thresholds if thresholds else (NEVER[policy_name],))
    return policy, _measure(policy, logits, labels, costs, split), fractions


def fit_to_budget(policy_name: str, val_logits: Sequence[Tensor], cost_per_exit: Sequence[float], budget_macs: float,
                  split: str = "validation", val_labels: Tensor | None = None, iterations: int = 60) -> ThresholdFit:
    """Per-exit thresholds whose expected MACs on the validation split are <= ``budget_macs``,
    with exit shares following p_k ~ q^k; q is the largest (by bisection on log q) that fits.

    Raises ValueError for ``split="test"`` and for policies without a score threshold (patience).
    When the budget is below the cost of exit 0, returns the all-exit-0 setting with ``meets_budget=False``.
    """
    fitted_on = check_fit_split(split)
    _check_policy(policy_name)
    if policy_name not in BUDGET_POLICIES:
        raise ValueError(f"fit_to_budget supports {', '.join(BUDGET_POLICIES)}, not {policy_name!r}; "
                         "use fit_grid for it")
    logits, costs = _check_inputs(val_logits, val_labels, cost_per_exit)
    if len(logits) == 1:
        policy = make_policy(policy_name, NEVER[policy_name])
        point = _measure(policy, logits, val_labels, costs, fitted_on)
        return ThresholdFit(policy, fitted_on, float(budget_macs), point.expected_macs, point.accuracy,
                            point.exit_fractions, point.expected_macs <= budget_macs, "geometric", None, (1.0,))

    def result(q: float, meets: bool) -> ThresholdFit:
        policy, point, fractions = _fit_at(policy_name, q, logits, val_labels, costs, fitted_on)
        return ThresholdFit(policy, fitted_on, float(budget_macs), point.expected_macs, point.accuracy,
                            point.exit_fractions, meets, "geometric", q, tuple(fractions),
                            {"iterations": iterations})

    def cost(q: float) -> float:
        return _fit_at(policy_name, q, logits, val_labels, costs, fitted_on)[1].expected_macs

    if cost(0.0) > budget_macs:
        return result(0.0, False)
    if cost(math.inf) <= budget_macs:
        return result(math.inf, True)
    lo, hi = -30.0, 30.0  # log q
    if cost(math.exp(lo)) > budget_macs:
        return result(0.0, True)
    if cost(math.exp(hi)) <= budget_macs:
        return result(math.exp(hi), True)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if cost(math.exp(mid)) <= budget_macs:
            lo = mid
        else:
            hi = mid
    return result(math.exp(lo), True)


# ----- gated and routed models: the decision threshold ------------------------------------------

@dataclass(frozen=True)
class DecisionFit:
    """A decision threshold fitted to a compute budget: the validation cost and accuracy it gives,
    and the end points of the model's range on the same split (``macs_all``: every gated block or
    chosen expert runs; ``macs_none``: none does)."""

    policy: DecisionThreshold
    fitted_on: str
    budget_macs: float
    expected_macs: float
    accuracy: float
    meets_budget: bool
    macs_all: float
    macs_none: float
    evaluations: int


Measure = Callable[[float], tuple[float, float]]
"""threshold -> (mean MACs, top-1 %) of the model's real dynamic path on the fitting split."""


def fit_decision_threshold(measure: Measure, budget_fraction: float | None, *, split: str = "validation",
                           lo: float = 0.0, hi: float = 1.0, iterations: int = 8,
                           cache: dict[float, tuple[float, float]] | None = None,
                           budget_macs: float | None = None) -> DecisionFit:
    """The smallest threshold in [lo, hi] whose cost on ``split`` is within ``macs_none +
    budget_fraction * (macs_all - macs_none)`` (or within ``budget_macs``, an absolute budget, given
    instead of the fraction), by bisection (cost falls as the threshold rises; ``iterations``
    halvings, so the threshold is within (hi - lo) / 2^iterations of the boundary). ``measure`` runs
    the real path; ``cache`` shares its results between the budgets of one model."""
    fitted_on = check_fit_split(split)
    if (budget_fraction is None) == (budget_macs is None):
        raise ValueError("give one of budget_fraction and budget_macs")
    if budget_fraction is not None and not 0.0 <= budget_fraction <= 1.0:
        raise ValueError(f"budget_fraction must be in [0, 1], got {budget_fraction}")
    seen = {} if cache is None else cache

    def cost(t: float) -> tuple[float, float]:
        if t not in seen:
            seen[t] = measure(t)
        return seen[t]

    macs_all, macs_none = cost(lo)[0], cost(hi)[0]
    target = budget_macs if budget_macs is not None else macs_none + budget_fraction * (macs_all - macs_none)
    low, high = lo, hi  # cost(low) > target >= cost(high), unless the end points already fit
    if macs_all > target:
        for _ in range(iterations):
            mid = 0.5 * (low + high)
            if cost(mid)[0] <= target:
                high = mid
            else:
                low = mid
    best = lo if macs_all <= target else high
    macs, acc = cost(best)
    return DecisionFit(DecisionThreshold((best,)), fitted_on, target, macs, acc, macs <= target, macs_all,
                       macs_none, len(seen))
