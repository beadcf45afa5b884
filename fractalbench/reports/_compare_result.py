"""The vocabulary of :mod:`fractalbench.reports.compare`: the thresholds of a comparison, the outcome of one
compared quantity and of a whole comparison, with its text and Markdown forms."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

OK, REGRESSION, IMPROVED, INFO = "ok", "REGRESSION", "improved", "info"
MISSING, NEW, SLOWER, CHANGED = "missing", "new", "slower", "changed"
NOTABLE = (REGRESSION, SLOWER, IMPROVED, CHANGED, MISSING, NEW)


@dataclass(frozen=True)
class Thresholds:
    """When a difference counts as a regression (see the module docstring).

    accuracy_points: the accuracy drop (percentage points) that fails: caught when its upper
    confidence limit reaches it and the estimate exceeds half of it (a fixed limit on the drop
    when rows carry neither n nor per-sample outcomes).
    latency_ratio / memory_ratio: slowdown / growth factor candidate / baseline that fails.
    p_value: significance level of the latency/memory tests and of the accuracy tests (after the
    Holm adjustment over the accuracy rows of one comparison); the confidence limits are one-sided
    at level 1 - p_value.
    exit_drift_p_value: significance level of the exit-histogram chi-square test.
    """

    accuracy_points: float = 1.0
    latency_ratio: float = 1.2
    memory_ratio: float = 1.2
    p_value: float = 0.01
    exit_drift_p_value: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"compare threshold {f.name!r} must be a number, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        if self.accuracy_points < 0:
            raise ValueError(f"compare threshold 'accuracy_points' must be >= 0, got {self.accuracy_points}")
        for name in ("latency_ratio", "memory_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"compare threshold {name!r} must be >= 1 (a slowdown factor), "
                                 f"got {getattr(self, name)}")
        for name in ("p_value", "exit_drift_p_value"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"compare threshold {name!r} must be between 0 and 1, got {getattr(self, name)}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def updated(self, values: Mapping[str, Any] | None) -> Thresholds:
        """These thresholds with ``values`` (None entries ignored); unknown names raise ValueError."""
        values = {k: v for k, v in (values or {}).items() if v is not None}
        unknown = sorted(set(values) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown compare threshold(s) {unknown}; allowed: {', '.join(self.names())}")
        return replace(self, **values)


@dataclass
class MetricComparison:
    """One compared quantity. ``status``: ok, REGRESSION, improved, slower (latency/memory:
    significant but below the threshold), changed (an exit histogram that drifted toward cheaper exits
    at no loss of accuracy), info, missing (baseline only) or new (candidate only).
    ``p_value``: the test's one-sided p (latency/memory: candidate larger; accuracy: Holm-adjusted,
    in the direction of the change); None without a test."""

    key: dict[str, Any]
    kind: str
    baseline: Any
    candidate: Any
    change: str
    status: str
    p_value: float | None = None
    note: str = ""

    @property
    def regression(self) -> bool:
        return self.status == REGRESSION


@dataclass
class Comparison:
    baseline: str
    candidate: str
    thresholds: Thresholds
    results: list[MetricComparison]
    warnings: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[MetricComparison]:
        return [r for r in self.results if r.regression]

    @property
    def has_regression(self) -> bool:
        return bool(self.regressions)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def rows(self, notable_only: bool = False) -> list[list[str]]:
        """Table rows (status, model, dataset, device, batch, exit, policy, threshold, metric,
        baseline, candidate, change, p, note); regressions first."""
        order = {REGRESSION: 0, SLOWER: 1, IMPROVED: 2, CHANGED: 3, MISSING: 4, NEW: 5, OK: 6, INFO: 7}
        chosen = [r for r in self.results if not notable_only or r.status in NOTABLE]
        chosen.sort(key=lambda r: order.get(r.status, 9))
        out, groups = [], self._one_sided_groups(chosen) if notable_only else {}
        for r in chosen:
            k = r.key
            group = groups.get((r.status, k.get("model", ""), k.get("dataset", ""), k.get("device", "")))
            if group is not None:
                if group:  # the group's first row stands for all of them
                    metrics = sorted({str(g.key.get("metric", "")) for g in group})
                    listed = ", ".join(metrics[:6]) + (f" (+{len(metrics) - 6} more)" if len(metrics) > 6 else "")
                    side = "baseline" if r.status == MISSING else "candidate"
                    out.append([r.status, *(k.get(c, "") for c in ("model", "dataset", "device")), "", "", "", "",
                                f"{len(group)} rows: {listed}", "", "", "", "", f"only in the {side}"])
                    group.clear()
                continue
            p = "" if r.p_value is None else f"{r.p_value:.2g}"
            out.append([r.status, k.get("model", ""), k.get("dataset", ""), k.get("device", ""),
                        _fmt(k.get("batch_size")), _fmt(k.get("exit")), k.get("policy", ""), _fmt(k.get("threshold")),
                        k.get("metric", ""), _fmt(r.baseline), _fmt(r.candidate), r.change, p, r.note])
        return out

    #: More one-sided (missing / new) rows than this for one model, dataset and device are one line
    #: in the notable rows (e.g. a cell the other run did not have); the full table lists each.
    GROUP_ONE_SIDED = 5

    def _one_sided_groups(self, rows: list[MetricComparison]) -> dict[tuple[str, ...], list[MetricComparison]]:
        groups: dict[tuple[str, ...], list[MetricComparison]] = {}
        for r in rows:
            if r.status in (MISSING, NEW):
                key = (r.status, *(str(r.key.get(c, "")) for c in ("model", "dataset", "device")))
                groups.setdefault(key, []).append(r)
        return {k: v for k, v in groups.items() if len(v) > self.GROUP_ONE_SIDED}

    HEADERS = ("status", "model", "dataset", "device", "batch", "exit", "policy", "threshold", "metric", "baseline",
               "candidate", "change", "p", "note")

    def summary_line(self) -> str:
        c = self.counts()
        n = len(self.regressions)
        head = f"{n} regression{'s' if n != 1 else ''}" if n else "no regressions"
        rest = ", ".join(f"{v} {k.lower()}" for k, v in sorted(c.items()) if k != REGRESSION)
        return f"{head} ({len(self.results)} compared: {rest})"

    def format_text(self, notable_only: bool = True) -> str:
        from tabulate import tabulate

        lines = [f"baseline:  {self.baseline}", f"candidate: {self.candidate}",
                 "thresholds: " + ", ".join(f"{k}={v:g}" for k, v in asdict(self.thresholds).items())]
        lines += [f"warning: {w}" for w in self.warnings]
        rows = self.rows(notable_only)
        if rows:
            lines += ["", tabulate(rows, headers=self.HEADERS, tablefmt="simple", disable_numparse=True)]
        lines += ["", self.summary_line()]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """Markdown for a CI job summary or pull-request comment."""
        from tabulate import tabulate

        def md(rows: list[list[str]]) -> str:
            safe = [[str(v).replace("|", "\\|").replace("\n", " ") for v in r] for r in rows]
            return tabulate(safe, headers=self.HEADERS, tablefmt="github", disable_numparse=True)

        verdict = (f":x: **{len(self.regressions)} regression(s)**" if self.has_regression
                   else ":white_check_mark: **no regressions**")
        parts = ["## fractalbench compare", "", verdict, "",
                 f"- baseline: `{self.baseline}`", f"- candidate: `{self.candidate}`",
                 "- thresholds: " + ", ".join(f"`{k}={v:g}`" for k, v in asdict(self.thresholds).items()),
                 f"- {self.summary_line()}"]
        parts += [f"- warning: {w}" for w in self.warnings]
        notable = self.rows(notable_only=True)
        if notable:
            parts += ["", "### Changes", "", md(notable)]
        parts += ["", "<details><summary>All compared metrics</summary>", "", md(self.rows()), "", "</details>", ""]
        return "\n".join(parts)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return f"{int(v):,}" if v == int(v) and abs(v) >= 1000 else f"{v:.4g}"
    return str(value)

