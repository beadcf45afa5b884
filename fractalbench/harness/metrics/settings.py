"""Measurement settings: how latency and memory are measured.

Suites hold these types directly (a suite's ``latency:`` section is a :class:`LatencySettings`,
its ``memory:`` section a :class:`MemorySettings`); the runner fills in the cell's device and the
operating points to stream with :func:`dataclasses.replace`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import Field

from fractalbench.harness import contract
from fractalbench.harness._schema_types import Count, Flag, PositiveNumber, WholeNumber, choice, non_empty
from fractalbench.harness.policies import ExitPolicy, make_policy

# Fields annotated with a pydantic ``Field`` carry their constraints and JSON Schema description:
# a suite's ``latency:``/``memory:`` section validates into these classes with them (fractalbench.harness.suites);
# ``__post_init__`` checks the same bounds for settings built in code.
BatchSizes = non_empty(Count, "batch size")
InferenceModes = tuple[choice(contract.INFERENCE_MODES), ...]


@dataclass(frozen=True)
class StreamPoint:
    """An operating point to time: the key its accuracy and cost rows carry (``policy``,
    ``threshold``; latency rows carry the same) and what decides (an ExitPolicy or its
    ``{"name", "thresholds"}`` description; None = the model's own decisions)."""

    policy: str
    threshold: float | None = None
    decider: ExitPolicy | Mapping[str, Any] | None = None


PolicyLike = ExitPolicy | Mapping[str, Any] | StreamPoint | None


@dataclass(frozen=True)
class LatencySettings:
    """How to measure latency. A suite's ``latency:`` section sets the fields with a description.

    policies: operating points to stream: :class:`StreamPoint` (key + decider), or a bare ExitPolicy
    or ``{"name": ..., "thresholds": [...]}`` description (key: its name, and its threshold when it
    has one); ``None`` in the list means the model's own default decisions (key ``default``). Without any,
    dynamic gated/routed models are streamed with ``None`` and early-exit models are not streamed.
    exits: forced exits to time (None = every exit).
    plugins: Python files or module names the worker imports before building the model (models
    registered outside ``baselines/``).
    """

    batch_sizes: Annotated[BatchSizes, Field(description="batch sizes to time (samples per call)")] = (1,)
    warmup: Annotated[WholeNumber, Field(description="untimed calls before the timed ones")] = 5
    repeats: Annotated[Count, Field(description="timed calls per forced exit and batch size")] = 30
    threads: Annotated[Count, Field(description="intra-op CPU threads (torch.set_num_threads)")] = 1
    stream_samples: Annotated[Count, Field(description="test samples streamed one at a time per policy")] = 100
    isolate: Annotated[Flag, Field(description="measure each model and batch size in a fresh process")] = True
    device: str = "cpu"
    interop_threads: Annotated[Count, Field(description="inter-op CPU threads (set_num_interop_threads)")] = 1
    policies: tuple[PolicyLike, ...] = ()
    modes: Annotated[InferenceModes, Field(description="batched dynamic inference: compact (finished samples "
                                                       "leave the batch) and/or mask (compute all, select)")] = (
        "compact", "mask")
    per_exit: Annotated[Flag, Field(description="time every forced exit (prefix up to it)")] = True
    exits: tuple[int, ...] | None = None
    cross_check: Annotated[Flag, Field(description="cross-check the timer with torch.utils.benchmark.Timer "
                                                   "(static models)")] = True
    cross_check_rounds: Annotated[Count, Field(description="interleaved rounds of the timer cross-check")] = 5
    timeout_s: Annotated[PositiveNumber, Field(description="seconds a measurement worker may run")] = 600.0
    plugins: tuple[str, ...] = ()
    energy: Annotated[Flag, Field(description="read the energy counters (RAPL on CPU, NVML on GPU) around the "
                                              "timed calls: energy_per_sample rows, or one energy_meter row saying "
                                              "why none can be read")] = True
    energy_idle_s: Annotated[PositiveNumber, Field(description="seconds of sleep to measure the idle power the "
                                                               "energy rows are also given net of")] = 0.5
    backends: Annotated[tuple[Literal["eager", "inductor", "onnxruntime"], ...], Field(
        description="also run the forced exits and streamed points through these backends (torch.compile's "
                    "inductor, ONNX Runtime; early-exit models one graph per stage, decisions between graphs): "
                    "latency_backend and backend_outcome_mismatches rows")] = ()

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
    def from_dict(data: Mapping[str, Any]) -> LatencySettings:
        data = dict(data)
        for key in ("batch_sizes", "policies", "modes", "plugins"):
            data[key] = tuple(data.get(key) or ())
        if data.get("exits") is not None:
            data["exits"] = tuple(data["exits"])
        return LatencySettings(**data)


def policy_description(policy: PolicyLike) -> dict[str, Any] | None:
    """{"name", "thresholds"} for a policy that ``make_policy`` can rebuild; None stays None; a
    StreamPoint becomes {"point": {"policy", "threshold"}, "decider": description}."""
    if policy is None:
        return None
    if isinstance(policy, StreamPoint):
        return {"point": {"policy": policy.policy, "threshold": policy.threshold},
                "decider": policy_description(policy.decider)}
    if isinstance(policy, Mapping) and "point" in policy:
        return dict(policy)
    if isinstance(policy, Mapping):
        return {"name": str(policy["name"]), "thresholds": [float(t) for t in policy.get("thresholds", ())]}
    rebuilt = make_policy(policy.name, policy.thresholds) if policy.thresholds else None
    if rebuilt is None or type(rebuilt) is not type(policy):
        raise ValueError(f"policy {policy.describe()!r} ({type(policy).__name__}) cannot be sent to a worker "
                         "process; use isolate=False or a policy from fractalbench.harness.policies.make_policy")
    return {"name": policy.name, "thresholds": list(policy.thresholds)}


def as_stream_point(policy: PolicyLike) -> StreamPoint:
    """The operating point of a ``policies`` entry (see :class:`LatencySettings`)."""
    if isinstance(policy, StreamPoint):
        return policy
    if isinstance(policy, Mapping) and "point" in policy:
        point = policy["point"]
        threshold = point.get("threshold")
        return StreamPoint(str(point["policy"]), None if threshold is None else float(threshold), policy.get("decider"))
    if policy is None:
        return StreamPoint("default", None, None)
    if isinstance(policy, Mapping):
        name, thresholds = str(policy["name"]), [float(t) for t in policy.get("thresholds", ())]
    else:
        name, thresholds = policy.name, [float(t) for t in policy.thresholds]
    return StreamPoint(name, thresholds[0] if len(thresholds) == 1 else None, policy)


def resolve_policy(policy: PolicyLike) -> tuple[str, ExitPolicy | None]:
    """(description, policy object) of a decider; a description is rebuilt with ``make_policy``;
    None -> ("default", None); a StreamPoint resolves its decider."""
    if isinstance(policy, StreamPoint) or (isinstance(policy, Mapping) and "point" in policy):
        return resolve_policy(as_stream_point(policy).decider)
    if policy is None:
        return "default", None
    if isinstance(policy, Mapping):
        policy = make_policy(str(policy["name"]), policy.get("thresholds", ()))
    return policy.describe(), policy


CPU_METHODS = ("auto", "vmhwm", "ru_maxrss")
MemoryMethod = choice(CPU_METHODS)


@dataclass(frozen=True)
class MemorySettings:
    """How to measure memory. A suite's ``memory:`` section sets the fields with a description."""

    batch_size: Annotated[Count, Field(description="samples per measured forward")] = 16
    device: str = "cpu"
    threads: int = 1
    isolate: bool = True
    per_exit: bool = True
    repeats: Annotated[Count, Field(description="calls per path; the median peak is reported (CPU)")] = 3
    torch_accounting: bool = True
    method: Annotated[MemoryMethod, Field(description="CPU peak: auto, vmhwm (VmHWM after a reset) or "
                                                      "ru_maxrss (a fresh process per path)")] = "auto"
    mmap_threshold: int = 65536
    seed: int = 0
    timeout_s: Annotated[PositiveNumber, Field(description="seconds a measurement worker may run")] = 600.0
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("batch_size", "threads", "repeats", "mmap_threshold"):
            value, low = getattr(self, name), 0 if name == "mmap_threshold" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"memory setting {name!r} must be a whole number >= {low}, got {value!r}")
        if self.method not in CPU_METHODS:
            raise ValueError(f"memory setting 'method' is {self.method!r}; allowed: {', '.join(CPU_METHODS)}")
        object.__setattr__(self, "plugins", tuple(str(p) for p in self.plugins))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> MemorySettings:
        data = dict(data)
        data["plugins"] = tuple(data.get("plugins") or ())
        return MemorySettings(**data)
