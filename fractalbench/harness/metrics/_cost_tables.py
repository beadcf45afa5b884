"""Layer 3 of :mod:`fractalbench.harness.metrics.flops`: cost tables (MACs per cost unit and per forced exit at
batch 1, and per unit by role), the expected cost of a dynamic model from its traces, and the
per-sample oracle that checks the table against MACs counted on the real dynamic forward.

Roles. A model declares which submodules are exit heads, gates and routers
(:func:`fractalbench.harness.contract.cost_roles`); a MAC counted while such a module (or one inside it) runs
is that role's, every other MAC is ``backbone`` (:data:`ROLE_PARTS`). A unit's MACs by role are
its probe's minus its baseline's, like its total, so they add up to the unit's MACs exactly."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from fractalbench.harness import contract
from fractalbench.harness.metrics._mac_counter import MacCount, MacCounter, count_macs, eval_mode, model_device
from fractalbench.harness.metrics.statistics import Summary, summarize


@dataclass(frozen=True, eq=False)
class CostTable(Mapping):
    """MACs per cost unit (a Mapping name -> MACs, so ``executed_macs(trace, table)`` works) and per
    forced exit (cumulative, batch 1). ``probes``/``exit_counts`` keep the raw counts.

    ``role_owners``: counter name -> role of every declared module (:func:`role_owners`);
    ``unit_roles[u]``: unit u's MACs by role (:data:`ROLE_PARTS`), its probe's minus its baseline's,
    adding up to ``units[u]`` exactly (checked on construction; {} = not known);
    ``forward_count``: ``forward()`` at batch 1 where it is a fixed path, else None."""

    units: dict[str, int | float]
    exits: tuple[int | float, ...]
    baselines: dict[str, str | None]
    probes: dict[str, MacCount]
    exit_counts: tuple[MacCount, ...]
    input_shape: tuple[int, ...]
    role_owners: dict[str, str] = field(default_factory=dict)
    unit_roles: dict[str, dict[str, int | float]] = field(default_factory=dict)
    forward_count: MacCount | None = None

    def __post_init__(self) -> None:
        _check_unit_roles(self.units, self.unit_roles)

    def __getitem__(self, name: str) -> int | float:
        return self.units[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def unsupported_ops(self) -> dict[str, int]:
        """Ops without a formula seen in any probe or forced path (name -> most calls in one count)."""
        merged: Counter[str] = Counter()
        for count in list(self.probes.values()) + list(self.exit_counts):
            for name, n in count.unsupported_ops.items():
                merged[name] = max(merged[name], n)
        return dict(merged)

    @property
    def has_roles(self) -> bool:
        """Whether the table has MACs by role (tables from :func:`build_cost_table` do)."""
        return bool(self.unit_roles)

    def roles_of(self, count: MacCount) -> dict[str, int | float]:
        """MACs of one counted call by role (:data:`ROLE_PARTS`), with this table's role owners."""
        return split_by_role(count, self.role_owners)

    @property
    def exit_roles(self) -> tuple[dict[str, int | float], ...]:
        """MACs by role of each forced exit (``exit_counts``)."""
        return tuple(self.roles_of(c) for c in self.exit_counts)


ROLE_PARTS = ("backbone", *contract.COST_ROLES)
"""The parts a MAC belongs to: ``backbone`` (everything not declared) and the declarable roles."""


def role_owners(model: nn.Module) -> dict[str, str]:
    """Counter name (``RootClass.path``, as in ``MacCount.by_module``) -> role, for every module
    declared in :func:`fractalbench.harness.contract.cost_roles` and every module inside one. A pattern that
    matches no module, or a module in two roles, is an error."""
    root = type(model).__name__
    counter_name = {}
    for name, mod in model.named_modules():  # the first path of a shared module is the counter's name
        counter_name.setdefault(mod, f"{root}.{name}" if name else root)
    owners: dict[str, str] = {}
    for role, patterns in contract.cost_roles(model).items():
        for pattern in patterns:
            hits = [mod for name, mod in model.named_modules(remove_duplicate=False)
                    if name and fnmatchcase(name, pattern)]
            if not hits:
                raise ValueError(f"{root}.cost_roles: {role} pattern {pattern!r} matches no submodule")
            for mod in hits:
                for inner in mod.modules():
                    name = counter_name[inner]
                    if owners.setdefault(name, role) != role:
                        raise ValueError(f"{root}.cost_roles: module {name!r} is declared both "
                                         f"{owners[name]} and {role}; a MAC has one role")
    return owners


def _owner(name: str, owners: Mapping[str, str]) -> str | None:
    """The role of module ``name`` or of the nearest enclosing declared module (None: backbone)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        role = owners.get(".".join(parts[:i]))
        if role is not None:
            return role
    return None


def split_by_role(count: MacCount, owners: Mapping[str, str]) -> dict[str, int | float]:
    """MACs of ``count`` by role: a role's MACs are the ``by_module`` MACs of its outermost modules
    that ran (``by_module`` is cumulative: a module's entry includes its children's); backbone =
    total - the roles'."""
    parts: dict[str, int | float] = dict.fromkeys(contract.COST_ROLES, 0)
    for name, macs in count.by_module.items():
        role = _owner(name, owners)
        if role is None:
            continue
        enclosing = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        if not any(a in count.by_module and _owner(a, owners) is not None for a in enclosing):
            parts[role] += macs
    return {"backbone": count.total - sum(parts.values()), **parts}


def _check_unit_roles(units: Mapping[str, int | float], unit_roles: Mapping[str, Mapping[str, int | float]]) -> None:
    """Every unit's roles are the :data:`ROLE_PARTS`, none negative, and add up to its MACs exactly."""
    if not unit_roles:
        return
    if set(unit_roles) != set(units):
        raise ValueError(f"the cost table's MACs by role cover units {sorted(unit_roles)}, not {sorted(units)}")
    for name, roles in unit_roles.items():
        if tuple(roles) != ROLE_PARTS:
            raise ValueError(f"cost unit {name!r}: roles {list(roles)} are not {list(ROLE_PARTS)}")
        negative = {r: v for r, v in roles.items() if v < 0}
        if negative:
            raise ValueError(f"cost unit {name!r}: negative MACs by role {negative}; its probe must include its "
                             f"baseline's work in every role")
        if sum(roles.values()) != units[name]:
            raise ValueError(f"cost unit {name!r}: its MACs by role {dict(roles)} add up to {sum(roles.values())}, "
                             f"not to its {units[name]} MACs")


def _check_batch1(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"the cost table needs a batch-1 sample input (shape [1, ...]), got {shape}")


def build_cost_table(model: nn.Module, sample_input: Tensor) -> CostTable:
    """Count every cost unit's probe and every forced exit at batch 1 (eval mode, no grad); split
    each by role. ``forward_count``: ``model(x)`` where forward() is a fixed path (static and
    early-exit models; a gated or routed model's forward decides per sample), else None."""
    _check_batch1(sample_input)
    x = sample_input.to(model_device(model))
    owners = role_owners(model)
    with eval_mode(model), torch.no_grad():
        units = contract.cost_units(model)
        names = [u.name for u in units]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"cost unit name(s) {dupes} appear more than once in {type(model).__name__}.cost_units()")
        probes = {u.name: count_macs(u.probe, x, module=model) for u in units}
        values, roles = _unit_values(units, probes, owners)
        exit_counts = tuple(count_macs(lambda inp, k=k: contract.forced_forward(model, inp, k), x, module=model)
                            for k in range(contract.num_exits(model)))
        kind = contract.dynamic_kind(model)
        forward = exit_counts[0] if kind == "static" else count_macs(model, x) if kind == "early_exit" else None
    return CostTable(values, tuple(c.total for c in exit_counts), {u.name: u.baseline for u in units}, probes,
                     exit_counts, tuple(sample_input.shape), owners, roles, forward)


def _unit_values(units: list[contract.CostUnit], probes: Mapping[str, MacCount], owners: Mapping[str, str]
                 ) -> tuple[dict[str, int | float], dict[str, dict[str, int | float]]]:
    """MACs per unit and by role: the probe's minus the baseline unit's probe's."""
    values: dict[str, int | float] = {}
    roles: dict[str, dict[str, int | float]] = {}
    for u in units:
        base = MacCount(0)
        if u.baseline is not None:
            if u.baseline not in probes:
                raise ValueError(f"cost unit {u.name!r} has baseline {u.baseline!r}, which is not a unit; "
                                 f"units: {', '.join(probes)}")
            base = probes[u.baseline]
        macs = probes[u.name].total - base.total
        if macs < 0:
            raise ValueError(f"cost unit {u.name!r}: its probe ran {probes[u.name].total} MACs, fewer than its "
                             f"baseline {u.baseline!r} ({base.total}); the probe must include the baseline's work")
        values[u.name] = macs
        mine, theirs = split_by_role(probes[u.name], owners), split_by_role(base, owners)
        roles[u.name] = {r: mine[r] - theirs[r] for r in ROLE_PARTS}
    return values, roles


# ----- expected cost of a dynamic model -----------------------------------------------------------

def trace_histograms(trace: contract.Trace, num_exits: int | None = None,
                     num_experts: int | None = None) -> dict[str, Any]:
    """Exit histogram (bincount of exit_index), gate rates (mean per block) and expert counts
    (bincount per layer; -1 = dropped token, counted apart; values below -1 are empty slots)."""
    n = len(trace)
    exit_index = trace.exit_index.detach().cpu().long()
    k = max(int(num_exits or 0), int(exit_index.max()) + 1 if n else 1)
    counts = torch.bincount(exit_index, minlength=k).tolist()
    out: dict[str, Any] = {"n": n, "exit_counts": counts, "exit_fractions": [c / n if n else 0.0 for c in counts]}
    if trace.gates is not None:
        gates = trace.gates.detach().cpu().float()
        out["gate_rates"] = gates.mean(0).tolist() if n else [0.0] * gates.shape[1]
    if trace.experts is not None:
        experts = trace.experts.detach().cpu().long()
        e = max(int(num_experts or 0), int(experts.max()) + 1 if experts.numel() else 0)
        per_layer, dropped = [], []
        for layer in range(experts.shape[1]):
            chosen = experts[:, layer].reshape(-1)
            per_layer.append(torch.bincount(chosen[chosen >= 0], minlength=e).tolist())
            dropped.append(int((chosen == -1).sum()))  # below -1: empty slots, not drops
        out["expert_counts"], out["expert_dropped"] = per_layer, dropped
    return out


@dataclass(frozen=True)
class ExpectedCost:
    """Executed MACs per sample (float64 [N]) with their summary and the trace's histograms."""

    per_sample: Tensor
    summary: Summary
    histograms: dict[str, Any]

    @property
    def mean(self) -> float:
        return self.summary.mean


def expected_macs(trace: contract.Trace, table: Mapping[str, float], num_exits: int | None = None) -> ExpectedCost:
    """Mean (and distribution) over samples of the MACs each sample executed, from the cost table."""
    if len(trace) == 0:
        raise ValueError("expected MACs need a trace of at least one sample")
    per_sample = contract.executed_macs(trace, table)
    if num_exits is None and isinstance(table, CostTable):
        num_exits = len(table.exits)
    return ExpectedCost(per_sample, summarize(per_sample.tolist()), trace_histograms(trace, num_exits))


def expected_roles(trace: contract.Trace, table: CostTable) -> dict[str, Tensor]:
    """Executed MACs of each sample by role (:data:`ROLE_PARTS` -> float64 [N]): sum over units of
    count x the unit's MACs of that role. Per sample they add up to ``executed_macs`` exactly
    (integer MACs in float64)."""
    if not table.has_roles:
        raise ValueError("this cost table has no MACs by role (build it with build_cost_table)")
    return {r: contract.executed_macs(trace, {u: roles[r] for u, roles in table.unit_roles.items()})
            for r in ROLE_PARTS}


# ----- oracle ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OracleSample:
    """One sample counted at batch 1 on the real dynamic forward vs the cost table on its trace."""

    index: int
    counted: int | float
    table: float
    exit_index: int
    unsupported_ops: dict[str, int]

    @property
    def agrees(self) -> bool:
        return float(self.counted) == float(self.table)


def pick_samples(n: int, num_samples: int, seed: int = 0) -> list[int]:
    """A reproducible random subset of ``range(n)`` (sorted)."""
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[: max(0, min(num_samples, n))].tolist())


def oracle_check(model: nn.Module, inputs: Tensor, table: Mapping[str, float], policy: Any = None, *,
                 indices: list[int] | None = None, num_samples: int = 8, seed: int = 0,
                 mode: str = "compact") -> list[OracleSample]:
    """Count samples one by one (batch 1) under FlopCounterMode on ``dynamic_forward`` and compute
    the table-based MACs from the trace of that same call. They must be equal."""
    contract.check_mode(mode)
    if indices is None:
        indices = pick_samples(inputs.shape[0], num_samples, seed)
    bad = [i for i in indices if not 0 <= i < inputs.shape[0]]
    if bad:
        raise ValueError(f"oracle sample indices {bad} are out of range 0..{inputs.shape[0] - 1}")
    device = model_device(model)
    results = []
    with eval_mode(model), torch.no_grad():
        for i in indices:
            x = inputs[i:i + 1].to(device)
            with MacCounter(model) as counter:
                out = contract.dynamic_forward(model, x, policy, mode)
            count = counter.result()
            table_macs = float(contract.executed_macs(out.trace, table)[0])
            exit_index = int(out.trace.exit_index[0])
            results.append(OracleSample(i, count.total, table_macs, exit_index, count.unsupported_ops))
    return results
