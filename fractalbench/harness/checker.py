"""The contract checker (``fractalbench check MODEL``): the dynamic contract of :mod:`fractalbench.harness.contract`
on one batch. Checks, in order (:data:`CHECK_NAMES`), each ``ok``, ``FAIL`` (with what differs; a
check that raises FAILs with the error, the others still run) or ``skipped`` (not for this kind).
The checker never raises for a defect of the model: everything it hits is a ``FAIL`` line.

0. ``exit shapes``: every exit's logits (``forward_exits(x)``, or ``forward(x)`` for a static model)
   are ``[batch, num_classes]``; when they are not, or the forward pass raises, the other checks are
   skipped (their comparisons would only repeat the error).
1. ``forced exits``: ``forced_forward(x, k)`` equals ``forward_exits(x)[k]`` for every exit k,
   elementwise ``|a - e| <= atol + rtol |e|`` with rtol = 1e-4 and atol = 1e-5 x max(1, max |e|)
   (:func:`logits_mismatch`; float reordering, relative to the logits' scale).
2. ``decisions``: the policy the other checks run under really decides (:func:`choose_policy`).
   Early exit: confidence thresholds from the model's own exit confidences on the batch, so that
   at every early exit some but not all samples in flight leave and some reach the last exit
   (:func:`split_thresholds`). Gated: the model's own decisions if some gates are open and some
   closed, else a ``decision_threshold`` found by bisection (:func:`_gated_policy`); FAIL if none
   mixes them. Routed: the model's own routing; FAIL if its trace has no expert assignments.
3. ``batch-1 vs batched``: ``dynamic_forward`` of the batch (compact mode) equals each sample's
   batch-1 call: exit, every unit count, gate bits and expert assignments exactly, logits within
   the tolerance of check 1. A model that declares ``batch_dependent`` (expert-choice routing over
   the batch) is checked against its declaration instead: the batch in reverse order gives the
   reversed results (its route depends on which samples share the batch, never on their order),
   and the ok line says how many samples route differently at batch 1.
4. ``cost table vs counted``: :func:`fractalbench.harness.metrics.flops.oracle_check` on every sample under that
   policy (MACs counted at batch 1 on the real dynamic forward equal the cost table on that call's
   trace, exactly), and the MACs counted on the batched call equal the table's on its trace.
5. ``ops without a MAC formula``: FAIL when any ran in the cost table's probes and forced paths or
   in the oracle's calls (a sample's cost misses their work); ops seen only in the batched calls
   (e.g. mask mode's policy simulation) are listed in the ok line.
6. ``real stopping``: compact mode does not do the work of samples that left. Early exit: the MACs
   counted on the batched call equal the sum over samples of the forced path to each one's exit
   (``CostTable.exits``), and forward hooks on ``stages[k]``/``heads[k]`` (where the model has one
   of each per exit, as :class:`fractalbench.harness.early_exit.EarlyExitNetwork`) see exactly the samples whose
   exit is k or later. Every dynamic kind: the batch runs fewer MACs in compact than in mask mode.
7. ``masked mode``: ``mode="mask"`` takes the same decisions and gives the same logits as compact
   mode. Gated, routed: no unit runs fewer times, except units the model declares replaced in mask
   mode (``mask_replaces``: another algorithm computes everything there), and then no sample costs
   fewer MACs than in compact mode. Early exit: it computes everything: the batch
   counts N x the whole cascade (``exits[-1]``) and every sample's unit counts are those of a
   sample that compact mode took to the last exit (independent of the cost units, unlike check 4).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import reduce
from operator import or_
from typing import Any

import torch
from torch import Tensor, nn

from fractalbench.harness import contract
from fractalbench.harness.early_exit import leading_rows
from fractalbench.harness.metrics import flops
from fractalbench.harness.policies import ConfidencePolicy, DecisionThreshold, ExitPolicy

RTOL = 1e-4
ATOL_SCALE = 1e-5
CHECK_NAMES = ("exit shapes", "forced exits", "decisions", "batch-1 vs batched", "cost table vs counted",
               "ops without a MAC formula", "real stopping", "masked mode")
OK, FAIL, SKIPPED = "ok", "FAIL", "skipped"


@dataclass(frozen=True)
class CheckResult:
    """One check: ``status`` is ``ok``, ``FAIL`` or ``skipped``; ``detail`` says what differs
    (FAIL), why it does not apply (skipped) or what was checked (ok)."""

    name: str
    status: str
    detail: str = ""

    def line(self) -> str:
        """``name: ok``, ``name: ok (detail)``, ``name: FAIL: detail`` or ``name: skipped (detail)``."""
        if self.status == FAIL:
            return f"{self.name}: FAIL: {self.detail}"
        return f"{self.name}: {self.status} ({self.detail})" if self.detail else f"{self.name}: {self.status}"


@dataclass(frozen=True)
class CheckReport:
    """Every check's result, in :data:`CHECK_NAMES` order."""

    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:  # skipped checks do not fail
        return not self.failed

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if r.status == FAIL]

    def __getitem__(self, name: str) -> CheckResult:
        return {r.name: r for r in self.results}[name]

    def text(self) -> str:
        return "\n".join(r.line() for r in self.results)


class CheckFailure(Exception):
    """Raised inside a check: the check FAILs with this message."""


def logits_mismatch(actual: Tensor, expected: Tensor) -> str | None:
    """None when ``actual`` equals ``expected`` within the tolerance (module docstring, check 1),
    else what differs (shape, or the largest difference and the tolerance there)."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} instead of {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    atol = ATOL_SCALE * max(1.0, float(e.abs().max())) if e.numel() else ATOL_SCALE
    if not torch.isfinite(a).all():
        return "non-finite values"
    excess = (a - e).abs() - (atol + RTOL * e.abs())
    if excess.numel() == 0 or float(excess.max()) <= 0:
        return None
    worst = int(excess.flatten().argmax())
    return (f"differs by {float((a - e).abs().flatten()[worst]):.3g} "
            f"(tolerance {atol + RTOL * float(e.abs().flatten()[worst]):.3g})")


def split_thresholds(confidences: list[Tensor]) -> tuple[tuple[float, ...], float]:
    """Thresholds (one per early exit) under which some but not all samples in flight leave at every
    early exit and some reach the last: each in the middle of the widest gap of the sorted
    confidences in flight among the splits that leave enough samples for the later exits. Returns
    them and the smallest half-gap (margin to any sample); ValueError if too few samples or ties."""
    num_exits = len(confidences)
    remaining = torch.arange(confidences[0].shape[0])
    thresholds, margin = [], float("inf")
    for k in range(num_exits - 1):
        conf = confidences[k][remaining].double()
        c = conf.sort(descending=True).values
        must_stay = num_exits - 1 - k  # one to leave at each later early exit, one for the last exit
        if len(c) - must_stay < 1:
            raise ValueError(f"{len(confidences[0])} samples are too few to leave some at each of "
                             f"{num_exits - 1} early exits; use at least {num_exits}")
        gaps = c[:-1] - c[1:]
        q = int(gaps[: len(c) - must_stay].argmax()) + 1  # the q most confident leave
        if float(gaps[q - 1]) <= 0:
            raise ValueError(f"exit {k}: the confidences of the samples in flight tie; no threshold splits them")
        thresholds.append(float((c[q - 1] + c[q]) / 2))
        margin = min(margin, float(gaps[q - 1]) / 2)
        remaining = remaining[conf < thresholds[-1]]
    return tuple(thresholds), margin


def _open_rate(model: nn.Module, x: Tensor, threshold: float) -> tuple[float, float]:
    """Fraction of gates open under ``decision_threshold`` t, and min |trace extra gate_probs - t|."""
    trace = contract.dynamic_forward(model, x, DecisionThreshold((threshold,))).trace
    probs = trace.extras.get("gate_probs")
    margin = float((probs - threshold).abs().min()) if probs is not None and probs.numel() else float("inf")
    return float(trace.gates.float().mean()), margin


def _gated_policy(model: nn.Module, x: Tensor) -> tuple[ExitPolicy | None, str]:
    """The model's own gates if some are open and some closed, else a decision threshold found by
    bisection on [0, 1] (more open: raise it) until 20% to 80% of the gates are open and every gate
    probability is at least 1e-5 from it (at most 30 steps; else the best mixed one seen)."""
    trace = contract.dynamic_forward(model, x).trace
    if trace.gates is None or trace.gates.numel() == 0:
        raise CheckFailure("the gated model's trace has no gate bits")
    rate = float(trace.gates.float().mean())
    if 0 < rate < 1:
        return None, f"the model's own gates: {rate:.0%} open"
    state, lo, hi, best = "open" if rate == 1 else "closed", 0.0, 1.0, None
    for _ in range(30):
        t = (lo + hi) / 2
        r, margin = _open_rate(model, x, t)
        if 0 < r < 1 and (best is None or (margin >= 1e-5, -abs(r - 0.5)) > (best[2] >= 1e-5, -abs(best[1] - 0.5))):
            best = (t, r, margin)
        if 0.2 <= r <= 0.8 and margin >= 1e-5:
            break
        lo, hi = (t, hi) if r > 0.5 else (lo, t)
    if best is None:
        raise CheckFailure(f"the gates are all {state} under the model's own decisions, and no decision threshold "
                           f"in [0, 1] opens some but not all of them")
    t, r, margin = best
    return DecisionThreshold((t,)), (f"the model's own gates are all {state}; decision_threshold {t:.6g}: "
                                     f"{r:.0%} open, every gate probability at least {margin:.2g} from it")


def choose_policy(model: nn.Module, x: Tensor) -> tuple[ExitPolicy | None, str]:
    """The policy the checks run under and its decisions on ``x`` (module docstring, check 2)."""
    kind = contract.dynamic_kind(model)
    with torch.no_grad():
        if kind == "early_exit":
            exits = contract.forward_exits(model, x)
            thresholds, margin = split_thresholds([torch.softmax(e.float(), -1).amax(-1) for e in exits])
            policy = ConfidencePolicy(thresholds=thresholds)
            counts = torch.bincount(policy.simulate(exits), minlength=len(exits)).tolist()
            return policy, (f"{policy.describe()}, samples per exit {counts}, every threshold at least "
                            f"{margin:.2g} from every sample's confidence")
        if kind == "gated":
            return _gated_policy(model, x)
        if kind == "routed":
            trace = contract.dynamic_forward(model, x).trace
            if trace.experts is None:
                raise CheckFailure("the routed model's trace has no expert assignments")
            used = torch.bincount(trace.experts[trace.experts >= 0].flatten().cpu()).tolist()
            return None, f"the model's own routing: assignments per expert {used}"
    return None, "static model: one path"


class CheckContext:
    """The model, the batch and what several checks share (the cost table, the policy, the counted
    compact and masked calls, the oracle), each computed once on first use; a failure is kept and
    raised again, as :class:`CheckFailure`, to every check that needs it."""

    def __init__(self, model: nn.Module, x: Tensor, num_classes: int | None = None) -> None:
        self.model, self.x, self.num_classes = model, x, num_classes
        self.kind, self.num_exits = contract.dynamic_kind(model), contract.num_exits(model)
        self._cache: dict[str, tuple[bool, Any]] = {}

    def _get(self, key: str, what: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = (True, compute())
            except Exception as exc:  # noqa: BLE001 - a model defect becomes a failed check
                error = exc if isinstance(exc, CheckFailure) else f"{type(exc).__name__}: {exc}"
                self._cache[key] = (False, CheckFailure(f"{what}: {error}"))
        ok, value = self._cache[key]
        if not ok:
            raise CheckFailure(str(value))
        return value

    @property
    def table(self) -> flops.CostTable:
        return self._get("table", "no cost table", lambda: flops.build_cost_table(self.model, self.x[:1]))

    @property
    def decisions(self) -> tuple[ExitPolicy | None, str]:
        return self._get("policy", "no policy makes real decisions", lambda: choose_policy(self.model, self.x))

    @property
    def policy(self) -> ExitPolicy | None:
        return self.decisions[0]

    def run(self, mode: str) -> tuple[contract.DynamicOutput, flops.MacCount]:
        """The batched ``dynamic_forward`` under the policy in ``mode``, with its counted MACs."""
        policy = self.policy

        def counted() -> tuple[contract.DynamicOutput, flops.MacCount]:
            with flops.MacCounter(self.model) as counter:
                out = contract.dynamic_forward(self.model, self.x, policy, mode)
            return out, counter.result()

        return self._get(f"run_{mode}", f"dynamic_forward(x, mode={mode!r}) failed", counted)

    @property
    def oracle(self) -> list:
        table, policy = self.table, self.policy
        return self._get("oracle", "the oracle failed", lambda: flops.oracle_check(
            self.model, self.x, table, policy, indices=list(range(self.x.shape[0]))))


def _or_none(get: Callable[[], Any]) -> Any:
    """``get()``, or None where it fails (the check that needs it reports the failure)."""
    try:
        return get()
    except CheckFailure:
        return None


def _n(macs: float) -> str:
    """MACs written exactly, with thousands separators."""
    return f"{float(macs):,.0f}" if float(macs).is_integer() else f"{float(macs):,}"


def _listed(items: list[str], limit: int = 3, sep: str = "; ") -> str:
    """The first ``limit`` items joined, and how many more there are."""
    return sep.join(items[:limit]) + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def check_exit_shapes(ctx: CheckContext) -> tuple[str, str]:
    """Check 0 (module docstring)."""
    n = ctx.x.shape[0]
    if contract.is_dynamic(ctx.model):
        outs = contract.forward_exits(ctx.model, ctx.x)
        named = [(f"exit {k} of {len(outs)}", o) for k, o in enumerate(outs)]
    else:
        named = [("forward", ctx.model(ctx.x))]
    widths = {o.shape[-1] for _, o in named if isinstance(o, Tensor) and o.dim() == 2}
    classes = ctx.num_classes if ctx.num_classes is not None else (widths.pop() if len(widths) == 1 else None)
    problems = []
    for what, out in named:
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n or (
                classes is not None and out.shape[1] != classes):
            want = f"[{n}, {classes if classes is not None else 'num_classes'}]"
            problems.append(f"{what} returns logits of shape {shape}, not [batch, num_classes] = {want}")
    if problems:
        raise CheckFailure(_listed(problems, limit=len(problems)))
    return OK, f"{len(named)} exit(s), each [{n}, {classes}]"


def check_forced_exits(ctx: CheckContext) -> tuple[str, str]:
    """Check 1 (module docstring)."""
    exits = contract.forward_exits(ctx.model, ctx.x)
    if len(exits) != ctx.num_exits:
        raise CheckFailure(f"forward_exits gave {len(exits)} logits for {ctx.num_exits} exits")
    problems = []
    for k, expected in enumerate(exits):
        mismatch = logits_mismatch(contract.forced_forward(ctx.model, ctx.x, k), expected)
        if mismatch:
            problems.append(f"exit {k}: forced_forward(x, {k}) {mismatch} from forward_exits(x)[{k}]")
    if problems:
        raise CheckFailure(_listed(problems))
    return OK, (f"{ctx.num_exits} exit(s) on input {list(ctx.x.shape)}; rtol {RTOL:g}, "
                f"atol {ATOL_SCALE:g} x max(1, max |logit|)")


def check_decisions(ctx: CheckContext) -> tuple[str, str]:
    """Check 2 (module docstring)."""
    if ctx.kind == "static":
        return SKIPPED, "static model: one path"
    return OK, ctx.decisions[1]


def _trace_differences(one: contract.Trace, batched: contract.Trace, i: int) -> list[str]:
    """What differs between a batch-1 trace and sample ``i`` of a batched trace."""
    diffs = []
    e1, eb = int(one.exit_index[0]), int(batched.exit_index[i])
    if e1 != eb:
        diffs.append(f"exit {e1} at batch 1, {eb} in the batch")
    if set(one.unit_counts) != set(batched.unit_counts):
        diffs.append(f"units {sorted(one.unit_counts)} at batch 1, {sorted(batched.unit_counts)} in the batch")
    units = [u for u in sorted(set(one.unit_counts) & set(batched.unit_counts))
             if float(one.unit_counts[u][0]) != float(batched.unit_counts[u][i])]
    if units:
        diffs.append("unit counts (batch 1 vs batch) " + _listed(
            [f"{u} {float(one.unit_counts[u][0]):g} vs {float(batched.unit_counts[u][i]):g}" for u in units], sep=", "))
    for name in ("gates", "experts"):
        a, b = getattr(one, name), getattr(batched, name)
        if (a is None) != (b is None) or (a is not None and not torch.equal(a[0].cpu(), b[i].cpu())):
            diffs.append(f"{name} differ")
    return diffs


def check_batch_consistency(ctx: CheckContext) -> tuple[str, str]:
    """Check 3 (module docstring)."""
    if contract.batch_dependent(ctx.model):
        return _check_batch_dependent(ctx)
    batched, _ = ctx.run("compact")
    problems = []
    for i in range(ctx.x.shape[0]):
        one = contract.dynamic_forward(ctx.model, ctx.x[i:i + 1], ctx.policy, "compact")
        diffs = _trace_differences(one.trace, batched.trace, i)
        mismatch = logits_mismatch(one.logits[0], batched.logits[i])
        if mismatch:
            diffs.append(f"logits {mismatch}")
        if diffs:
            problems.append(f"sample {i}: {', '.join(diffs)}")
    if problems:
        raise CheckFailure(_listed(problems))
    return OK, f"{ctx.x.shape[0]} samples: exits, unit counts, gates, experts and logits"


def _check_batch_dependent(ctx: CheckContext) -> tuple[str, str]:
    """Check 3 for a model that declares ``batch_dependent``: order-independence of the batch."""
    batched, _ = ctx.run("compact")
    n = ctx.x.shape[0]
    reverse = torch.arange(n - 1, -1, -1, device=ctx.x.device)
    flipped = contract.dynamic_forward(ctx.model, ctx.x[reverse], ctx.policy, "compact")
    problems, alone = [], 0
    for i in range(n):
        j = n - 1 - i  # sample i sits at row j of the reversed batch
        one = contract.Trace(flipped.trace.exit_index[j:j + 1],
                             {u: c[j:j + 1] for u, c in flipped.trace.unit_counts.items()},
                             None if flipped.trace.gates is None else flipped.trace.gates[j:j + 1],
                             None if flipped.trace.experts is None else flipped.trace.experts[j:j + 1])
        diffs = _trace_differences(one, batched.trace, i)
        mismatch = logits_mismatch(flipped.logits[j], batched.logits[i])
        if mismatch:
            diffs.append(f"logits {mismatch}")
        if diffs:
            problems.append(f"sample {i}: {', '.join(diffs)}")
        single = contract.dynamic_forward(ctx.model, ctx.x[i:i + 1], ctx.policy, "compact")
        alone += bool(_trace_differences(single.trace, batched.trace, i))
    if problems:
        raise CheckFailure("declared batch-dependent, but the reversed batch does not give the reversed results: "
                           + _listed(problems))
    return OK, (f"declared batch-dependent: the reversed batch of {n} gives the reversed exits, unit counts, gates, "
                f"experts and logits; {alone} of {n} samples route differently at batch 1")


def check_cost_table(ctx: CheckContext) -> tuple[str, str]:
    """Check 4 (module docstring)."""
    samples, table = ctx.oracle, ctx.table
    problems = [f"sample {s.index} (exit {s.exit_index}): counted {_n(s.counted)} MACs at batch 1, the table "
                f"{_n(s.table)}" for s in samples if not s.agrees]
    out, count = ctx.run("compact")
    charged = float(contract.executed_macs(out.trace, table).sum())
    if float(count.total) != charged:
        problems.append(f"the batched call: counted {_n(count.total)} MACs, the table on its trace {_n(charged)}")
    if problems:
        raise CheckFailure(_listed(problems))
    macs = sorted({float(s.counted) for s in samples})
    return OK, f"{len(samples)} samples at batch 1 and the batch, exactly; per sample {_n(macs[0])} to {_n(macs[-1])}"


def check_unsupported_ops(ctx: CheckContext) -> tuple[str, str]:
    """Check 5 (module docstring)."""
    costed = reduce(or_, [Counter(s.unsupported_ops) for s in _or_none(lambda: ctx.oracle) or []],
                    Counter(ctx.table.unsupported_ops))
    modes = ("compact",) if ctx.kind == "static" else ("compact", "mask")
    batched = reduce(or_, [Counter(run[1].unsupported_ops) for run in (_or_none(lambda m=m: ctx.run(m)) for m in modes)
                           if run], Counter())
    listed = lambda ops: ", ".join(f"{name} ({n} call(s))" for name, n in sorted(ops.items()))  # noqa: E731
    if costed:
        raise CheckFailure(f"{listed(costed)} in the cost table's counts: their MACs are missing from every cost")
    others = {k: v for k, v in batched.items() if k not in costed}
    return OK, f"only in the batched calls, in no sample's cost: {listed(others)}" if others else "none"


def _stage_rows(ctx: CheckContext) -> tuple[list[str], bool]:
    """Check 6's hooks: rows ``stages[k]``/``heads[k]`` see in a compact call vs samples at exit >= k."""
    stages, heads = getattr(ctx.model, "stages", None), getattr(ctx.model, "heads", None)
    if not (isinstance(stages, nn.ModuleList) and isinstance(heads, nn.ModuleList)
            and len(stages) == len(heads) == ctx.num_exits):
        return [], False
    rows: Counter[str] = Counter()

    def hook(name: str) -> Callable[..., None]:
        def count(module: nn.Module, args: tuple, out: Any) -> None:
            rows[name] += leading_rows(args[0]) if args else 0
        return count

    handles = [m.register_forward_hook(hook(f"{part} {k}"))
               for part, mods in (("stage", stages), ("head", heads)) for k, m in enumerate(mods)]
    try:
        exit_index = contract.dynamic_forward(ctx.model, ctx.x, ctx.policy, "compact").trace.exit_index
    finally:
        for h in handles:
            h.remove()
    problems = []
    for k in range(ctx.num_exits):
        reached = int((exit_index >= k).sum())
        for part in ("stage", "head"):
            seen = rows[f"{part} {k}"]
            if seen != reached:
                problems.append(f"{part} {k} ran on {seen} rows, but {reached} sample(s) reached exit {k}")
    return problems, True


def check_real_stopping(ctx: CheckContext) -> tuple[str, str]:
    """Check 6 (module docstring)."""
    if ctx.kind == "static":
        return SKIPPED, "static model: one path, nothing to stop"
    (out, count), (_, masked) = ctx.run("compact"), ctx.run("mask")
    problems, hooked = [], False
    if ctx.kind == "early_exit":
        paths = float(sum(ctx.table.exits[int(e)] for e in out.trace.exit_index))
        if float(count.total) != paths:
            problems.append(f"the batch ran {_n(count.total)} MACs, but the forced paths to its samples' exits "
                            f"cost {_n(paths)}: work after a sample's exit ran")
        stage_problems, hooked = _stage_rows(ctx)
        problems.extend(stage_problems)
    if not count.total < masked.total:
        problems.append(f"compact mode ran {_n(count.total)} MACs on the batch, no fewer than mask mode "
                        f"({_n(masked.total)}), although the decisions skip work")
    if problems:
        raise CheckFailure(_listed(problems))
    return OK, f"compact {_n(count.total)} MACs vs mask {_n(masked.total)} on the batch" + (
        "; stage and head hooks saw only the samples still in flight" if hooked else "")


def check_masked_mode(ctx: CheckContext) -> tuple[str, str]:
    """Check 7 (module docstring)."""
    if ctx.kind == "static":
        return SKIPPED, "static model: no masked variant"
    (out, _), (mask, count) = ctx.run("compact"), ctx.run("mask")
    problems = []
    moved = (mask.trace.exit_index.cpu() != out.trace.exit_index.cpu()).nonzero().flatten().tolist()
    if moved:
        problems.append(f"samples {moved[:5]} take other exits than in compact mode")
    mismatch = logits_mismatch(mask.logits, out.logits)
    if mismatch:
        problems.append(f"logits {mismatch} from compact mode's")
    counts = {u: c.cpu() for u, c in mask.trace.unit_counts.items()}
    fewer = [u for u, c in out.trace.unit_counts.items() if u not in counts or bool((counts[u] < c.cpu()).any())]
    replaced = contract.mask_replaces(ctx.model)
    if replaced:  # another algorithm in mask mode: its units instead, and never cheaper for any sample
        fewer = [u for u in fewer if not any(fnmatch(u, pattern) for pattern in replaced)]
        cheaper = (contract.executed_macs(mask.trace, ctx.table).cpu()
                   < contract.executed_macs(out.trace, ctx.table).cpu()).nonzero().flatten().tolist()
        if cheaper:
            problems.append(f"samples {cheaper[:5]} cost fewer MACs in mask mode than in compact mode, although "
                            f"units {sorted(replaced)} are declared replaced by {sorted(replaced.values())} there")
    if fewer and ctx.kind != "early_exit":  # an early-exit unit may be one exit's path (counted once, at its exit)
        problems.append(f"units {fewer[:3]} run fewer times than in compact mode")
    if ctx.kind == "early_exit":
        full, n = ctx.table.exits[-1], ctx.x.shape[0]
        if float(count.total) != float(n * full):
            problems.append(f"the batch ran {_n(count.total)} MACs, not {n} x the whole cascade ({_n(full)})")
        last = int((out.trace.exit_index.cpu() == ctx.num_exits - 1).nonzero()[0])  # check 2: some reach it
        partial = [i for i in range(n) if any(float(c[i]) != float(out.trace.unit_counts[u][last])
                                              for u, c in counts.items() if u in out.trace.unit_counts)]
        if partial:
            problems.append(f"the trace of samples {partial[:5]} counts fewer units than the whole cascade")
    if problems:
        raise CheckFailure(_listed(problems))
    return OK, "same exits and logits as compact" + (", the whole cascade computed and counted for every sample"
                                                     if ctx.kind == "early_exit" else ", every unit at least as often")


CHECKS: dict[str, Callable[[CheckContext], tuple[str, str]]] = dict(zip(CHECK_NAMES, (
    check_exit_shapes, check_forced_exits, check_decisions, check_batch_consistency, check_cost_table,
    check_unsupported_ops, check_real_stopping, check_masked_mode)))


def _run_check(name: str, check: Callable[[CheckContext], tuple[str, str]], ctx: CheckContext) -> CheckResult:
    try:
        return CheckResult(name, *check(ctx))
    except Exception as exc:  # noqa: BLE001 - a model defect becomes a failed check, the others still run
        return CheckResult(name, FAIL, _one_line(exc) if isinstance(exc, CheckFailure)
                           else f"{type(exc).__name__}: {_one_line(exc)}")


def run_checks(model: nn.Module, x: Tensor, num_classes: int | None = None) -> CheckReport:
    """Run every check (module docstring) on ``model`` (eval mode, no grad; each module's training
    flag is restored) with the batch ``x`` (moved to the model's device), under the policy of
    :func:`choose_policy`. ``num_classes``: the width every exit's logits must have (None: the same
    width at every exit). When the exit shapes fail, the other checks are skipped."""
    if x.dim() < 1 or x.shape[0] < 2:
        raise ValueError(f"the checker needs a batch of at least 2 samples, got input shape {tuple(x.shape)}")
    try:
        ctx = CheckContext(model, x.to(flops.model_device(model)), num_classes)
    except Exception as exc:  # noqa: BLE001 - e.g. a num_exits that raises: a defect, one FAIL line
        return failed_report(f"the model's contract attributes failed: {type(exc).__name__}: {_one_line(exc)}")
    with flops.eval_mode(model), torch.no_grad():
        first = _run_check(CHECK_NAMES[0], CHECKS[CHECK_NAMES[0]], ctx)
        if first.status == FAIL:
            return CheckReport((first, *(CheckResult(name, SKIPPED, "the exit shapes failed")
                                         for name in CHECK_NAMES[1:])))
        return CheckReport((first, *(_run_check(name, check, ctx) for name, check in list(CHECKS.items())[1:])))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def failed_report(detail: str) -> CheckReport:
    """The report of a model the checks cannot start on: the first check FAILs with ``detail``."""
    return CheckReport((CheckResult(CHECK_NAMES[0], FAIL, detail),
                        *(CheckResult(name, SKIPPED, "the model did not run") for name in CHECK_NAMES[1:])))


def check_registered(name: str, input_size: int | None = None, batch_size: int | None = None, *,
                     num_classes: int = 10, seed: int = 0, weights: Any = None) -> CheckReport:
    """Every check on model ``name`` (as :func:`fractalbench.harness.registry.create_model` resolves it, weights
    from ``torch.manual_seed(seed)``) with a random normal batch (seed ``seed``) of ``batch_size``
    images (default max(8, 2 x its exits)) of side ``input_size`` (default: its card's), after
    :func:`settle_batchnorm` on that batch. ValueError for a bad name or a batch too small (under
    2, or under its exits for an early-exit model). ``weights``: a :class:`fractalbench.harness.weights.WeightsConfig`
    loaded after the build (then the batch norms keep the weights' statistics)."""
    from fractalbench.harness.registry import create_model, model_card

    card = model_card(name)
    size = input_size or card.input_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(name, num_classes=num_classes, in_chans=card.in_chans)
    if weights is not None:
        from fractalbench.harness.weights import load_weights

        load_weights(model, weights, name=name)
    exits = contract.num_exits(model)
    n = batch_size if batch_size is not None else max(8, 2 * exits)
    least = max(2, exits) if contract.dynamic_kind(model) == "early_exit" else 2
    if n < least:
        raise ValueError(f"batch size {n} is too small to check {name}: it needs at least {least} samples "
                         f"(some must leave at each of its {exits} exits)")
    x = torch.randn((n, card.in_chans, size, size), generator=torch.Generator().manual_seed(seed))
    try:
        model = model.eval() if weights is not None else settle_batchnorm(model, x)
    except Exception as exc:  # noqa: BLE001 - the model's forward fails on this batch: a FAIL, not a traceback
        return failed_report(f"forward_exits on a batch {list(x.shape)} failed: {type(exc).__name__}: "
                             f"{_one_line(exc)}")
    return run_checks(model, x, num_classes)


def settle_batchnorm(model: nn.Module, x: Tensor) -> nn.Module:
    """Batch norms' running statistics := those of ``x`` on the exits' paths (one training-mode, no-grad
    ``forward_exits``; RNG state kept), so a random deep model gives moderate logits, not saturated
    confidences (all 1.0: no threshold splits them) or ~1e5 logits whose rounding depends on the
    batch size. Returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        contract.forward_exits(model.train(), x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()
