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

Gated and routed models take one other decider, :class:`DecisionThreshold` (``decision_threshold``):
the threshold their own decisions are taken at (SkipNet: a block runs when its gate probability is
above it, 0.5 being the learned rule; MoE: a chosen expert runs on a token when its routing weight
is at least it, 0 being the learned rule). Moving it trades accuracy for compute; the harness fits it
to budgets on the validation split (:func:`fractalbench.harness.calibration.fit_decision_threshold`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass
class DecisionThreshold(ExitPolicy):
    """The threshold a gated or routed model takes its own decisions at (one value; see the module
    docstring). Not an exit policy: early-exit cascades refuse it."""

    name: str = "decision_threshold"

    @property
    def value(self) -> float:
        return self.threshold_at(0)

    def decide(self, k: int, logits: Tensor, state: State) -> tuple[Tensor, State]:
        raise TypeError("decision_threshold sets the decisions of gated and routed models; "
                        "early-exit models take confidence, entropy or patience")


def decision_threshold(policy: ExitPolicy | None, default: float) -> float:
    """The threshold a gated/routed model decides at: ``default`` (its learned rule) for None, the
    value of a :class:`DecisionThreshold`; TypeError for an exit policy (it has no meaning there)."""
    if policy is None:
        return default
    if isinstance(policy, DecisionThreshold):
        return policy.value
    raise TypeError(f"gated and routed models take a decision_threshold policy or None, "
                    f"not {policy.describe()!r}")


DECIDER_NAMES = ("decision_threshold",)
_POLICIES = {"confidence": ConfidencePolicy, "entropy": EntropyPolicy, "patience": PatiencePolicy,
             "decision_threshold": DecisionThreshold}


# ----- exit policies of users: registered, from entry points, or by import path -------------------------

POLICY_ENTRY_POINT_GROUP = "fractalbench.policies"


@dataclass(frozen=True)
class UserPolicy:
    """An exit policy a user added: its class (an :class:`ExitPolicy` subclass whose ``decide`` takes
    exit k's logits), the threshold grid swept when a suite gives none, and who added it."""

    cls: type
    grid: tuple[float, ...]
    origin: str


_USER_POLICIES: dict[str, UserPolicy] = {}
_POLICY_PLUGINS_LOADED = False


def register_policy(name: str, cls: type | None = None, *, grid: Sequence[float] = ()) -> Any:
    """Register an exit policy class under ``name`` (a decorator without ``cls``). ``grid``: the
    thresholds a suite sweeps when its ``policies:`` entry gives none. Suites then take ``{name: NAME}``;
    budgets are fitted on validation over the grid (the most accurate point within the budget)."""

    def add(policy_cls: type) -> type:
        if not (isinstance(policy_cls, type) and issubclass(policy_cls, ExitPolicy)):
            raise TypeError(f"policy {name!r}: {policy_cls!r} is not a subclass of fractalbench.harness.policies."
                            "ExitPolicy")
        if name in _POLICIES or name in _USER_POLICIES:
            raise ValueError(f"an exit policy is already registered under the name {name!r}")
        _USER_POLICIES[name] = UserPolicy(policy_cls, tuple(float(g) for g in grid),
                                          f"module {getattr(policy_cls, '__module__', '?')}")
        return policy_cls

    return add(cls) if cls is not None else add


def unregister_policy(name: str) -> None:
    """Remove a user's registration (tests)."""
    _USER_POLICIES.pop(name, None)


def _load_policy_plugins() -> None:
    """Register the entry points of group :data:`POLICY_ENTRY_POINT_GROUP` once: each names an
    ExitPolicy subclass (registered under the entry point's name, its ``default_grid`` attribute as
    the grid) or a module whose import registers policies. A failing one is logged, not raised."""
    global _POLICY_PLUGINS_LOADED
    if _POLICY_PLUGINS_LOADED:
        return
    _POLICY_PLUGINS_LOADED = True
    import importlib.metadata
    import logging

    for point in sorted(importlib.metadata.entry_points(group=POLICY_ENTRY_POINT_GROUP), key=lambda p: p.name):
        try:
            obj = point.load()
            if isinstance(obj, type) and point.name not in _USER_POLICIES:
                register_policy(point.name, obj, grid=getattr(obj, "default_grid", ()))
        except Exception as exc:  # noqa: BLE001 - a broken plugin is one warning, the others load
            logging.getLogger(__name__).warning("exit policy plugin %s (%s) failed to load: %s: %s", point.name,
                                                point.value, type(exc).__name__, exc)


def _import_policy(path: str) -> type:
    import importlib

    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"exit policy {path!r}: {type(exc).__name__}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, ExitPolicy)):
        raise ValueError(f"exit policy {path!r} is not a subclass of fractalbench.harness.policies.ExitPolicy")
    return obj


def policy_names() -> tuple[str, ...]:
    """The exit policies a suite can name: the built-in ones, then the registered and plugin ones."""
    _load_policy_plugins()
    return POLICY_NAMES + tuple(sorted(_USER_POLICIES))


def is_builtin(name: str) -> bool:
    return name in _POLICIES


def user_policy(name: str) -> UserPolicy | None:
    """The user's policy ``name`` (registered, a plugin, or an import path ``pkg.module:Class``, whose
    grid is its ``default_grid`` attribute); None for a built-in one; ValueError with the close
    matches for a name that is none of these."""
    if name in _POLICIES:
        return None
    _load_policy_plugins()
    if name in _USER_POLICIES:
        return _USER_POLICIES[name]
    if ":" in name:
        cls = _import_policy(name)
        return UserPolicy(cls, tuple(float(g) for g in getattr(cls, "default_grid", ())), f"import path {name}")
    import difflib

    known = list(policy_names())
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean: {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown exit policy {name!r}; {hint}allowed: {', '.join(known)}, or an import path "
                     "package.module:Class of an ExitPolicy subclass")


def make_policy(name: str, thresholds: Sequence[float] | float) -> ExitPolicy:
    """Build a policy by name (built-in, registered, plugin or import path). Raises ValueError naming
    the allowed policies."""
    if name not in _POLICIES:
        if name in DECIDER_NAMES:
            raise ValueError(f"unknown exit policy {name!r}")  # pragma: no cover - decision_threshold is in _POLICIES
        info = user_policy(name)
        values = (float(thresholds),) if isinstance(thresholds, (int, float)) else tuple(float(t) for t in thresholds)
        policy = info.cls(thresholds=values)
        policy.name = name
        return policy
    if isinstance(thresholds, (int, float)):
        thresholds = (float(thresholds),)
    values = tuple(float(t) for t in thresholds)
    if any(math.isnan(t) for t in values):
        raise ValueError(f"policy {name!r}: thresholds must be numbers, got {values}")
    if name == "patience" and (len(values) != 1 or values[0] < 1 or values[0] != int(values[0])):
        raise ValueError(f"policy 'patience' takes one whole number >= 1, got {values}")
    if name == "decision_threshold" and len(values) != 1:
        raise ValueError(f"policy 'decision_threshold' takes one value, got {values}")
    return _POLICIES[name](thresholds=values)


def default_policy() -> ExitPolicy:
    """The policy used when none is given: never exits early (max-softmax >= 1.01)."""
    return ConfidencePolicy(thresholds=(1.01,))
