"""Targets of the measurement layer, checked on this machine (marked slow; `make bench`), or run
`python benchmarks/test_metrics_targets.py` to print the numbers:

- latency: on a static model (resnet20, batch 1, 1 thread, fresh process) the harness's median is
  within 5% of torch.utils.benchmark.Timer's median for the same call and threads (Timer timing
  single calls; median over 15 interleaved rounds of the per-round ratio, so a noisy neighbour on
  a shared machine hits both sides);
- overhead: the noop model (returns constant logits) costs under 50 microseconds per call;
- memory: the CPU peak activation memory (fresh process, VmHWM) is within 10% of torch's own
  accounting (profiler allocation events) for resnet20 and resnet56 at batch 16 and 64.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fractalbench.harness.metrics import LatencySettings, MemorySettings, latency_rows, memory_rows, overhead_rows  # noqa: E402
from fractalbench.harness.registry import ModelSpec  # noqa: E402

LATENCY_TOLERANCE = 0.05
OVERHEAD_LIMIT_US = 50.0
MEMORY_TOLERANCE = 0.10
MEMORY_CASES = [("resnet20", 16), ("resnet20", 64), ("resnet56", 16), ("resnet56", 64)]


def timer_ratio(model: str = "resnet20", threads: int = 1) -> dict:
    """Harness p50 / Timer median (interleaved rounds, fresh process)."""
    settings = LatencySettings(batch_sizes=(1,), warmup=20, repeats=25, threads=threads, cross_check=True,
                               cross_check_rounds=15)
    rows = latency_rows(ModelSpec(model), None, torch.randn(8, 3, 32, 32), settings, model=model)
    row = next(r for r in rows if r["metric"] == "latency_timer_ratio")
    if row["error"]:
        raise RuntimeError(row["error"])
    detail = json.loads(row["detail"])
    return {"model": model, "threads": threads, "ratio": row["value"], "harness_p50_ms": detail["harness_p50_ms"],
            "timer_median_ms": detail["timer_median_ms"], "ratio_blocked": detail["ratio_blocked"]}


def null_overhead_us() -> dict:
    rows = overhead_rows(LatencySettings(batch_sizes=(1,), warmup=50, repeats=2000, threads=1), (3, 32, 32))
    row = rows[0]
    if row["error"]:
        raise RuntimeError(row["error"])
    return {"p50_us": row["p50"] * 1e3, "mean_us": row["value"] * 1e3, "p99_us": row["p99"] * 1e3, "n": row["n"]}


def memory_ratio(model: str, batch: int) -> dict:
    rows = memory_rows(ModelSpec(model), None, (3, 32, 32), MemorySettings(batch_size=batch, torch_accounting=True),
                       model=model)
    by = {r["metric"]: r for r in rows}
    for r in rows:
        if r["error"]:
            raise RuntimeError(r["error"])
    rss, accounted = by["memory_peak_activations"]["value"], by["memory_peak_torch"]["value"]
    return {"model": model, "batch": batch, "vmhwm_mib": rss, "torch_mib": accounted, "ratio": rss / accounted,
            "weights_mib": by["memory_weights"]["value"]}


@pytest.mark.slow
def test_harness_latency_matches_torch_benchmark_timer():
    result = timer_ratio()
    print(result)
    assert abs(result["ratio"] - 1.0) <= LATENCY_TOLERANCE


@pytest.mark.slow
def test_null_model_overhead_is_small():
    result = null_overhead_us()
    print(result)
    assert result["p50_us"] < OVERHEAD_LIMIT_US


@pytest.mark.slow
@pytest.mark.parametrize("model,batch", MEMORY_CASES)
def test_cpu_peak_memory_matches_torch_accounting(model, batch):
    result = memory_ratio(model, batch)
    print(result)
    assert abs(result["ratio"] - 1.0) <= MEMORY_TOLERANCE


if __name__ == "__main__":
    r = timer_ratio()
    print(f"latency resnet20 b=1 threads=1: harness p50 {r['harness_p50_ms']:.3f} ms, Timer median "
          f"{r['timer_median_ms']:.3f} ms, ratio {r['ratio']:.3f} "
          f"(paired rounds; vs blocked_autorange {r['ratio_blocked']:.3f}; "
          f"target within {LATENCY_TOLERANCE:.0%})")
    o = null_overhead_us()
    print(f"noop (null) model overhead: p50 {o['p50_us']:.1f} us, mean {o['mean_us']:.1f} us, p99 {o['p99_us']:.1f} us "
          f"over {o['n']} calls (target < {OVERHEAD_LIMIT_US:.0f} us)")
    for name, batch in MEMORY_CASES:
        m = memory_ratio(name, batch)
        print(f"memory {name} b={batch}: VmHWM {m['vmhwm_mib']:.2f} MiB, torch {m['torch_mib']:.2f} MiB, "
              f"ratio {m['ratio']:.3f} (target within {MEMORY_TOLERANCE:.0%}); weights {m['weights_mib']:.2f} MiB")
