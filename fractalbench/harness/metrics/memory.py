"""Memory: peak activation memory of a forward (and of each forced exit), weights reported apart.

Definitions
-----------
- ``memory_weights``: bytes of parameters and buffers, in MiB (2**20 bytes).
- ``memory_peak_activations``: the peak memory a forward adds above the baseline, in MiB. The
  baseline is the state after the model (weights) and the input are in memory and a warm-up call
  has run (lazy initialisation, thread pools, primitive caches are baseline, not activations).
  - GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
    ``memory_allocated`` before the call; ``memory_peak_reserved`` is the same for the caching
    allocator's reserved memory (after ``empty_cache``).
  - CPU (method ``vmhwm``): in a fresh process whose glibc allocator returns freed memory to the
    system (``MALLOC_MMAP_THRESHOLD_`` = 64 KiB, ``MALLOC_TRIM_THRESHOLD_`` = 0, one arena), the
    resident-set high-water mark ``VmHWM`` from ``/proc/self/status`` after resetting it (writing
    ``5`` to ``/proc/self/clear_refs``) minus ``VmRSS`` just before the call; the median of
    ``repeats`` calls. Allocations under 64 KiB come from the heap and can reuse resident pages,
    so tiny models (batch 1, < 1 MiB of activations) read low.
  - CPU fallback (method ``ru_maxrss``, where ``clear_refs`` cannot be written): ``ru_maxrss``
    after one call minus ``VmRSS`` before it, one fresh process per path. No warm-up is possible,
    so first-call allocations (primitive caches) are included; when ru_maxrss does not rise (the
    process peaked higher earlier) the row carries an error and the bound instead of a value.
- ``memory_peak_torch`` (CPU cross-check): the peak of the running sum of the allocations and frees
  that torch's profiler recorded (``profile_memory=True``) during one call.
"""
from __future__ import annotations

import gc
import os
import resource
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fractalbench.harness import contract
from fractalbench.harness.devices import check_device
from fractalbench.harness.metrics.isolation import MeasurementError, build_model, malloc_trim, run_worker, worker_env
from fractalbench.harness.metrics.settings import MemorySettings
from fractalbench.harness.metrics.timing import set_threads
from fractalbench.harness.registry import ModelSpec
from fractalbench.harness.results import field_row

MiB = float(2**20)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ----- CPU: /proc and the allocator --------------------------------------------------------------

def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM in bytes (Linux)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def can_reset_peak_rss() -> bool:
    """Whether VmHWM can be reset here (checked by permission, without resetting it)."""
    path = "/proc/self/clear_refs"
    return sys.platform.startswith("linux") and os.path.exists(path) and os.access(path, os.W_OK)


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def allocator_env(settings: MemorySettings) -> dict[str, str]:
    """glibc settings so freed activation memory goes back to the system (and RSS comes down)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(settings.mmap_threshold), "MALLOC_TRIM_THRESHOLD_": "0",
            "MALLOC_TOP_PAD_": "0", "MALLOC_ARENA_MAX": "1"}


def cpu_peak_vmhwm(fn: Callable[[], Any], repeats: int = 3, warmup: int = 2) -> dict[str, Any]:
    """Peak RSS above the pre-call RSS over ``repeats`` calls (after ``warmup`` calls), in bytes."""
    for _ in range(warmup):
        fn()
    peaks, bases = [], []
    for _ in range(repeats):
        gc.collect()
        malloc_trim()
        base = _proc_status()["VmRSS"]
        if not reset_peak_rss():
            raise MeasurementError("cannot reset VmHWM (/proc/self/clear_refs is not writable); use method='ru_maxrss'")
        out = fn()
        peak = _proc_status()["VmHWM"]
        del out
        peaks.append(max(0, peak - base))
        bases.append(base)
    return {"bytes": sorted(peaks)[len(peaks) // 2], "samples_bytes": peaks, "baseline_rss_bytes": bases[0],
            "method": "vmhwm"}


def cpu_peak_maxrss(fn: Callable[[], Any]) -> dict[str, Any]:
    """One call (the first in this process, no warm-up): ru_maxrss after it minus VmRSS before it,
    in bytes. ``bytes`` is None when ru_maxrss did not rise (the process's earlier peak hides it)."""
    gc.collect()
    malloc_trim()
    base = _proc_status()["VmRSS"]
    before = _maxrss_bytes()
    out = fn()
    after = _maxrss_bytes()
    del out
    return {"bytes": after - base if after > before else None, "baseline_rss_bytes": base, "method": "ru_maxrss",
            "earlier_peak_above_baseline_bytes": max(0, before - base), "includes_first_call_allocations": True}


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C++ logging on file descriptor 2 (the profiler's kineto backend writes there)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def torch_peak_bytes(fn: Callable[[], Any]) -> dict[str, Any]:
    """torch's own accounting: peak of the running sum of allocator events recorded by the profiler
    during one call of ``fn`` (CPU allocations, kernels' temporaries included)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        stack.extend(node.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return {"bytes": peak, "events": len(events), "method": "torch.profiler allocation events"}


# ----- GPU -------------------------------------------------------------------------------------------

def gpu_peak(fn: Callable[[], Any], device: str, warmup: int = 1) -> dict[str, Any]:
    """Peak allocated and reserved bytes above the baseline after ``reset_peak_memory_stats``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base_alloc, base_reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak_alloc = torch.cuda.max_memory_allocated(device) - base_alloc
    peak_reserved = torch.cuda.max_memory_reserved(device) - base_reserved
    del out
    return {"bytes": peak_alloc, "reserved_bytes": peak_reserved, "baseline_allocated_bytes": base_alloc,
            "baseline_reserved_bytes": base_reserved, "method": "torch.cuda.max_memory_allocated"}


# ----- measurement -----------------------------------------------------------------------------------

def default_paths(model: nn.Module, settings: MemorySettings) -> list[int | None]:
    """None (the forward) and, with ``per_exit`` on a multi-exit model, every forced exit."""
    num = contract.num_exits(model)
    return [None] + (list(range(num)) if settings.per_exit and num > 1 else [])


def _calls(model: nn.Module, x: Tensor, paths: Sequence[int | None]) -> list[tuple[int | None, Callable[[], Any]]]:
    calls: list[tuple[int | None, Callable[[], Any]]] = []
    for k in paths:
        if k is None:
            calls.append((None, lambda: model(x)))
        else:
            contract.check_exit_index(model, k)
            calls.append((k, lambda k=k: contract.forced_forward(model, x, k)))
    return calls


def _resolve_method(settings: MemorySettings) -> str:
    if settings.method != "auto":
        return settings.method
    return "vmhwm" if can_reset_peak_rss() else "ru_maxrss"


def measure_memory(model: nn.Module, input_shape: Sequence[int], settings: MemorySettings, /, *, isolated: bool = False,
                   paths: Sequence[int | None] | None = None, include_weights: bool = True,
                   weights_rss_bytes: int | None = None, **row_fields: Any) -> list[dict[str, Any]]:
    """Measure in this process (the worker calls this with ``isolated=True``).

    input_shape: one sample's shape (C, H, W); the batch is ``settings.batch_size``.
    paths: what to measure: None = ``model(x)``, k = ``forced_forward(x, k)`` (default:
    :func:`default_paths`). The model is moved to the device and put in eval mode.
    """
    device = check_device(settings.device)
    shape = _check_shape(input_shape)
    method = "cuda" if device.startswith("cuda") else _resolve_method(settings)
    previous = set_threads(settings.threads)
    was_training = model.training
    try:
        model.to(device).eval()
        gen = torch.Generator().manual_seed(settings.seed)
        x = torch.randn((settings.batch_size, *shape), generator=gen).to(device)
        fields = {**row_fields, "device": row_fields.get("device") or device, "batch_size": settings.batch_size}
        rows = []
        if include_weights:
            wdetail: dict[str, Any] = {"definition": "parameter + buffer bytes"}
            if weights_rss_bytes is not None:
                wdetail["rss_delta_mib"] = weights_rss_bytes / MiB
            rows.append(field_row("memory_weights", weight_bytes(model) / MiB, "MiB", fields, detail=wdetail))
        base = {"isolated": isolated, "threads": torch.get_num_threads(), "input_shape": [settings.batch_size, *shape]}
        with torch.no_grad():
            for k, fn in _calls(model, x, default_paths(model, settings) if paths is None else paths):
                rows.extend(_path_rows(fn, k, method, device, settings, base, fields))
        return rows
    finally:
        model.train(was_training)
        torch.set_num_threads(previous["threads"])


def _path_rows(fn: Callable[[], Any], k: int | None, method: str, device: str, settings: MemorySettings,
               base: dict[str, Any], fields: dict[str, Any]) -> list[dict[str, Any]]:
    path = {"path": "forward" if k is None else "forced"}
    if method == "cuda":
        m = gpu_peak(fn, device)
        detail = {**base, **path, **{key: v for key, v in m.items() if key not in ("bytes", "reserved_bytes")}}
        return [field_row("memory_peak_activations", m["bytes"] / MiB, "MiB", fields, exit=k, detail=detail),
                field_row("memory_peak_reserved", m["reserved_bytes"] / MiB, "MiB", fields, exit=k, detail=detail)]
    m = cpu_peak_vmhwm(fn, settings.repeats) if method == "vmhwm" else cpu_peak_maxrss(fn)
    detail = {**base, **path, **{key: v for key, v in m.items() if key != "bytes"}}
    if m["bytes"] is None:
        return [field_row("memory_peak_activations", None, "MiB", fields, exit=k, detail=detail,
                         error="ru_maxrss did not rise above the process's earlier peak; the activation peak is "
                               f"at most {m['earlier_peak_above_baseline_bytes'] / MiB:.2f} MiB")]
    rows = [field_row("memory_peak_activations", m["bytes"] / MiB, "MiB", fields, exit=k, detail=detail)]
    if settings.torch_accounting and method == "vmhwm":
        t = torch_peak_bytes(fn)
        rows.append(field_row("memory_peak_torch", t["bytes"] / MiB, "MiB", fields, exit=k, detail={
            **base, **path, "method": t["method"], "events": t["events"],
            "ratio_rss_to_torch": m["bytes"] / t["bytes"] if t["bytes"] else None}))
    return rows


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape is one sample's shape (C, H, W) with positive sizes, got {tuple(input_shape)}")
    return shape


def memory_rows(spec: ModelSpec, checkpoint: Path | str | None, input_shape: Sequence[int], settings: MemorySettings, /,
                **row_fields: Any) -> list[dict[str, Any]]:
    """Memory rows of a registered model at ``settings.batch_size`` (input_shape = (C, H, W)).

    isolate=True: a fresh process with the allocator set to return memory (one per path with the
    ru_maxrss fallback); a worker failure becomes a row with ``error``. isolate=False: measured here.
    """
    device = check_device(settings.device)
    shape = _check_shape(input_shape)
    if not settings.isolate:
        return measure_memory(build_model(spec, checkpoint), shape, settings, **row_fields)
    job = {"task": "memory", "spec": spec.to_dict(), "checkpoint": None if checkpoint is None else str(checkpoint),
           "settings": settings.to_dict(), "input_shape": list(shape), "row_fields": row_fields}
    env = worker_env(settings.threads, allocator_env(settings))
    method = "cuda" if device.startswith("cuda") else _resolve_method(settings)
    job["settings"]["method"] = "auto" if method == "cuda" else method
    if method != "ru_maxrss":
        jobs = [job]
    else:  # ru_maxrss never goes down: one fresh process per path, weights reported once
        paths = default_paths(build_model(spec, None), settings)
        jobs = [dict(job, paths=[p], include_weights=i == 0) for i, p in enumerate(paths)]
    rows: list[dict[str, Any]] = []
    for j in jobs:
        try:
            rows.extend(run_worker(j, env, settings.timeout_s, fresh_maxrss=method == "ru_maxrss"))
        except MeasurementError as exc:
            fields = {**row_fields, "device": row_fields.get("device") or device, "batch_size": settings.batch_size}
            rows.append(field_row("memory_peak_activations", None, "MiB", fields, error=str(exc),
                                  detail={"isolated": True}))
    return rows
