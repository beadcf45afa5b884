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
  (``python -m harness.metrics._worker``), so allocator and thread-pool state of one measurement
  never leaks into the next. A worker that fails or times out becomes a row with ``error`` set.
- p99 is reported only with at least 100 samples; ``n`` always says how many there were.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from harness import contract
from harness.metrics import check_device, field_row, summarize
from harness.policies import ExitPolicy, make_policy
from harness.registry import ModelSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
NULL_MODEL = "noop"  # baselines/reference.py: does nothing, returns constant logits


class MeasurementError(RuntimeError):
    """A measurement worker that failed, timed out or returned nothing."""


PolicyLike = ExitPolicy | Mapping[str, Any] | None


@dataclass(frozen=True)
class LatencySettings:
    """How to measure latency. The first six fields match ``harness.suites.LatencyConfig``.

    policies: ExitPolicy objects or {"name": ..., "thresholds": [...]} descriptions; ``None`` in
    the list means the model's own default decisions (gated and routed models). Without any,
    dynamic gated/routed models are streamed with ``None`` and early-exit models are not streamed.
    exits: forced exits to time (None = every exit).
    plugins: Python files or module names the worker imports before building the model (models
    registered outside ``baselines/``).
    """

    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 5
    repeats: int = 30
    threads: int = 1
    stream_samples: int = 100
    isolate: bool = True
    device: str = "cpu"
    interop_threads: int = 1
    policies: tuple[PolicyLike, ...] = ()
    modes: tuple[str, ...] = ("compact", "mask")
    per_exit: bool = True
    exits: tuple[int, ...] | None = None
    cross_check: bool = True
    cross_check_rounds: int = 5
    timeout_s: float = 600.0
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def whole(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"latency setting {name!r} must be a whole number >= {low}, got {value!r}")

        if not self.batch_sizes:
            raise ValueError("latency setting 'batch_sizes' needs at least one batch size")
        for b in self.batch_sizes:
            whole("batch_sizes", b, 1)
        whole("warmup", self.warmup, 0)
        whole("repeats", self.repeats, 1)
        whole("threads", self.threads, 1)
        whole("interop_threads", self.interop_threads, 1)
        whole("stream_samples", self.stream_samples, 1)
        whole("cross_check_rounds", self.cross_check_rounds, 1)
        for mode in self.modes:
            contract.check_mode(mode)
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        object.__setattr__(self, "policies", tuple(self.policies))
        object.__setattr__(self, "modes", tuple(self.modes))
        object.__setattr__(self, "plugins", tuple(str(p) for p in self.plugins))
        if self.exits is not None:
            object.__setattr__(self, "exits", tuple(self.exits))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (policies as descriptions) for a worker process."""
        data = asdict(replace(self, policies=()))
        data["policies"] = [policy_description(p) for p in self.policies]
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "LatencySettings":
        data = dict(data)
        for key in ("batch_sizes", "policies", "modes", "plugins"):
            data[key] = tuple(data.get(key) or ())
        if data.get("exits") is not None:
            data["exits"] = tuple(data["exits"])
        return LatencySettings(**data)


def policy_description(policy: PolicyLike) -> dict[str, Any] | None:
    """{"name", "thresholds"} for a policy that ``make_policy`` can rebuild; None stays None."""
    if policy is None:
        return None
    if isinstance(policy, Mapping):
        return {"name": str(policy["name"]), "thresholds": [float(t) for t in policy.get("thresholds", ())]}
    rebuilt = make_policy(policy.name, policy.thresholds) if policy.thresholds else None
    if rebuilt is None or type(rebuilt) is not type(policy):
        raise ValueError(f"policy {policy.describe()!r} ({type(policy).__name__}) cannot be sent to a worker "
                         "process; use isolate=False or a policy from harness.policies.make_policy")
    return {"name": policy.name, "thresholds": list(policy.thresholds)}


def resolve_policy(policy: PolicyLike) -> tuple[str, ExitPolicy | None]:
    """(label, policy object); a description is rebuilt with ``make_policy``; None -> ("default", None)."""
    if policy is None:
        return "default", None
    if isinstance(policy, Mapping):
        policy = make_policy(str(policy["name"]), policy.get("thresholds", ()))
    return policy.describe(), policy


# ----- threads and timing --------------------------------------------------------------------------

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
    exits = list(range(num)) if settings.exits is None else [contract.check_exit_index(model, k) for k in settings.exits]
    policies = [resolve_policy(p) for p in _stream_policies(model, settings)]
    previous = set_threads(settings.threads, settings.interop_threads)
    was_training = model.training
    try:
        model.to(device).eval()
        inputs = inputs.to(device)
        base = {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                "warmup": settings.warmup, "timing": "cuda_events" if device.startswith("cuda") else "perf_counter_ns",
                "isolated": isolated}
        fields = {**row_fields, "device": row_fields.get("device") or device}
        with torch.no_grad():
            return _measure_all(model, inputs, settings, device, exits, policies, base, fields)
    finally:
        model.train(was_training)
        torch.set_num_threads(previous["threads"])


def _stream_policies(model: nn.Module, settings: LatencySettings) -> list[PolicyLike]:
    kind = contract.dynamic_kind(model)
    if kind == "static":
        return []
    if settings.policies:
        return list(settings.policies)
    return [None] if kind in ("gated", "routed") else []


def _latency_row(metric: str, times: Sequence[float], fields: Mapping[str, Any], detail: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    s = summarize(times)
    return field_row(metric, s.mean, "ms", fields, **extra, **s.row_stats(), detail={**detail, "min_ms": s.min, "max_ms": s.max})


def _measure_all(model: nn.Module, inputs: Tensor, settings: LatencySettings, device: str, exits: list[int],
                 policies: list[tuple[str, ExitPolicy | None]], base: dict[str, Any], fields: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    exit_mean_b1: dict[int, float] = {}
    for b in settings.batch_sizes:
        xb = _batch(inputs, b)
        if settings.per_exit:
            for k in exits:
                times = time_calls(lambda i, k=k: contract.forced_forward(model, xb, k), settings.repeats, device, settings.warmup)
                rows.append(_latency_row("latency", times, fields, {**base, "path": "forced"}, batch_size=b, exit=k))
                if b == 1:
                    exit_mean_b1[k] = summarize(times).mean
        if b == 1 and settings.cross_check and contract.dynamic_kind(model) == "static":
            check = timer_cross_check(lambda: model(xb), torch.get_num_threads(), device, settings.repeats,
                                      settings.cross_check_rounds)
            rows.append(field_row("latency_timer_ratio", check["ratio"], "ratio", fields, batch_size=1, exit=0,
                                  n=settings.cross_check_rounds, detail={
                                     **base, **check, "definition": "median over interleaved rounds of harness p50 / "
                                                                    "torch.utils.benchmark.Timer per-call median"}))
        for label, policy in policies:
            if b == 1:
                rows.extend(_stream_rows(model, inputs, settings, device, label, policy, exit_mean_b1, base, fields))
            else:
                rows.extend(_batched_rows(model, inputs, settings, device, b, label, policy, base, fields))
    return rows


def _stream_rows(model: nn.Module, inputs: Tensor, settings: LatencySettings, device: str, label: str,
                 policy: ExitPolicy | None, exit_mean: Mapping[int, float], base: dict[str, Any],
                 fields: dict[str, Any]) -> list[dict[str, Any]]:
    n, total = settings.stream_samples, inputs.shape[0]
    for i in range(settings.warmup):
        contract.dynamic_forward(model, inputs[i % total:i % total + 1], policy, "compact")
    exits: list[Tensor] = []

    def call(i: int) -> None:
        j = i % total
        exits.append(contract.dynamic_forward(model, inputs[j:j + 1], policy, "compact").trace.exit_index)

    times = time_calls(call, n, device)
    num = contract.num_exits(model)
    counts = torch.bincount(torch.cat(exits).cpu().long(), minlength=num).tolist()
    fractions = [c / n for c in counts]
    detail = {**base, "mode": "compact", "path": "policy stream", "exit_fractions": fractions,
              "unique_samples": min(n, total)}
    rows = [_latency_row("latency", times, fields, detail, batch_size=1, policy=label)]
    if num > 1 and all(k in exit_mean for k in range(num)):
        predicted = math.fsum(p * exit_mean[k] for k, p in enumerate(fractions))
        measured = summarize(times).mean
        rows.append(field_row("latency_predicted", predicted, "ms", fields, batch_size=1, policy=label, n=n, detail={
            **base, "definition": "sum_k p_k x t_k (stream exit fractions x forced-path mean latency at batch 1)",
            "exit_fractions": fractions, "exit_latency_ms": [exit_mean[k] for k in range(num)],
            "measured_mean_ms": measured, "measured_over_predicted": measured / predicted if predicted else None}))
    return rows


def _batched_rows(model: nn.Module, inputs: Tensor, settings: LatencySettings, device: str, b: int, label: str,
                  policy: ExitPolicy | None, base: dict[str, Any], fields: dict[str, Any]) -> list[dict[str, Any]]:
    distinct = max(1, math.ceil(inputs.shape[0] / b))
    batches = [_batch(inputs, b, j * b) for j in range(min(distinct, settings.repeats))]
    rows = []
    for mode in settings.modes:
        times = time_calls(lambda i: contract.dynamic_forward(model, batches[i % len(batches)], policy, mode),
                           settings.repeats, device, settings.warmup)
        metric = "latency" if mode == "compact" else "latency_masked"
        s = summarize(times)
        rows.append(_latency_row(metric, times, fields, {**base, "mode": mode, "path": "policy batches",
                                                         "per_sample_ms": s.mean / b, "distinct_batches": len(batches)},
                                 batch_size=b, policy=label))
    return rows


# ----- isolated measurement (worker processes) -------------------------------------------------

def worker_env(threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


# A small process that starts the worker as its own child. Linux carries a process's ru_maxrss
# across exec from the memory image it replaces, and a child forked from this (large) process
# would start with this process's peak; forked from the small launcher, it starts near zero.
_LAUNCHER = ("import subprocess, sys\n"
             "try:\n    sys.exit(subprocess.run(sys.argv[2:], timeout=float(sys.argv[1])).returncode)\n"
             "except subprocess.TimeoutExpired:\n    sys.exit(124)\n")


def run_worker(job: Mapping[str, Any], env: Mapping[str, str], timeout_s: float, tensors: Mapping[str, Tensor] | None = None,
               fresh_maxrss: bool = False) -> list[dict[str, Any]]:
    """Run ``python -m harness.metrics._worker JOB.json`` and return its rows; MeasurementError on failure.

    fresh_maxrss: start the worker through a small launcher so its ru_maxrss does not inherit
    this process's peak (needed by the ru_maxrss memory method)."""
    with tempfile.TemporaryDirectory(prefix="fractalbench-worker-") as tmp:
        tmp_path = Path(tmp)
        job = dict(job, result=str(tmp_path / "result.json"))
        for key, tensor in (tensors or {}).items():
            path = tmp_path / f"{key}.pt"
            torch.save(tensor.detach().cpu().contiguous(), path)
            job[key] = str(path)
        (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
        what = f"{job.get('task', 'measurement')} worker for model {job.get('spec', {}).get('name', '?')!r}"
        command = [sys.executable, "-m", "harness.metrics._worker", str(tmp_path / "job.json")]
        if fresh_maxrss:
            command = [sys.executable, "-c", _LAUNCHER, str(timeout_s)] + command
        try:
            proc = subprocess.run(command, cwd=str(REPO_ROOT), env=dict(env), capture_output=True, text=True,
                                  timeout=timeout_s + (5 if fresh_maxrss else 0))
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"{what} timed out after {timeout_s:g} s") from None
        if fresh_maxrss and proc.returncode == 124:
            raise MeasurementError(f"{what} timed out after {timeout_s:g} s")
        result_path = tmp_path / "result.json"
        if not result_path.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            raise MeasurementError(f"{what} exited with code {proc.returncode} and no result: {' | '.join(tail)}")
        data = json.loads(result_path.read_text(encoding="utf-8"))
    if data.get("status") != "ok":
        raise MeasurementError(f"{what} failed: {data.get('error', 'unknown error')}")
    return list(data["rows"])


def build_model(spec: ModelSpec, checkpoint: Path | str | None) -> nn.Module:
    model = spec.build()
    if checkpoint is not None:
        from harness.checkpoints import load_checkpoint

        load_checkpoint(Path(checkpoint), model)
    return model.eval()


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
            rows.append(field_row("latency", None, "ms", row_fields, batch_size=b, device=row_fields.get("device") or settings.device,
                                  error=str(exc), detail={"isolated": True}))
    return rows


def overhead_rows(settings: LatencySettings, input_shape: Sequence[int] = (3, 32, 32), /, **row_fields: Any) -> list[dict[str, Any]]:
    """The harness's own overhead: the ``noop`` model (does nothing, returns constant logits)
    measured like any model, as metric ``latency_overhead`` (ms per call) at each batch size."""
    inputs = torch.zeros((max(settings.batch_sizes), *input_shape))
    sub = replace(settings, policies=(), cross_check=False, exits=None, per_exit=True)
    fields = {**row_fields, "model": row_fields.get("model") or NULL_MODEL}
    rows = latency_rows(ModelSpec(NULL_MODEL), None, inputs, sub, **fields)
    out = []
    for row in rows:
        if row["metric"] == "latency":
            row = dict(row, metric="latency_overhead")
        out.append(row)
    return out
