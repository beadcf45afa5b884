"""Timing: thread settings, timed calls (perf_counter_ns on CPU, CUDA events on GPU), and the
cross-check against ``torch.utils.benchmark.Timer``. Milliseconds per call throughout."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from fractalbench.harness.metrics.statistics import summarize


def set_threads(threads: int, interop_threads: int | None = None) -> dict[str, int]:
    """Set intra-op (and, if still possible, inter-op) threads; return the previous values.

    torch allows ``set_num_interop_threads`` only before inter-op work has started; when it is too
    late the current value stays and is what gets recorded.
    """
    previous = {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
    torch.set_num_threads(threads)
    if interop_threads is not None and interop_threads != torch.get_num_interop_threads():
        try:
            torch.set_num_interop_threads(interop_threads)
        except RuntimeError:
            pass
    return previous


def time_calls(fn: Callable[[int], Any], repeats: int, device: str = "cpu", warmup: int = 0) -> list[float]:
    """Milliseconds of each of ``repeats`` calls ``fn(i)`` (i = 0..repeats-1), after ``warmup``
    untimed calls ``fn(i)``. CPU: perf_counter_ns; CUDA: events around each call, synchronised."""
    for i in range(warmup):
        fn(i)
    times: list[float] = []
    if device.startswith("cuda"):
        with torch.cuda.device(torch.device(device)):  # events on the measured device's current stream
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for i in range(repeats):
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                times.append(float(start.elapsed_time(end)))
        return times
    clock = time.perf_counter_ns
    for i in range(repeats):
        t0 = clock()
        fn(i)
        t1 = clock()
        times.append((t1 - t0) / 1e6)
    return times


def timer_cross_check(fn: Callable[[], Any], threads: int, device: str = "cpu", repeats: int = 30,
                      rounds: int = 5, min_run_time: float = 0.1) -> dict[str, Any]:
    """Harness median vs ``torch.utils.benchmark.Timer`` median for the same call and threads.

    Rounds alternate: the harness times ``repeats`` calls, then Timer times ``repeats`` calls one
    per measurement (``timeit(number=1)``: the same estimator, the median of single calls), then a
    Timer ``blocked_autorange``. ``ratio`` = median over rounds of harness p50 / Timer per-call
    median, so a noisy neighbour (which slows whole rounds) affects both sides of each ratio.
    ``ratio_blocked`` compares with blocked_autorange's median of block means instead, which
    reads higher than a median of single calls when the timings are skewed by interference.
    """
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    ours, theirs, blocked = [], [], []
    for _ in range(rounds):
        ours.append(summarize(time_calls(lambda i: fn(), repeats, device, warmup=2)).p50)
        theirs.append(summarize([timer.timeit(number=1).median * 1e3 for _ in range(repeats)]).p50)
        blocked.append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
        torch.set_num_threads(threads)  # Timer restores the previous value; keep ours explicit
    return {"ratio": summarize([a / b for a, b in zip(ours, theirs)]).p50,
            "ratio_blocked": summarize([a / b for a, b in zip(ours, blocked)]).p50,
            "harness_p50_ms": summarize(ours).p50, "timer_median_ms": summarize(theirs).p50,
            "timer_blocked_median_ms": summarize(blocked).p50,
            "rounds_harness_ms": ours, "rounds_timer_ms": theirs, "rounds_timer_blocked_ms": blocked}
