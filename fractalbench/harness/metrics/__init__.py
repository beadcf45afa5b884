"""Measurement layer: compute (MACs/FLOPs), latency, memory and per-module profiles.

Everything here returns numbers or result rows (:func:`fractalbench.harness.results.make_row`); nothing prints.
The runner calls the high-level entry points:

- :func:`cost_rows` (``flops.py``): parameters, MACs/FLOPs per forced exit, the cost table, the
  fvcore cross-check (static models) and, given traces, the expected MACs of a dynamic model.
- :func:`oracle_rows` (``flops.py``): per-sample counted MACs at batch 1 vs the cost table.
- :func:`~fractalbench.harness.metrics.exit_stats.exit_stat_rows` (``exit_stats.py``): oracle exit, overthinking
  and per-exit expected calibration error of an early-exit model, from its exit logits.
- :func:`latency_rows` (``latency.py``): per-exit and per-policy latency, each model/setting in its
  own process (``python -m fractalbench.harness.metrics._worker``) unless ``isolate=False``.
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

The package's modules, bottom up: ``statistics`` (sample summaries), ``timing`` (threads, timed
calls, the Timer cross-check), ``settings`` (LatencySettings, MemorySettings), ``isolation``
(worker processes), then ``flops``, ``exit_stats``, ``latency``, ``memory``, ``profile``. Every metric name, unit
and kind is in :mod:`fractalbench.harness.catalogue`.

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
expected_macs_backbone         MACs       mean MACs of the backbone that ran (cost roles)
expected_macs_heads            MACs       mean MACs of the exit heads evaluated (taken or not)
expected_macs_gating           MACs       mean MACs of gates and routers evaluated
macs_avoided_fraction          fraction   1 - expected_macs / MACs of the last forced exit
exit_fraction                  fraction   share of samples leaving at ``exit``
gate_rate                      fraction   share of samples executing gated block
                                          ``detail.gate``
expert_load                    fraction   share of routed tokens of layer ``detail.layer`` sent
                                          to expert ``detail.expert`` (per-sample p50..p99)
expert_macs_useful             MACs       mean MACs of the routed (token, expert) pairs
expert_macs_padded             MACs       the same routes in fixed-capacity expert buffers
expert_utilization             fraction   useful / padded expert MACs (MoE-CAP)
tokens_dropped                 fraction   share of layer ``detail.layer``'s assignments no
                                          expert ran (capacity, threshold)
macs_oracle_error              MACs       max |counted - table| over the oracle samples (0 = ok)
oracle_top1                    %          right at any exit (Kaya et al. 2019), with n and interval
oracle_macs                    MACs       mean MACs when each sample leaves at its first right exit
overthinking                   %          right at an earlier exit, wrong at the last
overthinking_wasteful          %          right at an earlier exit and at the last
ece                            %          expected calibration error of exit ``exit`` (15 bins)
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

from fractalbench.harness.devices import check_device
from fractalbench.harness.metrics.flops import (
    ZERO_MAC_OPS,
    CostTable,
    ExpectedCost,
    FvcoreCount,
    MacCount,
    MacCounter,
    OracleSample,
    build_cost_table,
    cost_rows,
    count_macs,
    expected_cost_rows,
    expected_macs,
    expert_compute_rows,
    fvcore_count,
    oracle_check,
    oracle_rows,
    parameter_counts,
    trace_histograms,
)
from fractalbench.harness.metrics.isolation import MeasurementError
from fractalbench.harness.metrics.latency import latency_rows, measure_latency, overhead_rows
from fractalbench.harness.metrics.memory import MiB, measure_memory, memory_rows, weight_bytes
from fractalbench.harness.metrics.profile import format_profile, profile_model
from fractalbench.harness.metrics.settings import LatencySettings, MemorySettings
from fractalbench.harness.metrics.statistics import MIN_SAMPLES_P99, Summary, percentile, summarize
from fractalbench.harness.metrics.timing import time_calls, timer_cross_check
from fractalbench.harness.results import field_row

__all__ = [
    "MIN_SAMPLES_P99", "MiB", "Summary", "check_device", "field_row", "percentile", "summarize",
    "ZERO_MAC_OPS", "CostTable", "ExpectedCost", "FvcoreCount", "MacCount", "MacCounter", "OracleSample",
    "build_cost_table", "cost_rows", "count_macs", "expected_cost_rows", "expected_macs",
    "expert_compute_rows", "fvcore_count", "oracle_check", "oracle_rows",
    "parameter_counts", "trace_histograms",
    "LatencySettings", "MeasurementError", "latency_rows", "measure_latency", "overhead_rows", "time_calls",
    "timer_cross_check",
    "MemorySettings", "measure_memory", "memory_rows", "weight_bytes",
    "format_profile", "profile_model",
]
