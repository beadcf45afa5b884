"""The model contract: static models and the dynamic protocol.

Every model is an ``nn.Module`` whose ``forward(x)`` returns final logits. Models with several
exits, gates or experts implement :class:`DynamicModel` on top of that:

- ``num_exits`` and ``forward_exits(x)``: logits of every exit (training, per-exit accuracy).
- ``forced_forward(x, k)``: runs exactly what a sample that leaves at exit ``k`` runs (earlier
  heads and decisions included) and nothing after it; returns the logits of exit ``k``.
- ``dynamic_forward(x, policy, mode)``: logits plus a per-sample :class:`Trace`. ``mode="compact"``
  really stops (finished samples leave the batch, skipped blocks and unchosen experts are not
  computed); ``mode="mask"`` is the labelled variant that computes everything and selects.
- ``loss_terms(x, y)``: the training objective as named terms; the trainer minimises their sum.
- ``cost_units()``: the pieces whose executed count, per sample, determines its cost. Each unit
  carries a probe that the cost machinery (``fractalbench.harness.metrics.flops``) runs on a batch-1 input under
  ``FlopCounterMode``; a unit's MACs are the probe's MACs minus those of its ``baseline`` unit.
  A trace's ``unit_counts[name][n]`` says how often sample ``n`` executed that unit, so the
  executed MACs of sample n are ``sum_u unit_counts[u][n] * macs[u]``.

Optional hooks: a model may define any of the attributes in :data:`OPTIONAL_HOOKS`; the engine
reads them only through the functions of the same name below, which supply the defaults, so no
part of the engine knows a model family.

Static models are the one-exit case; the module-level functions below (``num_exits``,
``forward_exits`` ...) give every ``nn.Module`` the full protocol so every metric works on every
model.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DYNAMIC_KINDS = ("static", "early_exit", "gated", "routed")
INFERENCE_MODES = ("compact", "mask")


@dataclass
class Trace:
    """Per-sample record of what a dynamic forward executed.

    exit_index: LongTensor [N], the exit each sample left at (static and gated models: last exit).
    unit_counts: name -> FloatTensor [N], how many times each cost unit ran for each sample.
    gates: optional BoolTensor [N, G], gate bits (True = block executed).
    experts: optional LongTensor [N, L, S], expert chosen per layer and token slot (-1 = dropped; values
        below -1 are empty slots, e.g. expert choice's experts that did not take a token).
    extras: free-form per-sample tensors a family wants to report (e.g. patience counters).
    """

    exit_index: Tensor
    unit_counts: dict[str, Tensor]
    gates: Tensor | None = None
    experts: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.exit_index.shape[0])

    def to(self, device: torch.device | str) -> Trace:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Trace(
            exit_index=self.exit_index.to(device),
            unit_counts={k: v.to(device) for k, v in self.unit_counts.items()},
            gates=move(self.gates),
            experts=move(self.experts),
            extras={k: v.to(device) for k, v in self.extras.items()},
        )

    @staticmethod
    def concat(traces: Sequence[Trace]) -> Trace:
        """Concatenate traces of consecutive batches along the sample axis."""
        if not traces:
            raise ValueError("Trace.concat needs at least one trace")
        first = traces[0]

        def cat_opt(name: str) -> Tensor | None:
            vals = [getattr(t, name) for t in traces]
            if any(v is None for v in vals):
                return None
            return torch.cat([v.cpu() for v in vals])

        return Trace(
            exit_index=torch.cat([t.exit_index.cpu() for t in traces]),
            unit_counts={k: torch.cat([t.unit_counts[k].cpu() for t in traces]) for k in first.unit_counts},
            gates=cat_opt("gates"),
            experts=cat_opt("experts"),
            extras={k: torch.cat([t.extras[k].cpu() for t in traces]) for k in first.extras},
        )


@dataclass
class DynamicOutput:
    """Logits [N, classes] of the exit each sample took, and its trace."""

    logits: Tensor
    trace: Trace


@dataclass(frozen=True)
class CostUnit:
    """A countable piece of computation.

    probe: called with a batch-1 input; runs exactly this unit (plus its ``baseline``'s work).
    baseline: name of another unit whose MACs are subtracted from the probe's (None: nothing).
    """

    name: str
    probe: Callable[[Tensor], Any]
    baseline: str | None = None


class DynamicModel(nn.Module):
    """Base class of models with exits, gates or experts. Subclasses implement the protocol."""

    dynamic_kind: str = "early_exit"

    @property
    def num_exits(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_exits(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dynamic_forward(self, x: Tensor, policy: Any = None, mode: str = "compact") -> DynamicOutput:
        raise NotImplementedError  # pragma: no cover - abstract

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def cost_units(self) -> list[CostUnit]:  # pragma: no cover - abstract
        raise NotImplementedError

    def trace_for_exits(self, exit_index: Tensor) -> Trace | None:
        """The trace compact inference records for samples that leave at ``exit_index`` [N], for
        cascades whose executed units follow from the exit alone (threshold sweeps are then computed
        from exit logits, see ``fractalbench.harness._sweep``); None (the default) where they depend on more."""
        return None


# ----- protocol functions that work on every nn.Module -------------------------------------------

def is_dynamic(model: nn.Module) -> bool:
    return isinstance(model, DynamicModel)


def dynamic_kind(model: nn.Module) -> str:
    return model.dynamic_kind if is_dynamic(model) else "static"


def num_exits(model: nn.Module) -> int:
    return model.num_exits if is_dynamic(model) else 1


def forward_exits(model: nn.Module, x: Tensor) -> list[Tensor]:
    return model.forward_exits(x) if is_dynamic(model) else [model(x)]


def check_exit_index(model: nn.Module, exit_index: int) -> int:
    n = num_exits(model)
    if not isinstance(exit_index, int) or not 0 <= exit_index < n:
        raise ValueError(f"exit index {exit_index!r} is out of range: this model has exits 0..{n - 1}")
    return exit_index


def forced_forward(model: nn.Module, x: Tensor, exit_index: int) -> Tensor:
    check_exit_index(model, exit_index)
    return model.forced_forward(x, exit_index) if is_dynamic(model) else model(x)


def check_mode(mode: str) -> str:
    if mode not in INFERENCE_MODES:
        raise ValueError(f"inference mode {mode!r} is not one of {', '.join(INFERENCE_MODES)}")
    return mode


def dynamic_forward(model: nn.Module, x: Tensor, policy: Any = None, mode: str = "compact") -> DynamicOutput:
    check_mode(mode)
    if is_dynamic(model):
        return model.dynamic_forward(x, policy, mode)
    logits = model(x)
    n = x.shape[0]
    trace = Trace(
        exit_index=torch.zeros(n, dtype=torch.long, device=x.device),
        unit_counts={"full": torch.ones(n, device=x.device)},
    )
    return DynamicOutput(logits, trace)


def loss_terms(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    if is_dynamic(model):
        return model.loss_terms(x, y)
    return {"cross_entropy": F.cross_entropy(model(x), y)}


def cost_units(model: nn.Module) -> list[CostUnit]:
    if is_dynamic(model):
        return model.cost_units()
    return [CostUnit("full", model)]


def executed_macs(trace: Trace, unit_macs: Mapping[str, float]) -> Tensor:
    """Per-sample executed MACs: sum over units of count x MACs-per-unit (float64 [N])."""
    missing = set(trace.unit_counts) - set(unit_macs)
    if missing:
        raise ValueError(f"the cost table has no entry for unit(s) {sorted(missing)}")
    total = torch.zeros(len(trace), dtype=torch.float64)
    for name, counts in trace.unit_counts.items():
        total += counts.detach().cpu().to(torch.float64) * float(unit_macs[name])
    return total


class LossTermsModule(nn.Module):
    """Wraps a model so that ``forward(x, y)`` returns its loss terms (for DDP, which only syncs
    gradients of computations that go through the wrapped module's ``forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return loss_terms(self.model, x, y)


# ----- optional hooks ------------------------------------------------------------------------------

OPTIONAL_HOOKS: dict[str, str] = {
    "active_parameters": "method () -> int: parameters one sample uses (routed models); default: none reported",
    "full_network_is_exit": "bool: False when forward() is not one of the exits (FractalNet joins all columns); "
                            "the runner then also reports the full network's accuracy (top1_full); default True",
    "extra_results": "method (x: Tensor [N, C, H, W] of test images, eval mode, no grad) -> ModelExtras: "
                     "model-specific rows and artifacts (FractalBrainNet's pattern analysis); default: nothing",
    "on_train_epoch": "method (epoch, epochs) -> None, called before every training epoch (SDN's loss-weight ramp)",
    "on_train_end": "method (train_set, batch_size, device) -> None, after the last epoch and before the final "
                    "checkpoint (FractalNet's batch-norm statistics per inference path)",
    "ddp_find_unused_parameters": "bool for DistributedDataParallel; default True for gated and routed models",
    "dense_backbone": "method () -> nn.Module: the dense network whose modules this model shares (SDN, BranchyNet, "
                      "SkipNet and the MoE ResNets are built on a CIFAR ResNet): that network's weights load into it "
                      "(fractalbench.harness.weights) and `freeze: backbone` trains everything else; default: none",
    "on_backbone_loaded": "method () -> None, called after weights were loaded into the dense backbone (MoE: the "
                          "experts start as the zero function, so the model starts as the dense network: sparse "
                          "upcycling); default: nothing",
    "batch_dependent": "bool: True when a sample's decisions depend on the other samples of its batch (expert-choice "
                       "routing over the batch's tokens): the checker then verifies that a permuted batch gives the "
                       "permuted results instead of batch-1 equality, and batch-1 latency rows say that each sample "
                       "was routed alone; default False",
    "mask_replaces": "mapping unit name pattern (fnmatch) -> the pattern of the units mode='mask' runs instead, "
                     "where the compute-everything form is another algorithm (CondConv's mask mode convolves with "
                     "every expert and mixes the outputs, so it mixes no kernel: {'layer*_aggregate': "
                     "'layer*_mix'}): the checker lets such a unit run fewer times in mask mode when every sample "
                     "still costs at least as many MACs there; default: none",
    "cost_roles": "mapping role (one of COST_ROLES) -> submodule name patterns (fnmatch, relative to the model, "
                  "e.g. 'heads', 'moe.*.router'): the modules whose MACs are that role's; default: nothing "
                  "declared, every MAC is backbone",
}
"""Every optional hook a model may define: name -> what it is and its default."""

UNUSED_PARAMETER_KINDS = ("routed", "gated")
"""Dynamic kinds whose training steps can leave parameters out (experts not chosen, blocks skipped)."""


@dataclass(frozen=True)
class ExtraRow:
    """One model-specific result: ``metric`` (in :mod:`fractalbench.harness.catalogue`), value, unit and extra
    row fields (e.g. ``exit``, ``split``, ``detail``)."""

    metric: str
    value: float | None
    unit: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ModelExtras:
    """What :func:`extra_results` returns: result rows and artifacts (name -> array, stored as .npy)."""

    rows: list[ExtraRow] = field(default_factory=list)
    artifacts: dict[str, np.ndarray] = field(default_factory=dict)


COST_ROLES = ("heads", "gates", "routers")
"""Roles a model may declare for its submodules (:func:`cost_roles`): exit heads (the classifiers
that produce exit logits), gates (which decide whether a block runs) and routers (which choose
experts). Every MAC outside a declared module is ``backbone``."""


def cost_roles(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The model's ``cost_roles`` (role -> submodule name patterns), checked; {} when it declares none."""
    declared = getattr(model, "cost_roles", None) or {}
    unknown = sorted(set(declared) - set(COST_ROLES))
    if unknown:
        raise ValueError(f"{type(model).__name__}.cost_roles: unknown role(s) {unknown}; "
                         f"roles: {', '.join(COST_ROLES)}")
    return {role: (patterns,) if isinstance(patterns, str) else tuple(patterns) for role, patterns in declared.items()}


def active_parameters(model: nn.Module) -> int | None:
    hook = getattr(model, "active_parameters", None)
    return int(hook()) if callable(hook) else None


def expert_compute(model: nn.Module, trace: Trace, table: Any, batch_size: int) -> list[dict[str, Any]] | None:
    """Per routed layer, useful against padded expert MACs and dropped assignments (the model's
    ``expert_compute(trace, table, batch_size)`` hook, e.g.
    :meth:`fractalbench.baselines.moe.MoENetwork.expert_compute`), or None for models without it."""
    hook = getattr(model, "expert_compute", None)
    return hook(trace, table, batch_size) if callable(hook) and trace.experts is not None else None


def has_length_variants(model: nn.Module) -> bool:
    """Whether ``model`` is a sequence model that can be built at other lengths (``at_length`` and
    ``length_input`` hooks; :mod:`fractalbench.harness.metrics.length_scaling`)."""
    return callable(getattr(model, "at_length", None)) and callable(getattr(model, "length_input", None))


def length_variants(model: nn.Module, length: int) -> dict[str, nn.Module]:
    """The variants of ``model`` to measure at sequence length ``length``, by name (its ``at_length``)."""
    if not has_length_variants(model):
        raise TypeError(f"{type(model).__name__} has no at_length/length_input hooks (not a sequence model)")
    return dict(model.at_length(length))


def length_input(model: nn.Module, length: int) -> Tensor:
    """One sample's input at sequence length ``length`` (its ``length_input``)."""
    if not has_length_variants(model):
        raise TypeError(f"{type(model).__name__} has no at_length/length_input hooks (not a sequence model)")
    return model.length_input(length)


def dense_backbone(model: nn.Module) -> nn.Module | None:
    """The dense network ``model`` is built on (its ``dense_backbone()`` hook), or None."""
    hook = getattr(model, "dense_backbone", None)
    return hook() if callable(hook) else None


def on_backbone_loaded(model: nn.Module) -> None:
    hook = getattr(model, "on_backbone_loaded", None)
    if callable(hook):
        hook()


def mask_replaces(model: nn.Module) -> dict[str, str]:
    """The units ``model``'s mask mode replaces by others (its ``mask_replaces``; pattern -> pattern)."""
    return dict(getattr(model, "mask_replaces", None) or {})


def batch_dependent(model: nn.Module) -> bool:
    """Whether ``model`` declares that a sample's decisions depend on its batch (its ``batch_dependent``)."""
    return bool(getattr(model, "batch_dependent", False))


def full_network_is_exit(model: nn.Module) -> bool:
    return bool(getattr(model, "full_network_is_exit", True))


def extra_results(model: nn.Module, x: Tensor) -> ModelExtras:
    hook = getattr(model, "extra_results", None)
    if not callable(hook):
        return ModelExtras()
    extras = hook(x)
    if not isinstance(extras, ModelExtras):
        raise TypeError(f"{type(model).__name__}.extra_results must return fractalbench.harness.contract.ModelExtras, "
                        f"got {type(extras).__name__}")
    return extras


def on_train_epoch(model: nn.Module, epoch: int, epochs: int) -> None:
    hook = getattr(model, "on_train_epoch", None)
    if callable(hook):
        hook(epoch, epochs)


def on_train_end(model: nn.Module, train_set: Any, batch_size: int, device: Any) -> None:
    hook = getattr(model, "on_train_end", None)
    if callable(hook):
        hook(train_set, batch_size, device)


def ddp_find_unused_parameters(model: nn.Module) -> bool:
    """Whether DistributedDataParallel must look for parameters that got no gradient in a step:
    the model's own ``ddp_find_unused_parameters`` when it sets one (FractalNet: drop-path runs a
    single column for part of a batch), else True for routed and gated models. Without it DDP fails
    on the next step ("Expected to have finished reduction in the prior iteration ...")."""
    flag = getattr(model, "ddp_find_unused_parameters", None)
    if flag is not None:
        return bool(flag)
    return dynamic_kind(model) in UNUSED_PARAMETER_KINDS
