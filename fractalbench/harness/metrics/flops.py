"""Compute: MACs counted on what actually ran, cost tables, expected cost of dynamic models.

Three layers, as in fvcore, each in its own module and all re-exported here: per-operator
formulas (torch's ``flop_registry`` plus :data:`EXTRA_FORMULAS`, and the zero-MAC allowlist;
``_mac_formulas.py``), one counting engine (:class:`MacCounter`: ``FlopCounterMode`` plus a
dispatch mode that records every aten op so that ops no formula covers are listed, not silently
dropped; :func:`count_macs` and the fvcore cross-check; ``_mac_counter.py``), and the cost
machinery (:func:`build_cost_table`, :func:`expected_macs`, :func:`oracle_check`;
``_cost_tables.py``). This module turns them into result rows (:func:`cost_rows`,
:func:`expected_cost_rows`, :func:`oracle_rows`).

Definitions
-----------
- One MAC is one multiply-accumulate. ``FlopCounterMode`` counts 2 FLOPs per MAC for
  convolutions and matrix products (mm, addmm, bmm, baddbmm, attention); MACs = its FLOPs / 2.
  Bias additions are not counted (the published CIFAR-ResNet/ImageNet numbers do not either).
- Ops in :data:`ZERO_MAC_OPS` (views, copies, element-wise arithmetic, activations,
  normalisation, pooling, reductions, indexing) cost 0 MACs by definition. Every other executed
  op without a formula is reported in ``unsupported_ops`` (name -> times executed): its work is
  missing from the total, and a table that shows the total should say so.
- Counting is at the dispatcher, so only what ran is counted: an early exit that really stops,
  a skipped block or an unchosen expert costs nothing. fvcore (:func:`fvcore_count`) traces the
  graph instead and is a cross-check for static models only.
- Cost table: ``units[u]`` = MACs of the probe of unit ``u`` minus the MACs of the probe of its
  baseline unit (both at batch 1); ``exits[k]`` = MACs of ``forced_forward(x, k)``, the
  cumulative cost of leaving at exit k (earlier heads and decisions included).
- Executed MACs of sample n = sum_u unit_counts[u][n] x units[u]
  (:func:`fractalbench.harness.contract.executed_macs`); the expected MACs of a dynamic model over a dataset
  is their mean. The oracle counts single samples at batch 1 on the real ``dynamic_forward`` and
  must agree exactly.
- Cost decomposition (:func:`decomposition_rows`): a model declares its exit heads, gates and
  routers (:func:`fractalbench.harness.contract.cost_roles`); every other MAC is backbone. The table keeps
  each unit's MACs by role (``unit_roles``, adding up to the unit's MACs exactly), so sample n's
  executed MACs split into backbone + heads + gating (gates and routers), exactly per sample.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fractalbench.harness import contract
from fractalbench.harness.metrics._cost_tables import (
    ROLE_PARTS,
    CostTable,
    ExpectedCost,
    OracleSample,
    build_cost_table,
    expected_macs,
    expected_roles,
    oracle_check,
    pick_samples,
    trace_histograms,
)
from fractalbench.harness.metrics._mac_counter import (
    FVCORE_MAC_OPS,
    FvcoreCount,
    MacCount,
    MacCounter,
    count_macs,
    eval_mode,
    fvcore_count,
    model_device,
)
from fractalbench.harness.metrics._mac_formulas import EXTRA_FORMULAS, ZERO_MAC_CATEGORIES, ZERO_MAC_OPS, aten
from fractalbench.harness.metrics.statistics import MIN_SAMPLES_P99, Summary, summarize
from fractalbench.harness.results import field_row as _row

__all__ = [
    "EXTRA_FORMULAS", "FVCORE_MAC_OPS", "ROLE_PARTS", "ZERO_MAC_CATEGORIES", "ZERO_MAC_OPS", "CostTable",
    "ExpectedCost", "FvcoreCount", "MacCount", "MacCounter", "OracleSample", "aten", "build_cost_table", "cost_rows",
    "count_macs", "decomposition_rows", "eval_mode", "expected_cost_rows", "expected_macs", "expected_roles",
    "expert_compute_rows", "fvcore_count", "model_device", "oracle_check", "oracle_rows", "parameter_counts",
    "pick_samples", "trace_histograms",
]


# ----- rows -----------------------------------------------------------------------------------------

def parameter_counts(model: nn.Module) -> dict[str, int | None]:
    """Total parameters (shared ones once) and, where the model says, the active ones per sample."""
    total = sum(p.numel() for p in model.parameters())
    return {"params": int(total), "params_active": contract.active_parameters(model)}


def _stats_times(summary: Summary, factor: float) -> dict[str, Any]:
    stats = summary.row_stats()
    return {k: (v * factor if v is not None and k != "n" else v) for k, v in stats.items()}


def expected_cost_rows(trace: contract.Trace, table: CostTable, label: str = "", /,
                       **row_fields: Any) -> list[dict[str, Any]]:
    """expected_macs/expected_flops (distribution), the cost decomposition (:func:`decomposition_rows`,
    where the table has MACs by role), exit_fraction, gate_rate and expert_load rows."""
    cost = expected_macs(trace, table)
    s, hist = cost.summary, cost.histograms
    fields = {**row_fields, "policy": label or row_fields.get("policy", "")}
    detail = {"min": s.min, "max": s.max, "exit_counts": hist["exit_counts"], "p99_needs_n": MIN_SAMPLES_P99,
              "definition": "mean over samples of executed MACs (cost table x trace)"}
    rows = [_row("expected_macs", s.mean, "MACs", fields, **s.row_stats(), detail=detail),
            _row("expected_flops", 2 * s.mean, "FLOPs", fields, **_stats_times(s, 2.0),
                 detail={"min": 2 * s.min, "max": 2 * s.max})]
    if getattr(table, "has_roles", False):
        rows.extend(decomposition_rows(trace, table, cost, fields))
    if len(table.exits) > 1:
        for k, (frac, count) in enumerate(zip(hist["exit_fractions"], hist["exit_counts"])):
            rows.append(_row("exit_fraction", frac, "fraction", fields, exit=k, n=s.n, detail={"count": count}))
    for g, rate in enumerate(hist.get("gate_rates", [])):
        rows.append(_row("gate_rate", rate, "fraction", fields, n=s.n, detail={"gate": g}))
    for layer, (counts, dropped) in enumerate(zip(hist.get("expert_counts", []), hist.get("expert_dropped", []))):
        tokens = sum(counts) + dropped
        shares = _per_sample_shares(trace, layer, len(counts))
        for e, c in enumerate(counts):
            spread = summarize(shares[:, e].tolist()) if len(shares) else None
            stats = spread.row_stats() if spread else {"n": 0}
            rows.append(_row("expert_load", c / tokens if tokens else 0.0, "fraction", fields, **stats,
                             detail={"layer": layer, "expert": e, "count": c, "dropped": dropped, "tokens": tokens,
                                     "min": spread.min if spread else None, "max": spread.max if spread else None,
                                     "definition": EXPERT_LOAD}))
    return rows


EXPERT_LOAD = (
    "value: the expert's share of the layer's routed assignments over the split (count / tokens, tokens = routed + "
    "dropped); n, std, p50, p90, p99, min, max: the same share within each sample (its routed assignments), over the "
    "samples that routed any")


def _per_sample_shares(trace: contract.Trace, layer: int, num_experts: int) -> Tensor:
    """[M, E]: each sample's share of its routed assignments of ``layer`` per expert (samples routing none left out)."""
    assign = trace.experts[:, layer].detach().cpu().long()
    counts = (assign[:, :, None] == torch.arange(num_experts)).sum(1).double()
    total = counts.sum(1, keepdim=True)
    keep = total[:, 0] > 0
    return counts[keep] / total[keep]


EXPERT_COMPUTE = (
    "useful: mean MACs per sample of the (token, expert) pairs routed, what the compact dispatch runs (per-token "
    "expert MACs from the cost table); padded: what a static-shape dispatch runs for the same routes, every expert "
    "a buffer of its capacity (per sample, or per evaluation batch for batch-wide expert choice; no capacity: the "
    "busiest expert's load in the batch); utilization = useful / padded (MoE-CAP's sparse accounting)")


def expert_compute_rows(model: nn.Module, trace: contract.Trace, table: CostTable, batch_size: int,
                        label: str = "", /, **row_fields: Any) -> list[dict[str, Any]]:
    """Routed models (``expert_compute`` hook): ``expert_macs_useful``, ``expert_macs_padded`` and
    ``expert_utilization`` over all routed layers (per layer in detail), and ``tokens_dropped`` per
    layer (share of assignments no expert ran; detail: count and total). [] for other models."""
    layers = contract.expert_compute(model, trace, table, batch_size)
    if not layers:
        return []
    fields = {**row_fields, "policy": label or row_fields.get("policy", "")}
    useful = sum(layer["useful"] for layer in layers)
    padded = sum(layer["padded"] for layer in layers)
    u, p = summarize(useful.tolist()), summarize(padded.tolist())
    per_layer = [{"layer": layer["layer"], "useful": float(layer["useful"].mean()),
                  "padded": float(layer["padded"].mean()), "capacity": layer["capacity"],
                  "tokens": layer["tokens"], "dispatch": layer["dispatch"]}
                 for layer in layers]
    detail = {"per_layer": per_layer, "batch_size": batch_size, "definition": EXPERT_COMPUTE}
    rows = [_row("expert_macs_useful", u.mean, "MACs", fields, **u.row_stats(), detail=detail),
            _row("expert_macs_padded", p.mean, "MACs", fields, **p.row_stats(), detail=detail),
            _row("expert_utilization", float(useful.sum() / padded.sum()) if float(padded.sum()) else 0.0, "fraction",
                 fields, n=len(useful), detail=detail)]
    for layer in layers:
        rows.append(_row("tokens_dropped", layer["dropped"] / layer["routable"] if layer["routable"] else 0.0,
                         "fraction", fields, n=layer["routable"],
                         detail={"layer": layer["layer"], "count": layer["dropped"], "routable": layer["routable"]}))
    return rows


DECOMPOSITION = (
    "mean over samples of the MACs each sample executed in that part (cost table by role x trace): backbone = "
    "every MAC outside the model's declared exit heads, gates and routers (harness.contract.cost_roles); heads = "
    "every exit head evaluated, taken or not (leaving at exit 2 of a cascade evaluates heads 0, 1 and 2); gating = "
    "gates and routers evaluated. Per sample backbone + heads + gating = executed MACs exactly; the row values are "
    "means (each rounded once), sum_over_samples holds the exact sums. A trace of mode='mask' counts every unit "
    "it computes, so a masked run reports everything it masks (cascades: the full network)")
AVOIDED = (
    "1 - expected_macs / full_network_macs, where the full network is the last forced exit: the full dynamic "
    "network with all its heads, gates and routers (cascades: every stage and every head). Negative where a run "
    "computes more than that (mode='mask' of a routed model runs every expert on every token); "
    "avoided_vs_forward: the same against forward(), the plain path without side heads, where it is a fixed path")


def decomposition_rows(trace: contract.Trace, table: CostTable, cost: ExpectedCost | None = None,
                       fields: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of one operating point: ``expected_macs_backbone``, ``expected_macs_heads``,
    ``expected_macs_gating`` (see :data:`DECOMPOSITION`) and ``macs_avoided_fraction`` (see
    :data:`AVOIDED`). The three parts add up to ``expected_macs`` (exactly per sample). A masked
    run's trace (``mode="mask"``: every stage runs, then the policy selects) counts every unit it
    computes, so it is reported as computing everything it masks (a cascade's decomposition is the
    full network's); the masked latency rows (``latency_masked``) are unchanged."""
    cost = cost or expected_macs(trace, table)
    fields, n = dict(fields or {}), cost.summary.n
    sums = {r: math.fsum(v.tolist()) for r, v in expected_roles(trace, table).items()}
    mean = {r: v / n for r, v in sums.items()}
    parts = {"backbone": ("backbone",), "heads": ("heads",), "gating": ("gates", "routers")}
    rows = []
    for part, roles in parts.items():
        detail = {"sum_over_samples": sum(sums[r] for r in roles), "expected_macs": cost.mean,
                  "share_of_expected": sum(mean[r] for r in roles) / cost.mean if cost.mean else None,
                  "definition": DECOMPOSITION}
        if len(roles) > 1:
            detail.update({r: mean[r] for r in roles})
        rows.append(_row(f"expected_macs_{part}", math.fsum(sums[r] for r in roles) / n, "MACs", fields, n=n,
                         detail=detail))
    full = table.exits[-1]
    forward = table.forward_count.total if table.forward_count is not None else None
    detail = {"full_network_macs": full, "full_network_by_role": table.exit_roles[-1], "expected_macs": cost.mean,
              "forward_macs": forward, "avoided_vs_forward": 1 - cost.mean / forward if forward else None,
              "definition": AVOIDED}
    rows.append(_row("macs_avoided_fraction", 1 - cost.mean / full if full else None, "fraction", fields, n=n,
                     detail=detail))
    return rows


def cost_rows(model: nn.Module, sample_input: Tensor,
              traces: contract.Trace | Mapping[str, contract.Trace] | None = None, /, *, fvcore: bool = True,
              include_params: bool = True, table: CostTable | None = None, **row_fields: Any) -> list[dict[str, Any]]:
    """Result rows for a model's compute at batch 1 (see the metric names in ``fractalbench.harness.metrics``).

    ``traces``: one Trace (rows get ``policy`` from ``row_fields``) or {policy label: Trace} from
    dynamic inference over a dataset; adds the expected-cost rows. ``table``: a prebuilt cost table.
    """
    table = table or build_cost_table(model, sample_input)
    fields = {**row_fields, "batch_size": 1}
    shape = list(table.input_shape)
    rows: list[dict[str, Any]] = []
    if include_params:
        counts = parameter_counts(model)
        rows.append(_row("params", counts["params"], "count", fields))
        if counts["params_active"] is not None:
            rows.append(_row("params_active", counts["params_active"], "count", fields))
    for k, count in enumerate(table.exit_counts):
        detail = {"input_shape": shape, "path": "forced", "by_operator": count.by_operator,
                  "unsupported_ops": count.unsupported_ops}
        rows.append(_row("macs", count.total, "MACs", fields, exit=k, detail=detail))
        rows.append(_row("flops", count.flops, "FLOPs", fields, exit=k,
                         detail={"input_shape": shape, "definition": "2 x MACs"}))
    for name, macs in table.units.items():
        rows.append(_row("unit_macs", macs, "MACs", fields, detail={
            "cost_unit": name, "baseline": table.baselines[name], "input_shape": shape,
            "unsupported_ops": table.probes[name].unsupported_ops}))
    if fvcore and contract.dynamic_kind(model) == "static":
        rows.append(_fvcore_row(model, sample_input, table.exits[0], fields))
    if traces is not None:
        items = traces.items() if isinstance(traces, Mapping) else [(row_fields.get("policy", ""), traces)]
        for label, trace in items:
            rows.extend(expected_cost_rows(trace, table, label, **fields))
    return rows


def _fvcore_row(model: nn.Module, sample_input: Tensor, harness_macs: float,
                fields: Mapping[str, Any]) -> dict[str, Any]:
    try:
        fv = fvcore_count(model, sample_input.to(model_device(model)))
    except Exception as exc:  # noqa: BLE001 - a failed cross-check is a row with its error
        return _row("macs_fvcore", None, "MACs", fields, exit=0,
                    error=f"fvcore failed: {type(exc).__name__}: {exc}")
    detail = {"fvcore_total": fv.total, "by_operator": fv.by_operator, "skipped_ops": fv.unsupported_ops,
              "uncalled_modules": fv.uncalled_modules[:50], "harness_macs": harness_macs,
              "ratio_to_harness": fv.macs / harness_macs if harness_macs else None,
              "definition": "fvcore's conv/linear/matmul ops (1 flop = 1 fused multiply-add); "
                            "fvcore_total adds norms and pooling"}
    return _row("macs_fvcore", fv.macs, "MACs", fields, exit=0, detail=detail)


def oracle_rows(model: nn.Module, inputs: Tensor, table: CostTable, policy: Any = None, /, *, num_samples: int = 8,
                seed: int = 0, mode: str = "compact", **row_fields: Any) -> list[dict[str, Any]]:
    """One row: the largest |counted - table| MACs over a random subset of samples (0 = exact).
    A disagreement fills ``error``."""
    samples = oracle_check(model, inputs, table, policy, num_samples=num_samples, seed=seed, mode=mode)
    worst = max((abs(float(s.counted) - s.table) for s in samples), default=0.0)
    bad = [s for s in samples if not s.agrees]
    error = ""
    if bad:
        error = "oracle mismatch: " + "; ".join(f"sample {s.index} counted {s.counted} vs table {s.table}"
                                                for s in bad[:5])
    detail = {"mode": mode, "samples": [{"index": s.index, "counted": s.counted, "table": s.table, "exit": s.exit_index}
                                        for s in samples]}
    label = row_fields.pop("policy", "") or (policy.describe() if hasattr(policy, "describe") else "")
    return [_row("macs_oracle_error", worst, "MACs", row_fields, batch_size=1, policy=label, n=len(samples),
                 detail=detail, error=error)]
