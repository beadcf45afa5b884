"""Compare two runs metric by metric and say whether the candidate regressed (CI gating).

Either side is a run directory, a committed baseline file (JSON ``{"schema_version": 1,
"rows": [...]}`` as written by :func:`write_baseline`; a run's ``results.json`` has the same form)
or a list of rows. Rows are matched on model, variant, dataset, device, batch size, exit, policy,
threshold, split and metric (plus ``gate`` / ``layer`` + ``expert`` / ``cost_unit`` from detail for
gate_rate / expert_load / unit_macs rows). A baseline file written with a metric filter (``fractalbench
baseline`` keeps the machine-independent metrics by default) records it, and the candidate's rows of
other metrics (latency, memory, ...) are then left out rather than listed as new.

Rules (thresholds: suite ``compare`` section, then arguments; defaults in :class:`Thresholds`)
-------------------------------------------------------------------------------------------------
- Accuracy (top1, top5, policy_top1, top1_full; %): regression when the candidate is more than
  ``accuracy_points`` percentage points lower.
- Compute and size (params, params_active, macs, flops, unit_macs, macs_fvcore): any change is a
  regression; these are exact counts.
- Latency (latency, latency_masked; ms) with ``latency_ratio`` and memory (memory_*; MiB) with
  ``memory_ratio``: the slowdown ratio candidate / baseline is estimated, then

  * with per-call samples on both sides (detail ``"samples"``, >= 3 each): the Mann-Whitney U test
    (one-sided, candidate slower) gives p; the ratio is the Hodges-Lehmann estimate (median of the
    pairwise log differences, exponentiated) with its distribution-free upper confidence limit at
    level 1 - p_value. Regression when p < ``p_value`` AND the upper limit reaches the ratio
    threshold AND the estimate is above the midpoint 1 + (threshold - 1) / 2. So a slowdown of
    exactly the threshold is flagged (a point-estimate rule would catch it only half the time),
    one that is clearly smaller is not, and noise alone is flagged at most at rate p_value.
  * without samples but with n >= 2 and std on both sides (rows always carry them; value = mean):
    the same rule with a one-sided z-test on the log ratio of means (Welch, delta method).
  * with neither (single numbers, e.g. memory peaks): ratio only. Regression when
    candidate / baseline > threshold, using p50 where both rows have it, else the value.

  Memory (MiB) that grows by less than ``MEMORY_FLOOR_MIB`` (0.5 MiB) is never a regression: the
  CPU peak (VmHWM) of a small model moves by a few hundred KiB between identical runs.
  Latency is only comparable between runs on the same, otherwise idle machine: on a loaded or
  shared machine the whole distribution shifts between runs (two runs of one build on a busy
  2-core VM differed by x0.6 to x2.1), which no test on the samples of each run can tell from a
  regression. Time baseline and candidate on the same runner, one after the other.

- Exit histograms (exit_fraction rows of one model/policy/threshold): chi-square test of
  homogeneity on the counts (detail ``count``, else fraction x n); drift (regression) when
  p < ``exit_drift_p_value``.
- A cell that failed in the candidate but not in the baseline, or a measurement row that carries an
  error in the candidate only, is a regression. Other metrics (training time, losses, expected
  MACs, gate rates, expert loads, ...) are shown as information. Metrics present on one side only
  are listed as missing / new.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

import numpy as np

from harness.results import SCHEMA_VERSION, RunStore, atomic_write_json

ACCURACY_METRICS = frozenset({"top1", "top5", "policy_top1", "top1_full"})
EXACT_METRICS = frozenset({"params", "params_active", "macs", "flops", "unit_macs", "macs_fvcore"})
LATENCY_METRICS = frozenset({"latency", "latency_masked"})
MEMORY_METRICS = frozenset({"memory_peak_activations", "memory_weights", "memory_peak_allocated", "memory_peak_reserved",
                            "memory_peak_torch"})
DRIFT_METRICS = frozenset({"exit_fraction"})
# What a committed baseline keeps by default (`fractalbench baseline`): numbers that do not depend on
# the machine that measured them. Latency and memory only compare between runs on one machine.
MACHINE_INDEPENDENT_METRICS = ACCURACY_METRICS | EXACT_METRICS | DRIFT_METRICS | {"error"}
KEY_FIELDS = ("model", "variant", "dataset", "device", "batch_size", "exit", "policy", "threshold", "split", "metric")
DETAIL_KEYS = {"gate_rate": ("gate",), "expert_load": ("layer", "expert"), "unit_macs": ("cost_unit",)}
BASELINE_DETAIL_KEYS = ("samples", "count", "exit_counts", "gate", "layer", "expert", "cost_unit", "thresholds", "fitted_on")
MIN_SAMPLES = 3
MEMORY_FLOOR_MIB = 0.5  # growth smaller than this is never a regression (RSS page and allocator noise)
MAX_PAIRWISE = 2_000_000

OK, REGRESSION, IMPROVED, INFO, MISSING, NEW, SLOWER = "ok", "REGRESSION", "improved", "info", "missing", "new", "slower"


# ----- thresholds ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    """When a difference counts as a regression (see the module docstring).

    accuracy_points: allowed drop in top-1/top-5 (percentage points).
    latency_ratio / memory_ratio: slowdown / growth factor candidate / baseline that fails.
    p_value: significance level of the latency/memory tests.
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
                raise ValueError(f"compare threshold {name!r} must be >= 1 (a slowdown factor), got {getattr(self, name)}")
        for name in ("p_value", "exit_drift_p_value"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"compare threshold {name!r} must be between 0 and 1, got {getattr(self, name)}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def updated(self, values: Mapping[str, Any] | None) -> "Thresholds":
        """These thresholds with ``values`` (None entries ignored); unknown names raise ValueError."""
        values = {k: v for k, v in (values or {}).items() if v is not None}
        unknown = sorted(set(values) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown compare threshold(s) {unknown}; allowed: {', '.join(self.names())}")
        return replace(self, **values)


# ----- sources ---------------------------------------------------------------------------------------

@dataclass
class Source:
    """One side of a comparison: its rows and the suite's ``compare`` section."""

    label: str
    rows: list[dict[str, Any]]
    compare: dict[str, Any] = field(default_factory=dict)
    suite: dict[str, Any] = field(default_factory=dict)
    metrics: frozenset[str] | None = None  # a baseline file written with a metric filter: the metrics it kept


def load_source(source: Path | str | Sequence[Mapping[str, Any]] | Source, what: str = "input") -> Source:
    """A run directory, a baseline/results JSON file, a list of rows or a Source; ValueError naming
    ``what`` (baseline/candidate) and the path when it is none of these."""
    if isinstance(source, Source):
        return source
    if isinstance(source, (list, tuple)):
        return Source(f"{what} rows", [dict(r) for r in source])
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # a pandas DataFrame
        return Source(f"{what} rows", source.to_dict("records"))
    if not isinstance(source, (str, Path)):
        raise ValueError(f"{what} must be a run directory, a baseline JSON file or a list of rows, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist (expected a run directory or a baseline JSON file)")
    if path.is_dir():
        if not (path / "cells").is_dir():
            raise ValueError(f"{what} {path} is not a fractalbench run directory (no cells/ folder) nor a baseline JSON file")
        store = RunStore(path)
        suite = store.read_meta("suite.json")
        content = suite.get("content") if isinstance(suite.get("content"), dict) else {}
        return Source(str(path), store.rows(), dict(content.get("compare") or {}),
                      {"name": suite.get("name"), "digest": suite.get("digest")})
    return _load_file(path, what)


def _load_file(path: Path, what: str) -> Source:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is not a baseline JSON file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "schema_version" not in data:
        raise ValueError(f"{what} {path} is not a baseline JSON file (needs 'schema_version' and a 'rows' list)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{what} {path} has schema_version {data['schema_version']!r}; this fractalbench reads {SCHEMA_VERSION}")
    suite = data.get("suite") if isinstance(data.get("suite"), dict) else {}
    kept = data.get("metrics")
    metrics = frozenset(str(m) for m in kept) if isinstance(kept, list) else None
    return Source(str(path), [dict(r) for r in data["rows"] if isinstance(r, dict)], dict(data.get("compare") or {}), suite,
                  metrics)


def _trim_detail(detail: Any) -> Any:
    d = _detail(detail)
    kept = {k: d[k] for k in BASELINE_DETAIL_KEYS if k in d}
    return json.dumps(kept, sort_keys=True) if kept else ""


def write_baseline(run_dir: Path | str, path: Path | str, *, metrics: Iterable[str] | None = None) -> Path:
    """Write the committed baseline of a run: JSON with ``schema_version``, the suite's identity and
    ``compare`` thresholds, a short environment summary and the rows (detail trimmed to what the
    comparison uses, e.g. latency ``samples``). ``metrics``: keep only these metrics (recorded in the
    file; comparing against it then ignores the candidate's rows of other metrics)."""
    source = load_source(run_dir, "run")
    if not Path(run_dir).is_dir():
        raise ValueError(f"write_baseline needs a run directory, got {run_dir}")
    keep = set(metrics) if metrics is not None else None
    rows = []
    for row in source.rows:
        if keep is not None and row.get("metric") not in keep:
            continue
        rows.append({**{k: v for k, v in row.items() if k not in ("run_id",)}, "detail": _trim_detail(row.get("detail"))})
    env = RunStore(run_dir).read_meta("environment.json")
    env_summary = {k: env.get(k) for k in ("cpu", "cpu_count", "torch_threads", "gpus", "libraries", "git_commit", "platform") if k in env}
    out = Path(path)
    atomic_write_json(out, {"schema_version": SCHEMA_VERSION, "kind": "fractalbench-baseline",
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "source_run": str(run_dir), "suite": source.suite, "compare": source.compare,
                            "metrics": sorted(keep) if keep is not None else None,
                            "environment": env_summary, "rows": rows})
    return out


# ----- statistics ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RatioVerdict:
    """Outcome of a latency/memory comparison. ratio: candidate / baseline estimate; ratio_high:
    its upper confidence limit (None for ratio-only); p: one-sided p-value for "candidate larger"."""

    ratio: float
    ratio_high: float | None
    p: float | None
    method: str
    regression: bool
    improved: bool
    significant: bool


def _finite(values: Any) -> np.ndarray | None:
    if not isinstance(values, (list, tuple)):
        return None
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return None
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return arr if arr.size >= MIN_SAMPLES else None


def _pairwise_log_differences(cand: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, int, int]:
    """All log(c_i) - log(b_j) (sorted) and the two sample sizes used."""
    lc, lb = np.log(cand), np.log(base)
    if lc.size * lb.size > MAX_PAIRWISE:  # subsample deterministically; the estimate barely moves
        rng = np.random.default_rng(0)
        side = int(math.sqrt(MAX_PAIRWISE))
        lc = rng.choice(lc, min(side, lc.size), replace=False)
        lb = rng.choice(lb, min(side, lb.size), replace=False)
    return np.sort((lc[:, None] - lb[None, :]).ravel()), lc.size, lb.size


def compare_samples(baseline: Sequence[float], candidate: Sequence[float], ratio_threshold: float, p_value: float) -> RatioVerdict:
    """Mann-Whitney U (one-sided) + Hodges-Lehmann ratio with its upper confidence limit."""
    from scipy.stats import mannwhitneyu, norm

    base, cand = np.asarray(baseline, dtype=float), np.asarray(candidate, dtype=float)
    p_greater = float(mannwhitneyu(cand, base, alternative="greater").pvalue)
    p_less = float(mannwhitneyu(cand, base, alternative="less").pvalue)
    diffs, m, n = _pairwise_log_differences(cand, base)
    total = diffs.size
    ratio = float(np.exp(np.median(diffs)))
    # Distribution-free confidence limits of the shift: order statistics of the pairwise
    # differences at mn/2 -/+ z sigma_U (normal approximation of the U distribution).
    spread = norm.ppf(1 - p_value) * math.sqrt(m * n * (m + n + 1) / 12.0)
    hi_index = min(total - 1, int(math.ceil(total / 2 + spread)))
    lo_index = max(0, int(math.floor(total / 2 - spread)))
    high, low = float(np.exp(diffs[hi_index])), float(np.exp(diffs[lo_index]))
    regression = _flag(ratio, high, p_greater, ratio_threshold, p_value)
    improved = _flag(1 / ratio, 1 / low, p_less, ratio_threshold, p_value)
    return RatioVerdict(ratio, high, p_greater, "Mann-Whitney U", regression, improved, p_greater < p_value)


def compare_summaries(base: tuple[float, float, int], cand: tuple[float, float, int], ratio_threshold: float,
                      p_value: float) -> RatioVerdict:
    """(mean, std, n) on both sides: one-sided z-test on the log ratio of means (delta method)."""
    from scipy.stats import norm

    (mb, sb, nb), (mc, sc, nc) = base, cand
    ratio = mc / mb
    se = math.sqrt((sb / mb) ** 2 / nb + (sc / mc) ** 2 / nc)
    if se == 0:
        p = 0.0 if ratio > 1 else 1.0
        high = low = ratio
    else:
        z = math.log(ratio) / se
        p = float(norm.sf(z))
        high = ratio * math.exp(norm.ppf(1 - p_value) * se)
        low = ratio * math.exp(-norm.ppf(1 - p_value) * se)
    regression = _flag(ratio, high, p, ratio_threshold, p_value)
    improved = _flag(1 / ratio, 1 / low, 1 - p, ratio_threshold, p_value)
    return RatioVerdict(ratio, high, p, "z-test on mean (n, std)", regression, improved, p < p_value)


def _flag(ratio: float, high: float, p: float, threshold: float, p_value: float) -> bool:
    return p < p_value and high >= threshold and ratio > 1 + (threshold - 1) / 2


def compare_ratio(base_row: Mapping[str, Any], cand_row: Mapping[str, Any], ratio_threshold: float, p_value: float) -> RatioVerdict:
    """Choose the test by what the rows carry (samples, n/std, or neither) and apply it."""
    bs, cs = _finite(_detail(base_row.get("detail")).get("samples")), _finite(_detail(cand_row.get("detail")).get("samples"))
    if bs is not None and cs is not None:
        return compare_samples(bs, cs, ratio_threshold, p_value)
    stats = [_summary(base_row), _summary(cand_row)]
    if stats[0] and stats[1]:
        return compare_summaries(stats[0], stats[1], ratio_threshold, p_value)
    use_p50 = _num(base_row.get("p50")) and _num(cand_row.get("p50"))
    b = float(base_row["p50"] if use_p50 else base_row["value"])
    c = float(cand_row["p50"] if use_p50 else cand_row["value"])
    ratio = c / b if b else math.inf
    return RatioVerdict(ratio, None, None, f"ratio only ({'p50' if use_p50 else 'value'})", ratio > ratio_threshold,
                        ratio < 1 / ratio_threshold, False)


def _summary(row: Mapping[str, Any]) -> tuple[float, float, int] | None:
    if not (_num(row.get("value")) and _num(row.get("std")) and _num(row.get("n"))):
        return None
    mean, std, n = float(row["value"]), float(row["std"]), int(row["n"])
    return (mean, std, n) if n >= 2 and mean > 0 and std >= 0 else None


def exit_drift(base_counts: Sequence[float], cand_counts: Sequence[float]) -> float:
    """p-value of the chi-square test of homogeneity of two exit histograms (counts per exit);
    exits empty on both sides are dropped; 1.0 when fewer than two exits remain."""
    from scipy.stats import chi2_contingency

    k = max(len(base_counts), len(cand_counts))
    b = np.zeros(k)
    c = np.zeros(k)
    b[: len(base_counts)], c[: len(cand_counts)] = base_counts, cand_counts
    used = (b + c) > 0
    if used.sum() < 2 or b.sum() == 0 or c.sum() == 0:
        return 1.0
    return float(chi2_contingency(np.vstack([b[used], c[used]]), correction=False).pvalue)


# ----- matching rows ---------------------------------------------------------------------------------

def _num(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


def _detail(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        try:
            data = json.loads(value)
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}
    return {}


def _norm(name: str, value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "" if name not in ("batch_size", "exit", "threshold") else None
    if name in ("batch_size", "exit"):
        return int(value)
    if name == "threshold":
        return round(float(value), 9)
    return str(value)


def row_key(row: Mapping[str, Any]) -> tuple:
    """The identity of a row across runs (see the module docstring)."""
    metric = str(row.get("metric", ""))
    key = tuple(_norm(f, row.get(f)) for f in KEY_FIELDS)
    extra = tuple(_detail(row.get("detail")).get(k) for k in DETAIL_KEYS.get(metric, ()))
    return key + extra


def _index(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
    out: dict[tuple, Mapping[str, Any]] = {}
    for row in rows:
        out.setdefault(row_key(row), row)
    return out


# ----- comparison ------------------------------------------------------------------------------------

@dataclass
class MetricComparison:
    """One compared quantity. ``status``: ok, REGRESSION, improved, slower (significant but below
    the threshold), info, missing (baseline only) or new (candidate only)."""

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
        order = {REGRESSION: 0, SLOWER: 1, IMPROVED: 2, MISSING: 3, NEW: 4, OK: 5, INFO: 6}
        chosen = [r for r in self.results if not notable_only or r.status in (REGRESSION, SLOWER, IMPROVED, MISSING, NEW)]
        chosen.sort(key=lambda r: order.get(r.status, 9))
        out = []
        for r in chosen:
            k = r.key
            out.append([r.status, k.get("model", ""), k.get("dataset", ""), k.get("device", ""), _fmt(k.get("batch_size")),
                        _fmt(k.get("exit")), k.get("policy", ""), _fmt(k.get("threshold")), k.get("metric", ""),
                        _fmt(r.baseline), _fmt(r.candidate), r.change, "" if r.p_value is None else f"{r.p_value:.2g}", r.note])
        return out

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

        verdict = (f":x: **{len(self.regressions)} regression(s)**" if self.has_regression else ":white_check_mark: **no regressions**")
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


def _key_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    key = {f: _norm(f, row.get(f)) for f in KEY_FIELDS}
    d = _detail(row.get("detail"))
    for k in DETAIL_KEYS.get(str(row.get("metric", "")), ()):
        key[k] = d.get(k)
    if str(row.get("metric")) in DETAIL_KEYS:
        extra = ",".join(f"{k}={d.get(k)}" for k in DETAIL_KEYS[str(row["metric"])])
        key["metric"] = f"{row['metric']}[{extra}]"
    return key


def compare(baseline: Any, candidate: Any, thresholds: Thresholds | Mapping[str, Any] | None = None,
            **overrides: Any) -> Comparison:
    """Compare ``candidate`` with ``baseline`` (run directories, baseline files or row lists).

    Thresholds: the defaults, updated by the baseline's then the candidate's suite ``compare``
    section, then ``thresholds``, then keyword ``overrides`` (e.g. ``latency_ratio=1.5``)."""
    base, cand = load_source(baseline, "baseline"), load_source(candidate, "candidate")
    th = Thresholds().updated(base.compare).updated(cand.compare)
    th = th.updated(asdict(thresholds) if isinstance(thresholds, Thresholds) else thresholds).updated(overrides)
    warnings = []
    if base.suite.get("digest") and cand.suite.get("digest") and base.suite.get("digest") != cand.suite.get("digest"):
        warnings.append(f"the suites differ (baseline {base.suite.get('name')} {base.suite.get('digest')}, "
                        f"candidate {cand.suite.get('name')} {cand.suite.get('digest')}); only matching rows are compared")
    cand_rows = cand.rows
    if base.metrics is not None:  # a filtered baseline: the candidate's other metrics are not compared
        cand_rows = [r for r in cand.rows if r.get("metric") in base.metrics or r.get("metric") == "error"]
        if len(cand_rows) < len(cand.rows):
            warnings.append(f"the baseline keeps only {', '.join(sorted(base.metrics))}; "
                            f"{len(cand.rows) - len(cand_rows)} candidate rows of other metrics are not compared")
    results = _compare_rows(base.rows, cand_rows, th)
    if not any(r.status not in (MISSING, NEW) for r in results) and base.rows and cand.rows:
        warnings.append("no row of the candidate matches a row of the baseline (different models, datasets or devices?)")
    return Comparison(base.label, cand.label, th, results, warnings)


def _compare_rows(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]], th: Thresholds) -> list[MetricComparison]:
    results = _compare_errors(base_rows, cand_rows)
    plain_b = [r for r in base_rows if r.get("metric") not in DRIFT_METRICS | {"error"}]
    plain_c = [r for r in cand_rows if r.get("metric") not in DRIFT_METRICS | {"error"}]
    bi, ci = _index(plain_b), _index(plain_c)
    for key, brow in bi.items():
        crow = ci.get(key)
        if crow is None:
            results.append(MetricComparison(_key_dict(brow), _kind(brow), brow.get("value"), None, "", MISSING, note="not in candidate"))
            continue
        results.append(compare_pair(brow, crow, th))
    for key, crow in ci.items():
        if key not in bi:
            results.append(MetricComparison(_key_dict(crow), _kind(crow), None, crow.get("value"), "", NEW, note="not in baseline"))
    results.extend(_compare_histograms(base_rows, cand_rows, th))
    return results


def _kind(row: Mapping[str, Any]) -> str:
    m = row.get("metric")
    if m in ACCURACY_METRICS:
        return "accuracy"
    if m in EXACT_METRICS:
        return "exact"
    if m in LATENCY_METRICS:
        return "latency"
    if m in MEMORY_METRICS:
        return "memory"
    return "info"


def compare_pair(brow: Mapping[str, Any], crow: Mapping[str, Any], th: Thresholds) -> MetricComparison:
    """One matched pair of rows under the rules of the module docstring."""
    kind, key = _kind(brow), _key_dict(brow)
    b, c = brow.get("value"), crow.get("value")
    if crow.get("error") and not brow.get("error"):
        return MetricComparison(key, kind, b, None, "", REGRESSION if kind != "info" else INFO,
                                note=f"candidate measurement failed: {str(crow['error'])[:200]}")
    if not (_num(b) and _num(c)):
        return MetricComparison(key, kind, b, c, "", INFO, note="no value to compare")
    b, c = float(b), float(c)
    if kind == "accuracy":
        delta = c - b
        status = REGRESSION if delta < -th.accuracy_points else IMPROVED if delta > th.accuracy_points else OK
        return MetricComparison(key, kind, b, c, f"{delta:+.2f} pts", status,
                                note=f"drop > {th.accuracy_points:g} pts" if status == REGRESSION else "")
    if kind == "exact":
        status = OK if c == b else REGRESSION
        return MetricComparison(key, kind, b, c, f"{c - b:+,.0f}" if c != b else "0", status,
                                note="exact count changed" if status == REGRESSION else "")
    if kind in ("latency", "memory"):
        if b <= 0 or c <= 0:
            return MetricComparison(key, kind, b, c, "", INFO, note="non-positive value")
        limit = th.latency_ratio if kind == "latency" else th.memory_ratio
        v = compare_ratio(brow, crow, limit, th.p_value)
        status = REGRESSION if v.regression else IMPROVED if v.improved else SLOWER if v.significant and v.ratio > 1 else OK
        note = v.method
        if kind == "memory" and status == REGRESSION and str(brow.get("unit")) == "MiB" and c - b < MEMORY_FLOOR_MIB:
            status, note = OK, note + f"; growth {c - b:.2f} MiB is below the {MEMORY_FLOOR_MIB:g} MiB floor"
        if v.ratio_high is not None:
            note += f"; ratio upper limit {v.ratio_high:.3g}"
        if status == REGRESSION:
            note += f"; > x{limit:g}"
        return MetricComparison(key, kind, b, c, f"x{v.ratio:.3f}", status, v.p, note)
    change = f"{c - b:+.4g}" if c != b else "0"
    return MetricComparison(key, kind, b, c, change, INFO)


def _compare_errors(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]]) -> list[MetricComparison]:
    def cells(rows: list[dict[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
        return {tuple(_norm(f, r.get(f)) for f in ("model", "variant", "dataset", "device")): r
                for r in rows if r.get("metric") == "error"}

    def present(rows: list[dict[str, Any]]) -> set[tuple]:
        return {tuple(_norm(f, r.get(f)) for f in ("model", "variant", "dataset", "device")) for r in rows if r.get("metric") != "error"}

    berr, cerr, bok, cok = cells(base_rows), cells(cand_rows), present(base_rows), present(cand_rows)
    out = []
    for key, row in cerr.items():
        k = dict(zip(("model", "variant", "dataset", "device"), key), metric="error")
        message = str(row.get("error") or "unknown error")[:300]
        if key in berr:
            out.append(MetricComparison(k, "error", "failed", "failed", "", INFO, note=f"failed in both: {message}"))
        else:
            out.append(MetricComparison(k, "error", "ok" if key in bok else "", "failed", "", REGRESSION,
                                        note=f"candidate cell failed: {message}"))
    for key in berr.keys() - cerr.keys():
        k = dict(zip(("model", "variant", "dataset", "device"), key), metric="error")
        if key in cok:
            out.append(MetricComparison(k, "error", "failed", "ok", "", IMPROVED, note="failed in the baseline, runs now"))
        else:
            out.append(MetricComparison(k, "error", "failed", None, "", MISSING, note="failed in the baseline; not in candidate"))
    return out


def _histograms(rows: list[dict[str, Any]]) -> dict[tuple, dict[int, tuple[float, float | None]]]:
    out: dict[tuple, dict[int, tuple[float, float | None]]] = {}
    for row in rows:
        if row.get("metric") not in DRIFT_METRICS or not _num(row.get("value")) or row.get("exit") is None:
            continue
        key = tuple((f, _norm(f, row.get(f))) for f in KEY_FIELDS if f != "exit")
        count = _detail(row.get("detail")).get("count")
        if not _num(count):
            count = float(row["value"]) * float(row["n"]) if _num(row.get("n")) else None
        out.setdefault(key, {})[int(row["exit"])] = (float(row["value"]), None if count is None else float(count))
    return out


def _compare_histograms(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]], th: Thresholds) -> list[MetricComparison]:
    bh, ch = _histograms(base_rows), _histograms(cand_rows)
    out = []
    for key, bhist in bh.items():
        kd = dict(key)
        kd["metric"] = "exit histogram"
        chist = ch.get(key)
        exits = range(max(bhist) + 1)
        bfrac = "/".join(f"{bhist.get(k, (0.0, 0))[0]:.2f}" for k in exits)
        if chist is None:
            out.append(MetricComparison(kd, "exit_histogram", bfrac, None, "", MISSING, note="not in candidate"))
            continue
        exits = range(max(max(bhist), max(chist)) + 1)
        bfrac = "/".join(f"{bhist.get(k, (0.0, 0))[0]:.2f}" for k in exits)
        cfrac = "/".join(f"{chist.get(k, (0.0, 0))[0]:.2f}" for k in exits)
        bc = [bhist.get(k, (0.0, 0.0))[1] for k in exits]
        cc = [chist.get(k, (0.0, 0.0))[1] for k in exits]
        shift = max(abs(bhist.get(k, (0.0, 0))[0] - chist.get(k, (0.0, 0))[0]) for k in exits)
        if any(v is None for v in bc + cc):
            out.append(MetricComparison(kd, "exit_histogram", bfrac, cfrac, f"max {shift:+.3f}", INFO,
                                        note="no sample counts (n) to test drift"))
            continue
        p = exit_drift(bc, cc)
        status = REGRESSION if p < th.exit_drift_p_value else OK
        out.append(MetricComparison(kd, "exit_histogram", bfrac, cfrac, f"max |d| {shift:.3f}", status, p,
                                    "chi-square" + ("; exit histogram drifted" if status == REGRESSION else "")))
    for key in ch.keys() - bh.keys():
        kd = dict(key)
        kd["metric"] = "exit histogram"
        out.append(MetricComparison(kd, "exit_histogram", None, "", "", NEW, note="not in baseline"))
    return out


# ----- command line --------------------------------------------------------------------------------

def compare_main(baseline: Path | str, candidate: Path | str, markdown: Path | str | None = None, *,
                 thresholds: Mapping[str, Any] | None = None, verbose: bool = False, stream: TextIO | None = None) -> int:
    """Compare, print the table of notable differences (all with ``verbose``), optionally write the
    Markdown, and return 1 when there is a regression, 0 otherwise. Bad paths raise ValueError."""
    result = compare(baseline, candidate, thresholds)
    out = stream or sys.stdout
    print(result.format_text(notable_only=not verbose), file=out)
    if markdown is not None:
        from harness.results import atomic_write_text

        atomic_write_text(Path(markdown), result.to_markdown())
    return 1 if result.has_regression else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reports.compare``: ``baseline RUN OUT.json`` writes a committed baseline;
    ``compare BASELINE CANDIDATE`` compares with thresholds from the command line."""
    parser = argparse.ArgumentParser(prog="python -m reports.compare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("baseline", help="write a committed baseline file from a run directory")
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--metrics", nargs="+", default=None)
    p = sub.add_parser("compare", help="compare two runs or a baseline file and a run; exit 1 on a regression")
    p.add_argument("baseline", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--all", action="store_true", help="print every compared metric, not only the changes")
    for name in Thresholds.names():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, dest=name)
    args = parser.parse_args(argv)
    try:
        if args.command == "baseline":
            path = write_baseline(args.run, args.out, metrics=args.metrics)
            print(f"baseline: {path}")
            return 0
        given = {n: getattr(args, n) for n in Thresholds.names()}
        return compare_main(args.baseline, args.candidate, args.markdown, thresholds=given, verbose=args.all)
    except ValueError as exc:
        print(f"fractalbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
