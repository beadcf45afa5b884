"""Measurement layer: compute (MACs/FLOPs), latency, memory and per-module profiles.

Everything here returns numbers or result rows (:func:`harness.results.make_row`); nothing prints.
The runner calls the high-level entry points:

- :func:`cost_rows` (``flops.py``): parameters, MACs/FLOPs per forced exit, the cost table, the
  fvcore cross-check (static models) and, given traces, the expected MACs of a dynamic model.
- :func:`oracle_rows` (``flops.py``): per-sample counted MACs at batch 1 vs the cost table.
- :func:`latency_rows` (``latency.py``): per-exit and per-policy latency, each model/setting in its
  own process (``python -m harness.metrics._worker``) unless ``isolate=False``.
- :func:`memory_rows` (``memory.py``): peak activation memory (CPU: fresh process, VmHWM; GPU:
  ``max_memory_allocated``) with the weights reported apart.
- :func:`profile_model` / :func:`format_profile` (``profile.py``): the ``fractalbench profile`` table.

Units and definitions
---------------------
- MAC: one multiply-accumulate. Counted at the dispatcher by ``torch.utils.flop_counter``
  (convolutions, matrix products, attention; plus ``mv``/``dot``/``addmv``/``addbmm``, which
  torch's registry lacks), on the ops that actually ran. FLOPs = 2 x MACs. Normalisation,
  pooling, element-wise ops and activations count 0 (as in the ResNet/SkipNet/MSDNet papers and
  fvcore's conv+linear numbers); every other op no formula covers is listed as unsupported.
- Latency: milliseconds per call (a call is one batch), ``time.perf_counter_ns`` on CPU, CUDA
  events around the call (exit decisions included) on GPU. p50/p90/p99 are linear-interpolated
  percentiles; p99 is only reported with at least ``MIN_SAMPLES_P99`` (100) samples.
- Memory: MiB = 2**20 bytes. Activation memory is the peak above the baseline (weights, input,
  allocator state after a warm-up).

Metric names in result rows (``metric`` / ``unit``)
---------------------------------------------------
=============================  =========  ======================================================
metric                         unit       value
=============================  =========  ======================================================
params                         count      parameters (shared ones counted once)
params_active                  count      parameters one sample uses (routed models with
                                          ``active_parameters()``)
macs                           MACs       per image, forced path to exit ``exit`` (batch 1)
flops                          FLOPs      2 x macs
unit_macs                      MACs       one execution of a cost unit (``detail.cost_unit``)
macs_fvcore                    MACs       fvcore's count of the same MAC ops (static models);
                                          ``detail``: fvcore total incl. norms, skipped ops
expected_macs                  MACs       mean over samples of executed MACs (n, std, p50..p99)
expected_flops                 FLOPs      2 x expected_macs
exit_fraction                  fraction   share of samples leaving at ``exit``
gate_rate                      fraction   share of samples executing gated block
                                          ``detail.gate``
expert_load                    fraction   share of routed tokens of layer ``detail.layer`` sent
                                          to expert ``detail.expert``
macs_oracle_error              MACs       max |counted - table| over the oracle samples (0 = ok)
latency                        ms         per call: forced path (``exit`` set, ``policy`` empty)
                                          or a policy (compact inference); value = mean,
                                          p50/p90/p99/n/std filled
latency_masked                 ms         as latency, ``mode="mask"`` (compute all, select)
latency_predicted              ms         sum_k p_k x t_k (exit fractions x per-exit latency)
latency_timer_ratio            ratio      harness p50 / torch.utils.benchmark.Timer per-call
                                          median, median over interleaved rounds (static models)
latency_overhead               ms         the ``noop`` model's latency: the harness's own cost
memory_weights                 MiB        parameter + buffer bytes
memory_peak_activations        MiB        peak above the baseline (CPU: VmHWM; GPU: allocated)
memory_peak_reserved           MiB        GPU only: peak reserved by the caching allocator
memory_peak_torch              MiB        CPU: torch profiler's allocation timeline peak
                                          (cross-check of memory_peak_activations)
=============================  =========  ======================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from harness.suites import DEVICE_HELP, check_device  # one device check for suites and measurements

MIN_SAMPLES_P99 = 100
MiB = float(2**20)


@dataclass(frozen=True)
class Summary:
    """Sample statistics. std is the sample standard deviation (n - 1); p99 is None below 100 samples."""

    n: int
    mean: float
    std: float
    p50: float
    p90: float
    p99: float | None
    min: float
    max: float

    def row_stats(self) -> dict[str, float | int | None]:
        """The statistics fields of a result row (value = mean)."""
        return {"n": self.n, "std": self.std, "p50": self.p50, "p90": self.p90, "p99": self.p99}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values; q in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def summarize(values: Sequence[float]) -> Summary:
    """Summary statistics of a non-empty sequence of numbers."""
    vals = sorted(float(v) for v in values)
    n = len(vals)
    if n == 0:
        raise ValueError("cannot summarize an empty sample")
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return Summary(n, mean, std, percentile(vals, 50), percentile(vals, 90),
                   percentile(vals, 99) if n >= MIN_SAMPLES_P99 else None, vals[0], vals[-1])


def field_row(metric: str, value: float | None, unit: str, fields: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """``harness.results.make_row`` where the measurement's own fields (``extra``) take precedence
    over the caller's ``fields`` (so a caller passing e.g. ``exit`` never collides)."""
    from harness.results import make_row

    return make_row(metric, value, unit, **{**fields, **extra})


# Public API (imported last: the submodules use the helpers above).
from harness.metrics.flops import (  # noqa: E402
    ZERO_MAC_OPS, CostTable, ExpectedCost, FvcoreCount, MacCount, MacCounter, OracleSample,
    build_cost_table, cost_rows, count_macs, expected_macs, fvcore_count, oracle_check, oracle_rows,
    parameter_counts, trace_histograms,
)
from harness.metrics.latency import (  # noqa: E402
    LatencySettings, MeasurementError, latency_rows, measure_latency, overhead_rows, time_calls,
    timer_cross_check,
)
from harness.metrics.memory import MemorySettings, measure_memory, memory_rows, weight_bytes  # noqa: E402
from harness.metrics.profile import format_profile, profile_model  # noqa: E402

__all__ = [
    "MIN_SAMPLES_P99", "MiB", "Summary", "check_device", "field_row", "percentile", "summarize",
    "ZERO_MAC_OPS", "CostTable", "ExpectedCost", "FvcoreCount", "MacCount", "MacCounter", "OracleSample",
    "build_cost_table", "cost_rows", "count_macs", "expected_macs", "fvcore_count", "oracle_check", "oracle_rows",
    "parameter_counts", "trace_histograms",
    "LatencySettings", "MeasurementError", "latency_rows", "measure_latency", "overhead_rows", "time_calls",
    "timer_cross_check",
    "MemorySettings", "measure_memory", "memory_rows", "weight_bytes",
    "format_profile", "profile_model",
]
