"""Cost against sequence length: MACs, latency and peak memory of a sequence model at several lengths,
its own attention beside full attention of the same size (the curve sparse attention exists for).

A model takes part through the contract's ``at_length`` hook
(:func:`fractalbench.harness.contract.length_variants`): ``model.at_length(n)`` returns the
variants to measure at length ``n`` by name (e.g. ``{"longformer": ..., "full": ...}``: the model's
own configuration at length n and the same configuration with full attention), each freshly built
(costs do not depend on the weights), with ``model.length_input(n)`` the input of one sample.

Per length and variant, batch 1, in this process (eval mode, no autograd):

- ``macs_at_length`` (MACs): the harness's count of one forward (:class:`MacCounter`); detail:
  ``attention_macs``, the MACs of the attention products (``aten.bmm``), which the tests hold
  against the hand formula of :func:`fractalbench.baselines.sparse_attention.attention_macs`.
- ``latency_at_length`` (ms): median over ``rounds x calls`` timed calls after a warm-up, the
  variants interleaved round by round so background load hits them alike; n, p50, p90 filled.
- ``memory_at_length`` (MiB): peak memory of one call, CPU: torch's allocator events
  (:func:`fractalbench.harness.metrics.memory.torch_peak_bytes`, every temporary of the kernels
  included); CUDA: ``max_memory_allocated`` above the allocation before the call.

Every row's detail carries ``length`` and ``attention`` (the variant) and the row's ``policy`` is the
variant, so a run holds one curve per model and variant.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fractalbench.harness.metrics._mac_counter import MacCounter
from fractalbench.harness.metrics.memory import MiB, torch_peak_bytes
from fractalbench.harness.metrics.statistics import summarize
from fractalbench.harness.metrics.timing import set_threads, time_calls
from fractalbench.harness.results import field_row

__all__ = ["LENGTH_METRICS", "length_scaling_rows", "measure_at_lengths"]

LENGTH_METRICS = ("macs_at_length", "latency_at_length", "memory_at_length")


def _peak_bytes(fn: Callable[[], Any], device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return int(torch_peak_bytes(fn)["bytes"])


def measure_at_lengths(variants_at: Callable[[int], Mapping[str, nn.Module]], input_at: Callable[[int], Tensor],
                       lengths: Sequence[int], *, device: str = "cpu", rounds: int = 8, calls: int = 3,
                       warmup: int = 2) -> dict[int, dict[str, dict[str, Any]]]:
    """{length: {variant: {"macs", "attention_macs", "peak_bytes", "times" (ms of every timed call)}}}."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for length in lengths:
        variants = {name: module.to(device).eval() for name, module in variants_at(length).items()}
        x = input_at(length).to(device)
        found: dict[str, dict[str, Any]] = {}
        with torch.no_grad():
            for name, module in variants.items():
                with MacCounter(module) as counter:
                    module(x)
                count = counter.result()
                found[name] = {"macs": count.total, "attention_macs": count.by_operator.get("aten.bmm", 0),
                               "peak_bytes": _peak_bytes(lambda m=module, x=x: m(x), device), "times": []}
            for _ in range(rounds):
                for name, module in variants.items():
                    found[name]["times"] += time_calls(lambda i, m=module, x=x: m(x), calls, device=device,
                                                       warmup=warmup)
        out[length] = found
    return out


def length_scaling_rows(model: nn.Module, lengths: Sequence[int], /, *, threads: int = 1, rounds: int = 8,
                        calls: int = 3, **fields: Any) -> list[dict[str, Any]]:
    """The three rows per length and variant (see the module docstring) of a model with the
    ``at_length`` hook, measured on ``fields["device"]`` (default cpu); [] for other models."""
    from fractalbench.harness import contract

    device = str(fields.get("device") or "cpu")
    if not contract.has_length_variants(model) or not lengths:
        return []
    previous = set_threads(threads) if not device.startswith("cuda") else None
    try:
        found = measure_at_lengths(lambda n: contract.length_variants(model, n),
                                   lambda n: contract.length_input(model, n), lengths, device=device,
                                   rounds=rounds, calls=calls)
    finally:
        if previous is not None:
            torch.set_num_threads(previous["threads"])
    rows: list[dict[str, Any]] = []
    base = {**fields, "batch_size": 1}
    for length, variants in found.items():
        for name, r in variants.items():
            detail = {"length": length, "attention": name}
            point = {**base, "policy": name}
            rows.append(field_row("macs_at_length", r["macs"], "MACs", point,
                                  detail={**detail, "attention_macs": r["attention_macs"]}))
            times = summarize(r["times"])
            rows.append(field_row("latency_at_length", times.p50, "ms", point, n=times.n, std=times.std,
                                  p50=times.p50, p90=times.p90,
                                  detail={**detail, "threads": threads, "mean": times.mean,
                                          "definition": "median of the timed calls, variants interleaved"}))
            rows.append(field_row("memory_at_length", r["peak_bytes"] / MiB, "MiB", point,
                                  detail={**detail, "method": "cuda max_memory_allocated" if device.startswith("cuda")
                                          else "torch allocator events (torch_peak_bytes)"}))
    return rows
