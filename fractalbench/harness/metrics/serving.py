"""Serving under load: a dynamic-batching server in front of a dynamic model, driven by MLPerf LoadGen.

The server (:class:`BatchingServer`)
------------------------------------
Requests (one test sample each) arrive on LoadGen's issue thread and queue; one server thread runs
the model. Two ways of batching, chosen by the model:

- Staged (early-exit models built as stages + heads, :class:`fractalbench.harness.early_exit.EarlyExitNetwork`):
  iteration-level batching. Samples in flight wait at a stage; each server step runs one stage (its
  stage and head, then the policy's decision) on every sample waiting there (at most ``max_batch``),
  answers the samples that leave at once (compaction: they leave the batch) and moves the others
  on. New requests join at stage 0, and samples that reached a stage at different times merge into
  one batch there. Deeper stages go first (in-flight work finishes before new work starts); stage
  0 waits for ``max_batch`` requests or ``max_wait_ms`` after its oldest request, unless samples are
  in flight elsewhere (then it runs with what it has when its turn comes).
- Batch-level (every other model: gated, routed, static): a batch of up to ``max_batch`` requests,
  formed by the same wait rule, runs ``dynamic_forward(batch, policy, "compact")`` (the model's own
  compaction inside) and every sample of it is answered when the batch ends.

The server keeps each sample's served prediction; ``serving_outcome_mismatches`` counts those that
differ from the model's own batch-1 prediction of the same sample: 0 for every model whose decisions
do not depend on the batch (expert choice over the batch declares that it does).

The scenarios (LoadGen's own rules and logs)
--------------------------------------------
- Server: LoadGen issues queries at Poisson arrival times at ``rate`` per second, for at least
  ``min_queries`` queries and ``min_duration_s``; latency is from LoadGen's issue to the server's
  answer. A rate passes when LoadGen's p99 latency is at most ``bound_ms``
  (``server_target_latency_ns``, its percentile 99) and LoadGen's early-stopping check holds.
- SingleStream: the next query is issued when the previous one is answered (LoadGen's
  SingleStream); its p50/p90 latency.
- The highest passing rate: the given ``rates`` in order, then (``search_steps``) bisection between
  the last passing and the first failing rate.

Rows (per operating point): ``serving_latency`` (ms; value p99, p50/p90/p99 filled; detail: the
offered rate, LoadGen's completed rate, its validity flags, the server's batch sizes per stage),
``serving_throughput`` (samples/s completed, per rate), ``serving_max_rate`` (samples/s: the highest
passing offered rate, 0 when none passed; detail every rate tried), ``serving_single_stream`` (ms,
p90 as value) and ``serving_outcome_mismatches`` (count).
"""
from __future__ import annotations

import math
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fractalbench.harness import contract
from fractalbench.harness.early_exit import EarlyExitNetwork, select_rows
from fractalbench.harness.results import field_row

__all__ = ["BatchingServer", "ServingSettings", "loadgen_run", "serving_rows"]


@dataclass(frozen=True)
class ServingSettings:
    """How the serving scenario runs (a suite's ``serving:`` section)."""

    rates: tuple[float, ...] = (50.0, 100.0, 200.0, 400.0)
    bound_ms: float = 50.0
    max_batch: int = 16
    max_wait_ms: float = 2.0
    min_queries: int = 600
    min_duration_s: float = 2.0
    max_duration_s: float = 20.0
    search_steps: int = 2
    single_stream_queries: int = 200
    threads: int = 1
    max_points: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rates or any(r <= 0 for r in self.rates):
            raise ValueError(f"serving rates must be positive samples/s, got {self.rates}")
        for name in ("max_batch", "min_queries", "single_stream_queries", "threads", "max_points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"serving setting {name!r} must be >= 1, got {getattr(self, name)}")
        if self.bound_ms <= 0 or self.max_wait_ms < 0 or self.min_duration_s <= 0:
            raise ValueError("serving bound_ms and min_duration_s must be positive and max_wait_ms >= 0")
        if self.max_duration_s < self.min_duration_s:
            raise ValueError(f"serving max_duration_s ({self.max_duration_s}) is below min_duration_s "
                             f"({self.min_duration_s})")


# ----- the server ------------------------------------------------------------------------------------

def _cat_rows(parts: Sequence[Any]) -> Any:
    if isinstance(parts[0], Tensor):
        return torch.cat(list(parts))
    return type(parts[0])(_cat_rows([p[i] for p in parts]) for i in range(len(parts[0])))


@dataclass
class _Group:
    """Samples waiting at one stage: their request ids, features and policy state."""

    ids: list[int]
    features: Any
    state: dict[str, Tensor]


@dataclass
class _Request:
    id: int
    index: int
    arrived: float


@dataclass
class ServerStats:
    """What the server did: per stage, the batch sizes it ran; the predictions it answered."""

    batches: dict[int, list[int]] = field(default_factory=dict)
    predictions: dict[int, int] = field(default_factory=dict)  # sample index -> predicted class (last answer)

    def record(self, stage: int, size: int) -> None:
        self.batches.setdefault(stage, []).append(size)

    def summary(self) -> dict[str, Any]:
        return {str(k): {"steps": len(v), "mean_batch": sum(v) / len(v), "max_batch": max(v)}
                for k, v in sorted(self.batches.items())}


class BatchingServer:
    """A dynamic-batching server over ``model`` deciding with ``policy`` on the samples ``inputs``
    (see the module docstring). ``respond(ids)`` is called with the request ids answered at each
    step (LoadGen's QuerySamplesComplete in a run; a list in tests). ``staged=None``: staged exactly
    for early-exit models built as stages + heads."""

    def __init__(self, model: nn.Module, policy: Any, inputs: Tensor, respond: Callable[[list[int]], None], *,
                 max_batch: int = 16, max_wait_ms: float = 2.0, staged: bool | None = None) -> None:
        self.model, self.policy, self.inputs, self.respond = model, policy, inputs, respond
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1e3
        self.staged = isinstance(model, EarlyExitNetwork) if staged is None else staged
        if self.staged and not isinstance(model, EarlyExitNetwork):
            raise TypeError(f"{type(model).__name__} is not built as stages + heads; it cannot be served staged")
        self.incoming: queue.Queue[_Request | None] = queue.Queue()
        self.waiting: list[_Request] = []
        self.stages: dict[int, list[_Group]] = {}
        self.stats = ServerStats()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._indices: dict[int, int] = {}  # request id -> sample index, of staged samples in flight
        self.error: BaseException | None = None

    # requests
    def submit(self, request_id: int, index: int) -> None:
        self.incoming.put(_Request(request_id, index, time.perf_counter()))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fractalbench-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.incoming.put(None)
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the serving thread failed: {self.error!r}") from self.error

    # the loop
    def _drain(self, block_until: float | None) -> None:
        """Move arrived requests to ``waiting``; wait for one until ``block_until`` (None: no wait)."""
        timeout = 0.0 if block_until is None else max(0.0, block_until - time.perf_counter())
        try:
            item = self.incoming.get(timeout=timeout) if timeout > 0 else self.incoming.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self.waiting.append(item)
            try:
                item = self.incoming.get_nowait()
            except queue.Empty:
                return

    def _in_flight(self) -> bool:
        return any(self.stages.get(k) for k in self.stages)

    def _loop(self) -> None:
        try:
            with torch.no_grad():
                while not self._stop.is_set() or self.waiting or self._in_flight() or not self.incoming.empty():
                    self._step()
        except BaseException as exc:  # kept and raised by stop(); LoadGen would otherwise wait forever
            self.error = exc

    def _step(self) -> None:
        deepest = max((k for k, groups in self.stages.items() if groups), default=None)
        if deepest is not None:
            self._drain(None)
            self._run_stage(deepest)
            return
        if not self.waiting:
            self._drain(time.perf_counter() + 0.05)  # idle: wait for a request (or stop)
            if not self.waiting:
                return
        deadline = self.waiting[0].arrived + self.max_wait
        while len(self.waiting) < self.max_batch and time.perf_counter() < deadline:
            self._drain(deadline)
        batch, self.waiting = self.waiting[:self.max_batch], self.waiting[self.max_batch:]
        x = self.inputs[torch.tensor([r.index for r in batch])]
        ids = [r.id for r in batch]
        if self.staged:
            self._indices.update({r.id: r.index for r in batch})
            self.stages.setdefault(0, []).append(_Group(ids, x, self.policy_state(len(ids), x.device)))
            self._run_stage(0)
            return
        out = contract.dynamic_forward(self.model, x, self.policy, "compact")
        self.stats.record(0, len(ids))
        for r, p in zip(batch, out.logits.argmax(-1).tolist()):
            self.stats.predictions[r.index] = p
        self.respond(ids)

    def policy_state(self, n: int, device: torch.device) -> dict[str, Tensor]:
        from fractalbench.harness.policies import default_policy

        return (self.policy or default_policy()).init_state(n, device)

    def _run_stage(self, k: int) -> None:
        from fractalbench.harness.policies import default_policy

        groups = self.stages.pop(k)
        take, size = [], 0
        while groups and (not take or size + len(groups[0].ids) <= self.max_batch):
            take.append(groups.pop(0))
            size += len(take[-1].ids)
        if groups:
            self.stages[k] = groups
        ids = [i for g in take for i in g.ids]
        h = _cat_rows([g.features for g in take])
        state = {name: torch.cat([g.state[name] for g in take]) for name in take[0].state}
        model, last = self.model, self.model.num_exits - 1
        h = model.stages[k](h)
        logits = model.heads[k](h)
        self.stats.record(k, len(ids))
        if k == last:
            leave = torch.ones(len(ids), dtype=torch.bool)
        else:
            leave, state = (self.policy or default_policy()).decide(k, logits, state)
            leave = leave.cpu()
        predicted = logits.argmax(-1).tolist()
        done = [i for i, gone in zip(ids, leave.tolist()) if gone]
        for i, p, gone in zip(ids, predicted, leave.tolist()):
            if gone:
                self.stats.predictions[self._indices.pop(i)] = p
        if done:
            self.respond(done)
        stay = ~leave
        if bool(stay.any()):
            keep = stay.to(logits.device)
            self.stages.setdefault(k + 1, []).append(_Group(
                [i for i, s in zip(ids, stay.tolist()) if s], select_rows(h, keep),
                {name: v[keep] for name, v in state.items()}))


# ----- LoadGen --------------------------------------------------------------------------------------

_FIELDS = {
    "completed": r"Completed samples per second\s*:\s*([\d.]+)",
    "scheduled": r"Scheduled samples per second\s*:\s*([\d.]+)",
    "result": r"Result is\s*:\s*(\w+)",
    "constraints": r"Performance constraints satisfied\s*:\s*(\w+)",
    "early_stopping": r"Early stopping satisfied\s*:\s*(\w+)",
    "p50": r"50\.00 percentile latency \(ns\)\s*:\s*(\d+)",
    "p90": r"90\.00 percentile latency \(ns\)\s*:\s*(\d+)",
    "p99": r"99\.00 percentile latency \(ns\)\s*:\s*(\d+)",
    "mean": r"Mean latency \(ns\)\s*:\s*(\d+)",
    "max": r"Max latency \(ns\)\s*:\s*(\d+)",
    "queries": r"Processed (\d+) queries",
}


def parse_summary(text: str) -> dict[str, Any]:
    """LoadGen's mlperf_log_summary.txt as numbers: rates per second, latencies in ms, flags as bools."""
    out: dict[str, Any] = {}
    for key, pattern in _FIELDS.items():
        m = re.search(pattern, text)
        if not m:
            continue
        value = m.group(1)
        if key in ("p50", "p90", "p99", "mean", "max"):
            out[f"{key}_ms"] = int(value) / 1e6
        elif key in ("completed", "scheduled"):
            out[key] = float(value)
        elif key == "queries":
            out[key] = int(value)
        else:
            out[key] = value.upper() in ("YES", "VALID") if key != "result" else value.upper()
    return out


def loadgen_run(server_factory: Callable[[Callable[[list[int]], None]], BatchingServer], num_samples: int,
                scenario: str, settings: ServingSettings, rate: float | None = None) -> tuple[dict[str, Any], Any]:
    """One LoadGen test (scenario ``server`` at ``rate`` samples/s, or ``single_stream``) against a
    server made by ``server_factory(respond)``; returns LoadGen's parsed summary and the server's stats."""
    import mlperf_loadgen as lg

    def respond(ids: list[int]) -> None:
        lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids])

    server = server_factory(respond)

    def issue(samples: Any) -> None:
        for s in samples:
            server.submit(s.id, s.index)

    sut = lg.ConstructSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(num_samples, num_samples, lambda idx: None, lambda idx: None)
    test = lg.TestSettings()
    test.mode = lg.TestMode.PerformanceOnly
    test.min_duration_ms = int(settings.min_duration_s * 1000)
    test.max_duration_ms = int(settings.max_duration_s * 1000)
    test.sample_index_rng_seed = test.schedule_rng_seed = test.qsl_rng_seed = settings.seed
    if scenario == "server":
        test.scenario = lg.TestScenario.Server
        test.server_target_qps = float(rate)
        test.server_target_latency_ns = int(settings.bound_ms * 1e6)
        test.server_target_latency_percentile = 0.99
        test.min_query_count = settings.min_queries
    elif scenario == "single_stream":
        test.scenario = lg.TestScenario.SingleStream
        test.single_stream_expected_latency_ns = int(settings.bound_ms * 1e6)
        test.min_query_count = settings.single_stream_queries
    else:
        raise ValueError(f"scenario {scenario!r} is not one of server, single_stream")
    with tempfile.TemporaryDirectory(prefix="fractalbench-loadgen-") as folder:
        log = lg.LogSettings()
        log.log_output.outdir = folder
        log.log_output.copy_summary_to_stdout = False
        server.start()
        try:
            lg.StartTestWithLogSettings(sut, qsl, test, log)
        finally:
            server.stop()
            lg.DestroyQSL(qsl)
            lg.DestroySUT(sut)
        summary = parse_summary((Path(folder) / "mlperf_log_summary.txt").read_text())
    summary["offered"] = rate
    summary["passed"] = bool(summary.get("p99_ms", math.inf) <= settings.bound_ms and summary.get("early_stopping",
                                                                                                    False))
    return summary, server.stats


def serving_rows(model: nn.Module, inputs: Tensor, policies: Sequence[tuple[dict[str, Any], Any]],
                 settings: ServingSettings, /, **fields: Any) -> list[dict[str, Any]]:
    """The serving rows (module docstring) of each operating point ``(key, decider)``; ``key`` holds
    ``policy`` and ``threshold``. ``inputs``: the test samples the queries draw from."""
    from fractalbench.harness.metrics.timing import set_threads

    device = str(fields.get("device") or "cpu")
    model = model.to(device).eval()
    inputs = inputs.to(device)
    previous = set_threads(settings.threads)
    rows: list[dict[str, Any]] = []
    try:
        for key, decider in policies:
            point = {"policy": key["policy"], "threshold": key["threshold"], "batch_size": settings.max_batch}
            base = {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                    "bound_ms": settings.bound_ms, "threads": settings.threads, "driver": "mlperf_loadgen",
                    "policy_description": key.get("policy_description", "")}

            def factory(respond: Callable[[list[int]], None], decider: Any = decider) -> BatchingServer:
                return BatchingServer(model, decider, inputs, respond, max_batch=settings.max_batch,
                                      max_wait_ms=settings.max_wait_ms)

            tried: list[tuple[dict[str, Any], ServerStats]] = []
            _rates(settings, lambda r, f=factory, t=tried: _server_point(f, inputs, settings, r, t))
            for summary, stats in tried:
                base_detail = {**base, **summary, "server": stats.summary(),
                               "staged": isinstance(model, EarlyExitNetwork)}
                rows.append(field_row("serving_latency", summary.get("p99_ms"), "ms", fields, **point,
                                      n=summary.get("queries"), p50=summary.get("p50_ms"), p90=summary.get("p90_ms"),
                                      p99=summary.get("p99_ms"), detail=base_detail))
                rows.append(field_row("serving_throughput", summary.get("completed"), "samples/s", fields, **point,
                                      detail={"offered": summary["offered"], "passed": summary["passed"]}))
            passing = [s["offered"] for s, _ in tried if s["passed"]]
            rows.append(field_row("serving_max_rate", max(passing, default=0.0), "samples/s", fields, **point,
                                  detail={**base, "tried": [{"offered": s["offered"], "p99_ms": s.get("p99_ms"),
                                                             "passed": s["passed"]} for s, _ in tried]}))
            single, stats = loadgen_run(factory, len(inputs), "single_stream", settings)
            rows.append(field_row("serving_single_stream", single.get("p90_ms"), "ms", fields, **{**point,
                                  "batch_size": 1}, n=single.get("queries"), p50=single.get("p50_ms"),
                                  p90=single.get("p90_ms"), p99=single.get("p99_ms"),
                                  detail={**base, **single, "server": stats.summary()}))
            rows.append(_mismatch_row(model, decider, inputs, [st for _, st in tried] + [stats], fields, point))
    finally:
        torch.set_num_threads(previous["threads"])
    return rows


def _server_point(factory: Any, inputs: Tensor, settings: ServingSettings, rate: float, tried: list) -> bool:
    summary, stats = loadgen_run(factory, len(inputs), "server", settings, rate)
    tried.append((summary, stats))
    return bool(summary["passed"])


def _rates(settings: ServingSettings, attempt: Callable[[float], bool]) -> list[float]:
    """Try the rates in order until one fails, then bisect ``search_steps`` times between the last
    passing and the first failing rate (geometric midpoints)."""
    done: list[float] = []
    last_pass, first_fail = None, None
    for rate in settings.rates:
        done.append(rate)
        if attempt(rate):
            last_pass = rate
        else:
            first_fail = rate
            break
    if last_pass is not None and first_fail is not None:
        for _ in range(settings.search_steps):
            mid = round(math.sqrt(last_pass * first_fail), 1)
            if mid in (last_pass, first_fail):
                break
            done.append(mid)
            if attempt(mid):
                last_pass = mid
            else:
                first_fail = mid
    return done


def _mismatch_row(model: nn.Module, decider: Any, inputs: Tensor, stats: Sequence[ServerStats],
                  fields: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """Served predictions against the model's own batch-1 prediction of the same samples."""
    served: dict[int, int] = {}
    for st in stats:
        served.update(st.predictions)
    indices = sorted(served)
    alone = {}
    with torch.no_grad():
        for i in indices:
            alone[i] = int(contract.dynamic_forward(model, inputs[i:i + 1], decider, "compact").logits.argmax(-1))
    mismatches = sum(served[i] != alone[i] for i in indices)
    return field_row("serving_outcome_mismatches", mismatches, "count", fields, **point, n=len(indices), detail={
        "definition": "served predictions (the last served answer of each sample) that differ from the model's "
                      "batch-1 dynamic prediction of the same sample",
        "batch_dependent": contract.batch_dependent(model)})

