"""Latency: per exit (forced prefix), per policy (a real stream at batch 1), batched compact vs mask.

Definitions
-----------
- A timed call is one invocation of the model on an input already on the device (the host to
  device copy is not included). On CPU it is timed with ``time.perf_counter_ns``; on GPU with CUDA
  events recorded around the call and synchronised after it, so the exit decisions (which
  synchronise with the host in compact mode) are inside the timed region. Milliseconds per call.
- Per exit: ``forced_forward(x, k)`` at each batch size, ``warmup`` untimed calls then
  ``repeats`` timed ones on the same input.
- Per policy: ``stream_samples`` test samples, one at a time (batch 1), each timed once with the
  policy deciding (``dynamic_forward(..., mode="compact")``); the stream cycles through the
  inputs when there are fewer. Reported next to the prediction sum_k p_k x t_k, with p_k the
  stream's exit fractions and t_k the mean batch-1 latency of the forced path to exit k.
- Batched dynamic inference (batch sizes > 1): consecutive batches of the inputs, ``mode="compact"``
  (metric ``latency``) and ``mode="mask"`` (metric ``latency_masked``) reported apart.
- Threads: ``torch.set_num_threads(threads)`` and ``set_num_interop_threads`` (and OMP/MKL variables
  in a worker process); the values in effect are recorded in every row's detail.
- Isolation: with ``isolate=True`` each (model, batch size) is measured in a fresh process
  (``python -m fractalbench.harness.metrics._worker``), so allocator and thread-pool state of one measurement
  never leaks into the next. A worker that fails or times out becomes a row with ``error`` set.
- p99 is reported only with at least 100 samples; ``n`` always says how many there were.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fractalbench.harness import contract
from fractalbench.harness.devices import check_device
from fractalbench.harness.metrics.energy import EnergyMeter, energy_detail, energy_meter, idle_watts
from fractalbench.harness.metrics.isolation import MeasurementError, build_model, run_worker, worker_env
from fractalbench.harness.metrics.settings import (
    LatencySettings,
    PolicyLike,
    as_stream_point,
    policy_description,
    resolve_policy,
)
from fractalbench.harness.metrics.statistics import summarize
from fractalbench.harness.metrics.timing import set_threads, time_calls, timer_cross_check
from fractalbench.harness.policies import ExitPolicy
from fractalbench.harness.registry import ModelSpec
from fractalbench.harness.results import field_row

NULL_MODEL = "noop"  # baselines/reference.py: does nothing, returns constant logits


def _batch(inputs: Tensor, size: int, start: int = 0) -> Tensor:
    """``size`` consecutive samples from ``start``, wrapping around (a view when it does not wrap)."""
    n = inputs.shape[0]
    start %= n
    if start + size <= n:
        return inputs[start:start + size]
    idx = (torch.arange(size) + start) % n
    return inputs[idx.to(inputs.device)]


# ----- in-process measurement --------------------------------------------------------------------

def measure_latency(model: nn.Module, inputs: Tensor, settings: LatencySettings, /, *, isolated: bool = False,
                    **row_fields: Any) -> list[dict[str, Any]]:
    """Measure in this process (the worker calls this with ``isolated=True``). ``inputs``: test
    samples [N, ...]. The model is moved to the device and put in eval mode for the measurement."""
    device = check_device(settings.device)
    if not isinstance(inputs, Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
        raise ValueError(f"latency inputs must be a tensor of samples [N, ...] with N >= 1, got "
                         f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}")
    num = contract.num_exits(model)
    exits = (list(range(num)) if settings.exits is None
             else [contract.check_exit_index(model, k) for k in settings.exits])
    policies = [_point_key(p) for p in _stream_policies(model, settings)]
    previous = set_threads(settings.threads, settings.interop_threads)
    was_training = model.training
    try:
        model.to(device).eval()
        inputs = inputs.to(device)
        base = {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                "warmup": settings.warmup, "timing": "cuda_events" if device.startswith("cuda") else "perf_counter_ns",
                "isolated": isolated}
        if contract.batch_dependent(model):
            base["routing"] = ("depends on the batch (the model declares batch_dependent): each call routes among its "
                               "own batch's samples, so batch-1 rows time a sample routed alone and batched rows "
                               "routes shared with that batch; accuracy and MACs were measured at evaluate.batch_size")
        fields = {**row_fields, "device": row_fields.get("device") or device}
        energy, rows = _energy(settings, device, fields)
        with torch.no_grad():
            return _measure_all(model, inputs, settings, device, exits, policies, base, fields, energy) + rows
    finally:
        model.train(was_training)
        torch.set_num_threads(previous["threads"])


def _point_key(policy: PolicyLike) -> tuple[dict[str, Any], ExitPolicy | None]:
    """(row fields of the operating point: policy, threshold and the decider's description in
    ``policy_description``, the decider)."""
    point = as_stream_point(policy)
    label, decider = resolve_policy(point.decider)
    return {"policy": point.policy, "threshold": point.threshold, "policy_description": label}, decider


def _stream_policies(model: nn.Module, settings: LatencySettings) -> list[PolicyLike]:
    kind = contract.dynamic_kind(model)
    if kind == "static":
        return []
    if settings.policies:
        return list(settings.policies)
    return [None] if kind in ("gated", "routed") else []


def _latency_row(metric: str, times: Sequence[float], fields: Mapping[str, Any], detail: Mapping[str, Any],
                 **extra: Any) -> dict[str, Any]:
    s = summarize(times)
    return field_row(metric, s.mean, "ms", fields, **extra, **s.row_stats(),
                     detail={**detail, "min_ms": s.min, "max_ms": s.max})


@dataclass(frozen=True)
class _Energy:
    meter: EnergyMeter
    idle_w: float | None


def _energy(settings: LatencySettings, device: str, fields: dict[str, Any]) -> tuple[_Energy | None, list[dict]]:
    """The energy meter of this measurement and its ``energy_meter`` row (value: domains read; 0 with
    the reason where none can be), or (None, []) when the suite turned energy off."""
    if not settings.energy:
        return None, []
    meter = energy_meter(device)
    if not meter.available:
        return None, [field_row("energy_meter", 0, "count", fields, detail={"source": meter.source,
                                                                             "reason": meter.reason})]
    idle = idle_watts(meter, settings.energy_idle_s)
    return _Energy(meter, idle), [field_row("energy_meter", len(meter.domains), "count", fields, detail={
        "source": meter.source, "domains": list(meter.domains), "idle_w": idle, "idle_s": settings.energy_idle_s})]


def _timed(fn: Any, repeats: int, device: str, warmup: int, energy: _Energy | None
           ) -> tuple[list[float], tuple[list[float], list[float], float] | None]:
    """time_calls, and the energy counters read around exactly the timed calls (after the warm-up)."""
    for i in range(warmup):
        fn(i)
    if energy is None:
        return time_calls(fn, repeats, device), None
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    before, start = energy.meter.read(), time.perf_counter()
    times = time_calls(fn, repeats, device)
    after = energy.meter.read()
    return times, (before, after, time.perf_counter() - start)


def _energy_row(energy: _Energy | None, reads: Any, calls: int, samples: int, fields: Mapping[str, Any],
                detail: Mapping[str, Any], **extra: Any) -> list[dict[str, Any]]:
    if energy is None or reads is None:
        return []
    before, after, seconds = reads
    value, info = energy_detail(energy.meter, before, after, seconds, calls, samples, energy.idle_w)
    return [field_row("energy_per_sample", value, "J", fields, **extra, n=calls, detail={**detail, **info})]


def _measure_all(model: nn.Module, inputs: Tensor, settings: LatencySettings, device: str, exits: list[int],
                 policies: list[tuple[dict[str, Any], ExitPolicy | None]], base: dict[str, Any],
                 fields: dict[str, Any], energy: _Energy | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    exit_mean_b1: dict[int, float] = {}
    for b in settings.batch_sizes:
        xb = _batch(inputs, b)
        if settings.per_exit:
            for k in exits:
                times, reads = _timed(lambda i, k=k, xb=xb: contract.forced_forward(model, xb, k), settings.repeats,
                                      device, settings.warmup, energy)
                rows.append(_latency_row("latency", times, fields, {**base, "path": "forced"}, batch_size=b, exit=k))
                rows += _energy_row(energy, reads, settings.repeats, b, fields, {"path": "forced"}, batch_size=b,
                                    exit=k)
                if b == 1:
                    exit_mean_b1[k] = summarize(times).mean
        if b == 1 and settings.cross_check and contract.dynamic_kind(model) == "static":
            check = timer_cross_check(lambda xb=xb: model(xb), torch.get_num_threads(), device, settings.repeats,
                                      settings.cross_check_rounds)
            rows.append(field_row("latency_timer_ratio", check["ratio"], "ratio", fields, batch_size=1, exit=0,
                                  n=settings.cross_check_rounds, detail={
                                     **base, **check, "definition": "median over interleaved rounds of harness p50 / "
                                                                    "torch.utils.benchmark.Timer per-call median"}))
        for key, policy in policies:
            if b == 1:
                rows.extend(_stream_rows(model, inputs, settings, device, key, policy, exit_mean_b1, base, fields,
                                         energy))
            else:
                rows.extend(_batched_rows(model, inputs, settings, device, b, key, policy, base, fields, energy))
    return rows


def _stream_rows(model: nn.Module, inputs: Tensor, settings: LatencySettings, device: str, key: dict[str, Any],
                 policy: ExitPolicy | None, exit_mean: Mapping[int, float], base: dict[str, Any],
                 fields: dict[str, Any], energy: _Energy | None = None) -> list[dict[str, Any]]:
    n, total = settings.stream_samples, inputs.shape[0]
    for i in range(settings.warmup):
        contract.dynamic_forward(model, inputs[i % total:i % total + 1], policy, "compact")
    exits: list[Tensor] = []

    def call(i: int) -> None:
        j = i % total
        exits.append(contract.dynamic_forward(model, inputs[j:j + 1], policy, "compact").trace.exit_index)

    times, reads = _timed(call, n, device, 0, energy)
    num = contract.num_exits(model)
    counts = torch.bincount(torch.cat(exits).cpu().long(), minlength=num).tolist()
    fractions = [c / n for c in counts]
    point, label = {"policy": key["policy"], "threshold": key["threshold"]}, key["policy_description"]
    detail = {**base, "mode": "compact", "path": "policy stream", "exit_fractions": fractions,
              "unique_samples": min(n, total), "policy_description": label}
    rows = [_latency_row("latency", times, fields, detail, batch_size=1, **point)]
    rows += _energy_row(energy, reads, n, 1, fields, {"path": "policy stream", "exit_fractions": fractions,
                                                      "policy_description": label}, batch_size=1, **point)
    if num > 1 and all(k in exit_mean for k in range(num)):
        predicted = math.fsum(p * exit_mean[k] for k, p in enumerate(fractions))
        measured = summarize(times).mean
        rows.append(field_row("latency_predicted", predicted, "ms", fields, batch_size=1, **point, n=n, detail={
            **base, "policy_description": label,
            "definition": "sum_k p_k x t_k (stream exit fractions x forced-path mean latency at batch 1)",
            "exit_fractions": fractions, "exit_latency_ms": [exit_mean[k] for k in range(num)],
            "measured_mean_ms": measured, "measured_over_predicted": measured / predicted if predicted else None}))
    return rows


def _batched_rows(model: nn.Module, inputs: Tensor, settings: LatencySettings, device: str, b: int, key: dict[str, Any],
                  policy: ExitPolicy | None, base: dict[str, Any], fields: dict[str, Any],
                  energy: _Energy | None = None) -> list[dict[str, Any]]:
    distinct = max(1, math.ceil(inputs.shape[0] / b))
    batches = [_batch(inputs, b, j * b) for j in range(min(distinct, settings.repeats))]
    rows = []
    for mode in settings.modes:
        times, reads = _timed(
            lambda i, mode=mode: contract.dynamic_forward(model, batches[i % len(batches)], policy, mode),
            settings.repeats, device, settings.warmup, energy)
        metric = "latency" if mode == "compact" else "latency_masked"
        s = summarize(times)
        detail = {**base, "mode": mode, "path": "policy batches", "per_sample_ms": s.mean / b,
                  "distinct_batches": len(batches), "policy_description": key["policy_description"]}
        rows.append(_latency_row(metric, times, fields, detail, batch_size=b, policy=key["policy"],
                                 threshold=key["threshold"]))
        if mode == "compact":
            rows += _energy_row(energy, reads, settings.repeats, b, fields, {"path": "policy batches", "mode": mode},
                                batch_size=b, policy=key["policy"], threshold=key["threshold"])
    return rows


# ----- isolated measurement (worker processes) -------------------------------------------------

def latency_rows(spec: ModelSpec, checkpoint: Path | str | None, inputs: Tensor, settings: LatencySettings, /,
                 **row_fields: Any) -> list[dict[str, Any]]:
    """Latency rows of a registered model (weights from ``checkpoint`` when given).

    isolate=True: one fresh process per batch size; a worker failure becomes a row with ``error``.
    isolate=False: measured here (tests; exceptions propagate).
    """
    check_device(settings.device)
    if not settings.isolate:
        return measure_latency(build_model(spec, checkpoint), inputs, settings, **row_fields)
    for policy in settings.policies:
        policy_description(policy)  # fail early, before any process starts
    rows: list[dict[str, Any]] = []
    for b in settings.batch_sizes:
        sub = replace(settings, batch_sizes=(b,))
        job = {"task": "latency", "spec": spec.to_dict(), "checkpoint": None if checkpoint is None else str(checkpoint),
               "settings": sub.to_dict(), "row_fields": row_fields}
        try:
            rows.extend(run_worker(job, worker_env(settings.threads), settings.timeout_s, {"inputs": inputs}))
        except MeasurementError as exc:
            rows.append(field_row("latency", None, "ms", row_fields, batch_size=b,
                                  device=row_fields.get("device") or settings.device,
                                  error=str(exc), detail={"isolated": True}))
    return rows


def overhead_rows(settings: LatencySettings, input_shape: Sequence[int] = (3, 32, 32), /,
                  **row_fields: Any) -> list[dict[str, Any]]:
    """The harness's own overhead: the ``noop`` model (does nothing, returns constant logits)
    measured like any model, as metric ``latency_overhead`` (ms per call) at each batch size."""
    inputs = torch.zeros((max(settings.batch_sizes), *input_shape))
    sub = replace(settings, policies=(), cross_check=False, exits=None, per_exit=True, energy=False)
    fields = {**row_fields, "model": row_fields.get("model") or NULL_MODEL}
    rows = latency_rows(ModelSpec(NULL_MODEL), None, inputs, sub, **fields)
    out = []
    for row in rows:
        if row["metric"] == "latency":
            row = dict(row, metric="latency_overhead")
        out.append(row)
    return out
