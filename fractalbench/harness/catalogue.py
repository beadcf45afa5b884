"""The metric catalogue: every metric name a result row may carry, with its unit and kind.

Part of the results layer. :func:`fractalbench.harness.results.make_row` refuses a metric that is not here (or
a unit that is not the metric's), and every reader (``compare``, the tables, the HTML report)
derives its sets of metrics from this one table instead of keeping its own.

Kinds (what a number is, and so how two runs of it are compared):

- ``accuracy``: percent of samples right; compared by percentage points.
- ``count``: an exact count (parameters, MACs of a fixed path); any change is a change.
- ``timing``: milliseconds per call, a sample statistic; compared by a slowdown ratio test.
- ``memory``: MiB (2**20 bytes); compared by a growth ratio.
- ``distribution``: shares that sum to 1 over one histogram (exits of a policy); compared by a
  chi-square test of homogeneity.
- ``info``: numbers reported for reading (training time and losses, expected MACs under learned
  decisions, gate rates, cross-checks, pattern analysis); never gate a run.
- ``error``: a failed cell or measurement (the message is in the row's ``error`` field).

``machine_dependent``: whether the number changes with the machine that measured it (timings,
memory, wall-clock training time). A committed baseline keeps only machine-independent metrics.

``group``: the quantity a metric belongs to (accuracy, cost, latency, memory, dynamic, training,
patterns, run), for readers that arrange metrics by topic.

A name ending in ``*`` is a family: ``train_loss_*`` covers ``train_loss_cross_entropy`` and any
other named loss term a model declares.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("accuracy", "count", "timing", "memory", "distribution", "info", "error")
GROUPS = ("accuracy", "cost", "latency", "memory", "energy", "serving", "dynamic", "training", "patterns", "run")


class UnknownMetricError(ValueError):
    """A metric name (or unit) the catalogue does not know."""


@dataclass(frozen=True)
class Metric:
    """One catalogue entry. ``unit`` is what ``value`` is measured in ('' for none)."""

    name: str
    unit: str
    kind: str
    group: str
    machine_dependent: bool
    description: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.group not in GROUPS:
            raise ValueError(f"metric {self.name!r}: group {self.group!r} is not one of {', '.join(GROUPS)}")

    @property
    def is_family(self) -> bool:
        return self.name.endswith("*")

    def matches(self, name: str) -> bool:
        return name.startswith(self.name[:-1]) if self.is_family else name == self.name


def _m(name: str, unit: str, kind: str, group: str, machine: bool, description: str) -> Metric:
    return Metric(name, unit, kind, group, machine, description)


METRICS: tuple[Metric, ...] = (
    # accuracy
    _m("top1", "%", "accuracy", "accuracy", False, "top-1 accuracy at exit `exit` (forced path), on `split`"),
    _m("top5", "%", "accuracy", "accuracy", False, "top-5 accuracy at exit `exit` (written when classes > 5)"),
    _m("top1_full", "%", "accuracy", "accuracy", False,
       "top-1 of forward(), the full network, for models whose full network is not one of the exits (FractalNet)"),
    _m("policy_top1", "%", "accuracy", "accuracy", False,
       "top-1 under the operating point (`policy`, `threshold`): the real dynamic forward decides"),
    # exact counts
    _m("params", "count", "count", "cost", False, "parameters (shared ones counted once)"),
    _m("params_active", "count", "count", "cost", False, "parameters one sample uses (routed models)"),
    _m("macs", "MACs", "count", "cost", False, "multiply-accumulates per image, forced path to exit `exit` (batch 1)"),
    _m("flops", "FLOPs", "count", "cost", False, "2 x macs"),
    _m("unit_macs", "MACs", "count", "cost", False, "one execution of cost unit `detail.cost_unit`"),
    _m("macs_fvcore", "MACs", "count", "cost", False,
       "fvcore's count of the same MAC ops (static models, cross-check)"),
    _m("macs_oracle_error", "MACs", "count", "cost", False,
       "max |counted - cost table| over the per-sample oracle at batch 1 (0 = the table is exact)"),
    _m("sweep_path_mismatches", "count", "count", "cost", False,
       "(sample, point) pairs where the real stopping path's exit or prediction differs from the threshold sweep "
       "computed from exit logits, near-ties excused (0 = the sweep is exact)"),
    # dynamic behaviour
    _m("expected_macs", "MACs", "info", "cost", False,
       "mean over test samples of the MACs each executed under the operating point (cost table x trace)"),
    _m("expected_macs_backbone", "MACs", "info", "cost", False,
       "part of expected_macs: mean MACs per image of the backbone that ran (every MAC outside the model's declared "
       "exit heads, gates and routers)"),
    _m("expected_macs_heads", "MACs", "info", "cost", False,
       "part of expected_macs: mean MACs per image of the exit heads evaluated, taken or not"),
    _m("expected_macs_gating", "MACs", "info", "cost", False,
       "part of expected_macs: mean MACs per image of the gates and routers evaluated"),
    _m("macs_avoided_fraction", "fraction", "info", "cost", False,
       "1 - expected_macs / macs of the full dynamic network (the last forced exit, all its heads)"),
    _m("expected_flops", "FLOPs", "info", "cost", False, "2 x expected_macs"),
    _m("exit_fraction", "fraction", "distribution", "dynamic", False, "share of samples leaving at exit `exit`"),
    # exit statistics of early-exit papers (fractalbench.harness.metrics.exit_stats), on test from the
    # forced exits' logits
    _m("oracle_top1", "%", "info", "dynamic", False,
       "% of samples right (top-1) at some exit: each leaves at its earliest right exit (Kaya et al. 2019)"),
    _m("oracle_macs", "MACs", "info", "dynamic", False,
       "mean forced-path MACs (batch 1) of each sample's earliest right exit, the last exit if right nowhere"),
    _m("overthinking", "%", "info", "dynamic", False,
       "destructive overthinking: % of samples right at an exit before the last, wrong at the last"),
    _m("overthinking_wasteful", "%", "info", "dynamic", False,
       "wasteful overthinking: % of samples right at an exit before the last and right at the last"),
    _m("ece", "%", "info", "dynamic", False,
       "expected calibration error of exit `exit`: 15 equal-width bins of the max softmax probability"),
    _m("gate_rate", "fraction", "info", "dynamic", False, "share of samples executing gated block `detail.gate`"),
    _m("expert_load", "fraction", "info", "dynamic", False,
       "share of routed tokens of layer `detail.layer` sent to expert `detail.expert`; n/std/p50/p90/p99: the same "
       "share within each sample, over the samples"),
    _m("expert_macs_useful", "MACs", "info", "dynamic", False,
       "mean MACs per sample of the routed (token, expert) pairs: the expert compute the compact dispatch runs"),
    _m("expert_macs_padded", "MACs", "info", "dynamic", False,
       "mean MACs per sample a static-shape dispatch runs for the same routes (every expert a buffer of its "
       "capacity; no capacity: the busiest expert's load in the batch)"),
    _m("expert_utilization", "fraction", "info", "dynamic", False,
       "expert_macs_useful / expert_macs_padded over the split (MoE-CAP's sparse accounting)"),
    _m("tokens_dropped", "fraction", "info", "dynamic", False,
       "share of layer `detail.layer`'s (token, choice) assignments no expert ran (capacity or decision threshold; "
       "expert choice: tokens no expert took); detail: count and routable"),
    _m("routing_weight", "fraction", "info", "dynamic", False,
       "soft routing (dynamic convolution): expert `detail.expert`'s share of layer `detail.layer`'s routing weight "
       "over the test images; detail: the mean weight and its p10/p50/p90/min/max"),
    # backends (fractalbench.harness.metrics.backends): eager, torch.compile, ONNX Runtime
    _m("latency_backend", "ms", "info", "latency", True,
       "ms per call through backend `detail.backend` (eager, inductor, onnxruntime; early-exit models one graph "
       "per stage and head, decisions between graphs): forced path to `exit` or a batch-1 stream of the point"),
    _m("backend_outcome_mismatches", "count", "count", "latency", False,
       "test samples whose prediction through backend `detail.backend` differs from eager's at the point "
       "(near-ties apart in detail; 0 = the export keeps every outcome)"),
    _m("backend_unsupported", "count", "info", "latency", False,
       "a model a backend does not run, with the reason (never a whole-graph export that computes every branch)"),
    # serving under load (fractalbench.harness.metrics.serving), driven by MLPerf LoadGen
    _m("serving_latency", "ms", "info", "serving", True,
       "LoadGen Server scenario at offered rate `detail.offered` (Poisson arrivals): latency from issue to answer "
       "through the dynamic-batching server; value = p99 (p50/p90/p99 filled); batch_size = the server's maximum"),
    _m("serving_throughput", "samples/s", "info", "serving", True,
       "samples answered per second in that Server run (LoadGen's completed rate)"),
    _m("serving_max_rate", "samples/s", "info", "serving", True,
       "the highest offered rate whose p99 latency stayed within `detail.bound_ms` with LoadGen's early stopping "
       "satisfied (0: none of the rates tried); detail: every rate tried"),
    _m("serving_single_stream", "ms", "info", "serving", True,
       "LoadGen SingleStream: one query at a time through the same server; value = p90 latency"),
    _m("serving_outcome_mismatches", "count", "count", "serving", False,
       "served predictions that differ from the model's own batch-1 prediction of the same sample (0 unless "
       "the model's decisions depend on the batch)"),
    # energy (fractalbench.harness.metrics.energy), read around the timed latency calls
    _m("energy_per_sample", "J", "info", "energy", True,
       "joules per sample of the timed calls of a forced path (`exit`) or operating point (`policy`), from the "
       "machine's counters (RAPL package / NVML); detail: gross and idle-net joules, idle watts, seconds, domains"),
    _m("energy_meter", "count", "info", "energy", True,
       "energy counter domains read by the latency measurement; 0: none can be read, detail.reason says why "
       "(no energy_per_sample rows then: never an estimate)"),
    # cost against sequence length (fractalbench.harness.metrics.length_scaling)
    _m("macs_at_length", "MACs", "count", "cost", False,
       "MACs of one forward (batch 1) at sequence length `detail.length` of variant `policy` (the model's attention "
       "or full attention of the same size); detail.attention_macs: the attention products alone"),
    _m("latency_at_length", "ms", "info", "cost", True,
       "median ms per call (batch 1) at sequence length `detail.length` of variant `policy`, variants interleaved"),
    _m("memory_at_length", "MiB", "info", "cost", True,
       "peak memory of one call (batch 1) at sequence length `detail.length` of variant `policy` (CPU: torch's "
       "allocator events; GPU: max_memory_allocated)"),
    # latency
    _m("latency", "ms", "timing", "latency", True,
       "ms per call: forced path to `exit` (policy empty) or the operating point (`policy`, `threshold`)"),
    _m("latency_masked", "ms", "timing", "latency", True, "as latency, mode='mask' (computes everything, selects)"),
    _m("latency_overhead", "ms", "timing", "latency", True,
       "the noop model's latency: the harness's own cost per call"),
    _m("latency_predicted", "ms", "info", "latency", True,
       "sum_k p_k x t_k: the stream's exit fractions times the forced batch-1 latency of each exit"),
    _m("latency_timer_ratio", "ratio", "info", "latency", True,
       "harness p50 / torch.utils.benchmark.Timer per-call median (cross-check, static models)"),
    # memory
    _m("memory_weights", "MiB", "memory", "memory", True, "parameter and buffer bytes"),
    _m("memory_peak_activations", "MiB", "memory", "memory", True,
       "peak memory a forward adds above the baseline (CPU: VmHWM in a fresh process; GPU: allocated)"),
    _m("memory_peak_reserved", "MiB", "memory", "memory", True, "GPU only: peak reserved by the caching allocator"),
    _m("memory_peak_torch", "MiB", "memory", "memory", True,
       "CPU: peak of torch profiler's allocation timeline (cross-check of memory_peak_activations)"),
    # training
    _m("train_seconds", "s", "info", "training", True, "wall-clock training time of this cell (or stage)"),
    _m("cell_seconds", "s", "info", "training", True,
       "wall-clock time of the whole cell, training and every measurement; `detail.steps`: seconds per step"),
    _m("train_loss_*", "nats", "info", "training", False, "last epoch's mean of each named loss term"),
    # FractalBrainNet pattern analysis
    _m("pattern_complexity", "nats", "info", "patterns", False, "entropy of the pattern activations at level `exit`"),
    _m("hierarchy_score", "score", "info", "patterns", False, "how complexity grows with depth (FractalBrainNet)"),
    # run
    _m("error", "", "error", "run", False, "a failed cell or measurement; the message is in `error`"),
)

_BY_NAME = {m.name: m for m in METRICS if not m.is_family}
_FAMILIES = tuple(m for m in METRICS if m.is_family)


def metric_info(name: str) -> Metric:
    """The catalogue entry of ``name``; UnknownMetricError (with the close matches) otherwise."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    for family in _FAMILIES:
        if family.matches(name):
            return family
    import difflib

    close = difflib.get_close_matches(name, [m.name for m in METRICS], n=4, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise UnknownMetricError(f"metric {name!r} is not in the catalogue (harness/catalogue.py){hint}")


def is_known(name: str) -> bool:
    try:
        metric_info(name)
    except UnknownMetricError:
        return False
    return True


def check_metric(name: str, unit: str) -> Metric:
    """The entry of ``name``, after checking that ``unit`` is its unit."""
    info = metric_info(name)
    if unit != info.unit:
        raise UnknownMetricError(f"metric {name!r} is measured in {info.unit!r}, not {unit!r}")
    return info


def names(*, kinds: Iterable[str] | None = None, groups: Iterable[str] | None = None,
          machine_dependent: bool | None = None) -> frozenset[str]:
    """Catalogue names (families with their trailing ``*``) selected by kind, group and machine
    dependence; no filter selects everything."""
    kinds = None if kinds is None else set(kinds)
    groups = None if groups is None else set(groups)
    for wanted, allowed, what in ((kinds, KINDS, "kind"), (groups, GROUPS, "group")):
        if wanted is not None and wanted - set(allowed):
            raise ValueError(f"unknown metric {what}(s) {sorted(wanted - set(allowed))}; allowed: {', '.join(allowed)}")
    return frozenset(m.name for m in METRICS
                     if (kinds is None or m.kind in kinds) and (groups is None or m.group in groups)
                     and (machine_dependent is None or m.machine_dependent == machine_dependent))


def kind_of(name: str) -> str:
    """The kind of ``name`` ('info' for a name the catalogue does not know, e.g. from a newer build)."""
    try:
        return metric_info(name).kind
    except UnknownMetricError:
        return "info"


def in_any(name: str, selected: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``selected`` catalogue names (families match by prefix)."""
    return any(s == name or (s.endswith("*") and name.startswith(s[:-1])) for s in selected)
