"""Layer 3 of :mod:`harness.metrics.flops`: cost tables (MACs per cost unit and per forced exit at
batch 1), the expected cost of a dynamic model from its traces, and the per-sample oracle that
checks the table against MACs counted on the real dynamic forward."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from harness import contract
from harness.metrics._mac_counter import MacCount, MacCounter, count_macs, eval_mode, model_device
from harness.metrics.statistics import Summary, summarize


@dataclass(frozen=True, eq=False)
class CostTable(Mapping):
    """MACs per cost unit (a Mapping name -> MACs, so ``executed_macs(trace, table)`` works) and per
    forced exit (cumulative, batch 1). ``probes``/``exit_counts`` keep the raw counts."""

    units: dict[str, int | float]
    exits: tuple[int | float, ...]
    baselines: dict[str, str | None]
    probes: dict[str, MacCount]
    exit_counts: tuple[MacCount, ...]
    input_shape: tuple[int, ...]

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


def _check_batch1(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"the cost table needs a batch-1 sample input (shape [1, ...]), got {shape}")


def build_cost_table(model: nn.Module, sample_input: Tensor) -> CostTable:
    """Count every cost unit's probe and every forced exit at batch 1 (eval mode, no grad)."""
    _check_batch1(sample_input)
    x = sample_input.to(model_device(model))
    with eval_mode(model), torch.no_grad():
        units = contract.cost_units(model)
        names = [u.name for u in units]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"cost unit name(s) {dupes} appear more than once in {type(model).__name__}.cost_units()")
        probes = {u.name: count_macs(u.probe, x, module=model) for u in units}
        values: dict[str, int | float] = {}
        for u in units:
            base = 0
            if u.baseline is not None:
                if u.baseline not in probes:
                    raise ValueError(f"cost unit {u.name!r} has baseline {u.baseline!r}, which is not a unit; "
                                     f"units: {', '.join(names)}")
                base = probes[u.baseline].total
            macs = probes[u.name].total - base
            if macs < 0:
                raise ValueError(f"cost unit {u.name!r}: its probe ran {probes[u.name].total} MACs, fewer than its "
                                 f"baseline {u.baseline!r} ({base}); the probe must include the baseline's work")
            values[u.name] = macs
        exit_counts = tuple(count_macs(lambda inp, k=k: contract.forced_forward(model, inp, k), x, module=model)
                            for k in range(contract.num_exits(model)))
    return CostTable(values, tuple(c.total for c in exit_counts), {u.name: u.baseline for u in units}, probes,
                     exit_counts, tuple(sample_input.shape))


# ----- expected cost of a dynamic model -----------------------------------------------------------

def trace_histograms(trace: contract.Trace, num_exits: int | None = None,
                     num_experts: int | None = None) -> dict[str, Any]:
    """Exit histogram (bincount of exit_index), gate rates (mean per block) and expert counts
    (bincount per layer; -1 = dropped token, counted apart)."""
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
            dropped.append(int((chosen < 0).sum()))
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
