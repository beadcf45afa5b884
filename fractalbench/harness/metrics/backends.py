"""Backends: does a dynamic model's saving survive compilation and export?

The same operating points as the eager latency stream, run through another backend:

- ``eager``: the model's own modules (the reference).
- ``inductor``: ``torch.compile`` (inductor, ``dynamic=True`` so that compaction's varying batch sizes
  reuse one graph) of every graph below.
- ``onnxruntime``: every graph below exported with ``torch.onnx.export`` (the dynamo exporter, or the
  TorchScript exporter for graphs whose ops the dynamo exporter lacks, e.g. adaptive max pooling; a
  dynamic batch axis) and run by an ONNX Runtime ``InferenceSession`` (CPUExecutionProvider; CUDAExecutionProvider
  on a cuda device when installed).

What is a graph, so that the decisions stay honest: an early-exit model built as stages + heads
(:class:`fractalbench.harness.early_exit.EarlyExitNetwork`, one tensor passed between stages) is split
into one graph per stage and one per head, and the exit decision runs in Python between the graphs
(``export: per stage``), exactly as the eager compact path: samples that leave are not computed further.
A static model is one graph (``export: whole``). Any other model (gated, routed, multi-scale features)
is not exported, and says so in one ``backend_unsupported`` row with the reason, never a whole-graph
export that would compute every branch.

Rows, per backend (``detail.backend``): ``latency_backend`` (ms per call: each forced exit at batch 1
and each operating point as a stream of single samples, like ``latency``) and
``backend_outcome_mismatches`` per operating point: test samples whose backend prediction differs
from eager's, with the near-ties (top-2 logit gap of eager below ``1e-3``) counted apart in detail
(``near_ties``), and how many left at a different exit. Each backend's latency saving against its
MACs saving is in the report (1 - point / last exit, for latency and for the expected MACs).
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fractalbench.harness import contract
from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.metrics.statistics import summarize
from fractalbench.harness.metrics.timing import set_threads, time_calls
from fractalbench.harness.policies import ExitPolicy, default_policy
from fractalbench.harness.results import field_row

__all__ = ["BACKENDS", "BackendRunner", "backend_rows", "unsupported_reason"]

BACKENDS = ("eager", "inductor", "onnxruntime")
NEAR_TIE = 1e-3


def unsupported_reason(model: nn.Module, example: Tensor) -> str | None:
    """Why ``model`` cannot be run through a backend without computing what its decisions skip (None: it can)."""
    kind = contract.dynamic_kind(model)
    if kind == "static":
        return None
    if not isinstance(model, EarlyExitNetwork):
        return (f"a {kind} model's decisions live inside its forward; exporting it whole would compute every "
                "branch, so it is not exported (per-block graphs with the decisions between them: not built yet)")
    with torch.no_grad():
        h = example[:1]
        for stage in model.stages:
            h = stage(h)
            if not isinstance(h, Tensor):
                return "its stages pass several tensors (multi-scale features); per-stage export takes one tensor"
    return None


def _compile(module: nn.Module, backend: str, example: Tensor) -> Callable[[Tensor], Tensor]:
    if backend == "eager":
        return module
    if backend == "inductor":
        _allow_recompiles()
        return torch.compile(module, backend="inductor", dynamic=True)
    if backend == "onnxruntime":
        return _onnx_session(module, example)
    raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")


def _allow_recompiles(limit: int = 512) -> None:
    """Dynamo caches compiled graphs per code object: every stage of a ResNet shares BasicBlock.forward, and
    batch 1 is specialised apart from the dynamic batch, so the default limit (8) would silently send the
    later stages back to eager. Raised so that every stage stays compiled."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), limit))


def _onnx_session(module: nn.Module, example: Tensor) -> Callable[[Tensor], Tensor]:
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
        buffer = io.BytesIO(program.model_proto.SerializeToString())
    except Exception:  # the dynamo exporter lacks some ops (adaptive max pooling): the TorchScript exporter has them
        buffer = io.BytesIO()
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=providers)
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return run


class BackendRunner:
    """An early-exit model (or a static one, as a single stage) run graph by graph through ``backend``,
    the exit decisions between graphs as in :meth:`EarlyExitNetwork.dynamic_forward` (compact)."""

    def __init__(self, model: nn.Module, backend: str, example: Tensor) -> None:
        self.backend, self.model = backend, model.eval()
        if isinstance(model, EarlyExitNetwork):
            stages, heads = list(model.stages), list(model.heads)
        else:
            stages, heads = [model], [nn.Identity()]
        self.export = "per stage" if isinstance(model, EarlyExitNetwork) else "whole"
        self.stages, self.heads = [], []
        h = example[:2] if example.shape[0] > 1 else torch.cat([example, example])  # batch 2: a dynamic batch axis
        with torch.no_grad():
            for stage, head in zip(stages, heads):
                self.stages.append(_compile(stage, backend, h))
                h = stage(h)
                self.heads.append(_compile(head, backend, h) if not isinstance(head, nn.Identity) else head)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forced(self, x: Tensor, exit_index: int) -> Tensor:
        h = x
        for k in range(exit_index + 1):
            h = self.stages[k](h)
        return self.heads[exit_index](h)

    def dynamic(self, x: Tensor, policy: ExitPolicy | None) -> tuple[Tensor, Tensor]:
        """(logits, exit index) per sample; leaving samples are not computed further."""
        policy = policy or default_policy()
        n, last = x.shape[0], self.num_exits - 1
        index = torch.arange(n)
        exit_index = torch.full((n,), last, dtype=torch.long)
        state = policy.init_state(n, x.device)
        out: Tensor | None = None
        h = x
        for k in range(self.num_exits):
            h = self.stages[k](h)
            logits = self.heads[k](h)
            if out is None:
                out = logits.new_empty((n, logits.shape[-1]))
            if k == last:
                out[index] = logits
                break
            leave, state = policy.decide(k, logits, state)
            leave = leave.cpu()
            if leave.any():
                out[index[leave]] = logits[leave.to(logits.device)]
                exit_index[index[leave]] = k
                stay = ~leave
                if not stay.any():
                    break
                h, index = h[stay.to(h.device)], index[stay]
                state = {name: v[stay.to(v.device)] for name, v in state.items()}
        return out, exit_index


def backend_rows(model: nn.Module, inputs: Tensor, points: Sequence[tuple[dict[str, Any], Any]],
                 backends: Sequence[str], /, *, repeats: int = 20, warmup: int = 3, stream_samples: int = 100,
                 threads: int = 1, outcome_inputs: Tensor | None = None, **fields: Any) -> list[dict[str, Any]]:
    """The rows of the module docstring for ``backends`` (eager is always measured as the reference).
    ``points``: (key with policy/threshold, decider). ``outcome_inputs``: the samples whose predictions
    are compared with eager's (default ``inputs``)."""
    model = model.eval()
    why = unsupported_reason(model, inputs)
    if why:
        return [field_row("backend_unsupported", 1, "count", fields, detail={"backends": list(backends),
                                                                            "reason": why})]
    previous = set_threads(threads)
    rows: list[dict[str, Any]] = []
    outcome_inputs = inputs if outcome_inputs is None else outcome_inputs
    try:
        with torch.no_grad():
            eager = BackendRunner(model, "eager", inputs)
            reference = {i: _chunked(eager, outcome_inputs, decider) for i, (_, decider) in enumerate(points)}
            for backend in dict.fromkeys(["eager", *backends]):
                try:
                    runner = eager if backend == "eager" else BackendRunner(model, backend, inputs)
                except Exception as exc:  # an exporter or compiler that fails is a row, not a failed cell
                    rows.append(field_row("backend_unsupported", 1, "count", fields, detail={
                        "backends": [backend], "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}))
                    continue
                base = {"backend": backend, "export": runner.export, "threads": torch.get_num_threads()}
                for k in range(runner.num_exits):
                    x1 = inputs[:1]
                    times = time_calls(lambda i, k=k, r=runner, x=x1: r.forced(x, k), repeats, warmup=warmup)
                    rows.append(_timing_row(times, fields, {**base, "path": "forced"}, exit=k, batch_size=1))
                for i, (key, decider) in enumerate(points):
                    point = {"policy": key["policy"], "threshold": key["threshold"]}
                    total = inputs.shape[0]
                    for j in range(warmup):
                        runner.dynamic(inputs[j % total:j % total + 1], decider)
                    times = time_calls(lambda j, d=decider, r=runner, t=total: r.dynamic(inputs[j % t:j % t + 1], d),
                                       stream_samples)
                    rows.append(_timing_row(times, fields, {**base, "path": "policy stream"}, batch_size=1, **point))
                    rows.append(_mismatch_row(runner, decider, outcome_inputs, reference[i], fields, base, point))
    finally:
        torch.set_num_threads(previous["threads"])
    return rows


def _chunked(runner: BackendRunner, inputs: Tensor, decider: Any, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """runner.dynamic over ``inputs`` in batches of ``chunk`` (logits and exits on the CPU)."""
    parts = [runner.dynamic(inputs[i:i + chunk], decider) for i in range(0, inputs.shape[0], chunk)]
    return torch.cat([p[0].cpu() for p in parts]), torch.cat([p[1].cpu() for p in parts])


def _timing_row(times: Sequence[float], fields: dict[str, Any], detail: dict[str, Any], **extra: Any
                ) -> dict[str, Any]:
    s = summarize(times)
    return field_row("latency_backend", s.mean, "ms", fields, **extra, **s.row_stats(),
                     detail={**detail, "min_ms": s.min, "max_ms": s.max})


def _mismatch_row(runner: BackendRunner, decider: Any, inputs: Tensor, reference: tuple[Tensor, Tensor],
                  fields: dict[str, Any], base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    logits, exits = _chunked(runner, inputs, decider)
    ref_logits, ref_exits = reference
    differ = logits.argmax(-1).cpu() != ref_logits.argmax(-1).cpu()
    top2 = ref_logits.float().topk(2, -1).values
    near = (top2[:, 0] - top2[:, 1]).cpu() < NEAR_TIE
    return field_row("backend_outcome_mismatches", int((differ & ~near).sum()), "count", fields, **point,
                     n=len(differ), detail={**base, "near_ties": int((differ & near).sum()),
                                            "exit_mismatches": int((exits.cpu() != ref_exits.cpu()).sum()),
                                            "max_abs_logit_diff": float((logits.float().cpu() - ref_logits.float()
                                                                         .cpu()).abs().max()),
                                            "definition": "test samples whose prediction differs from eager's, "
                                                          "near-ties (eager's top-2 gap < 1e-3) apart"})


def saving(value: float, full: float) -> float:
    """1 - value / full (nan when full is 0)."""
    return 1.0 - value / full if full else math.nan
