"""Small run directories written with ``fractalbench.harness.results`` (RunStore/make_row), no training.

``build_run(path, **options)`` writes a run with one cell per model kind: a static ResNet, an
early-exit BranchyNet (threshold sweep, budget point, exit histograms, per-exit latency, a policy
stream), a gated SkipNet, a routed MoE, a FractalBrainNet with pattern artifacts, and a failed
cell. Latency rows carry their per-call samples in ``detail["samples"]`` (ms) drawn from
``latency_samples``: a noise model fitted to this 2-core shared machine (see that function).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fractalbench.harness.metrics import summarize
from fractalbench.harness.results import CellRecord, RunStore, make_row


def latency_samples(rng: np.random.Generator, median_ms: float, n: int) -> np.ndarray:
    """Per-call timings like a small CNN at batch 1 on this machine (measured: robust log-sigma
    0.02-0.17, p90/p50 1.1-1.4, p99/p50 1.2-1.9): a lognormal core (sigma 0.06) plus 10% of calls
    hit by interference (x 1 + Exp(0.35))."""
    core = median_ms * np.exp(rng.normal(0.0, 0.06, n))
    hit = rng.random(n) < 0.10
    return core * np.where(hit, 1.0 + rng.exponential(0.35, n), 1.0)


def latency_row(rng, median_ms: float, n: int, factor: float = 1.0, samples: bool = True,
                description: str | None = None, **fields: Any) -> dict:
    """A latency row; a policy stream's row carries the operating point's own ``policy`` and
    ``threshold`` (as its policy_top1 and expected_macs rows do) and the policy's description
    (``ExitPolicy.describe()``) in ``detail.policy_description``."""
    times = latency_samples(rng, median_ms, n) * factor
    s = summarize(times.tolist())
    detail = {"threads": 1, "timing": "perf_counter_ns"}
    if description is not None:
        detail["policy_description"] = description
    if samples:
        detail["samples"] = times.tolist()
    return make_row("latency", s.mean, "ms", **fields, **s.row_stats(), detail=detail)


CARDS = {
    "resnet20": {"family": "resnet", "dynamic_kind": "static",
                 "reference": {"params": 0.27e6, "macs": 40.8e6, "top1_cifar10": 91.25},
                 "reference_source": "He et al. 2016, table 6"},
    "branchynet": {"family": "branchynet", "dynamic_kind": "early_exit", "reference": {"backbone_params": 0.27e6}},
    "skipnet": {"family": "skipnet", "dynamic_kind": "gated", "reference": {}},
    "moe": {"family": "moe", "dynamic_kind": "routed", "reference": {}},
    "fractalbrainnet": {"family": "fractalbrainnet", "dynamic_kind": "static", "reference": {"params": 1.1e6}},
}
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _exit_fractions(t: float, shift: float) -> list[float]:
    f0 = max(0.02, min(0.9, 1.05 - t)) - shift
    f1 = (1 - f0) * 0.6
    return [f0, f1, 1 - f0 - f1]


@dataclass
class Cell:
    """What every model's rows share: the row fields, the latency row maker and the shifts."""

    f: dict[str, Any]
    lat: Callable[..., dict]
    top1_shift: float
    macs_delta: int
    exit_shift: float
    memory_factor: float


def model_rows(model: str, rng, *, label: str | None = None, latency_factor: float = 1.0, top1_shift: float = 0.0,
               macs_delta: int = 0, exit_shift: float = 0.0, n_lat: int = 100, samples: bool = True,
               memory_factor: float = 1.0, dataset: str = "digits16", device: str = "cpu") -> list[dict]:
    f = {"model": label or model, "variant": model, "dataset": dataset, "device": device, "suite": "smoke",
         "cell_id": f"{model}__{dataset}__{device}"}
    lat = lambda med, **kw: latency_row(rng, med, n_lat, latency_factor, samples, **f, **kw)  # noqa: E731
    cell = Cell(f, lat, top1_shift, macs_delta, exit_shift, memory_factor)
    makers = {"resnet20": _static_rows, "fractalbrainnet": _static_rows, "branchynet": _branchynet_rows,
              "skipnet": _skipnet_rows, "moe": _moe_rows}
    if model not in makers:
        raise ValueError(model)
    return makers[model](model, cell)


def _static_rows(model: str, c: Cell) -> list[dict]:
    f, lat = c.f, c.lat
    params, macs, top1 = (269722, 40_550_400, 91.2) if model == "resnet20" else (1_093_000, 120_000_000, 93.0)
    rows = [make_row("params", params, "count", **f),
            make_row("macs", macs + c.macs_delta, "MACs", exit=0, batch_size=1, **f),
            make_row("flops", 2 * (macs + c.macs_delta), "FLOPs", exit=0, batch_size=1, **f),
            make_row("top1", top1 + c.top1_shift, "%", exit=0, split="test", n=1000, **f),
            make_row("top5", 99.5, "%", exit=0, split="test", n=1000, **f),
            make_row("train_seconds", 12.5, "s", split="train", **f),
            make_row("train_loss_ce", 0.31, "nats", split="train", **f),
            lat(2.0 if model == "resnet20" else 5.0, exit=0, batch_size=1),
            lat(9.0 if model == "resnet20" else 20.0, exit=0, batch_size=8),
            make_row("memory_peak_activations", 3.2 * c.memory_factor, "MiB", exit=0, batch_size=1, **f),
            make_row("memory_weights", params * 4 / 2**20, "MiB", **f),
            make_row("energy_meter", 0, "count", **f, detail={"source": "rapl", "reason": "no RAPL counters here"})]
    if model == "fractalbrainnet":
        rows += [make_row("pattern_complexity", 0.5 + 0.3 * k, "nats", exit=k, split="test", **f) for k in range(3)]
        rows.append(make_row("hierarchy_score", 0.72, "score", split="test", **f, detail={"correlation": 0.8}))
    return rows


def _branchynet_rows(model: str, c: Cell) -> list[dict]:
    """Three exits, a confidence sweep (grid points scored on test), a budget fit (fitted on
    validation), two policy streams and their latency predictions."""
    f, lat = c.f, c.lat
    exit_macs = [10_000_000 + c.macs_delta, 25_000_000 + c.macs_delta, 40_000_000 + c.macs_delta]
    rows = [make_row("params", 300_000, "count", **f)]
    for k, (m, a, t) in enumerate(zip(exit_macs, (80.0, 89.0, 92.5), (0.6, 1.3, 2.1))):
        rows += [make_row("macs", m, "MACs", exit=k, batch_size=1, **f),
                 make_row("flops", 2 * m, "FLOPs", exit=k, batch_size=1, **f),
                 make_row("top1", a + c.top1_shift, "%", exit=k, split="test", n=1000, **f),
                 lat(t, exit=k, batch_size=1)]
    for t in THRESHOLDS:
        fr = _exit_fractions(t, c.exit_shift)
        emacs = sum(p * m for p, m in zip(fr, exit_macs))
        acc = sum(p * a for p, a in zip(fr, (84.0, 90.0, 92.5))) + c.top1_shift
        pf = {"policy": "confidence", "threshold": t, **f}
        rows += [make_row("policy_top1", acc, "%", split="test", n=1000, **pf,
                          detail={"fitted_on": "none (grid point)"}),
                 make_row("expected_macs", emacs, "MACs", n=1000, batch_size=1, **pf)]
        rows += [make_row("exit_fraction", p, "fraction", exit=k, n=1000, batch_size=1, **pf,
                          detail={"count": round(p * 1000)})
                 for k, p in enumerate(fr)]
    budget = {"policy": "confidence@budget0.5", **f}
    rows += [make_row("policy_top1", 88.0 + c.top1_shift, "%", split="test", n=1000, **budget,
                      detail={"fitted_on": "validation", "thresholds": [0.8, 0.85]}),
             make_row("expected_macs", 20_000_000, "MACs", n=1000, batch_size=1, **budget),
             lat(1.2, policy="confidence", threshold=0.9, batch_size=1, description="confidence[0.9]"),
             lat(1.1, policy="confidence@budget0.5", batch_size=1, description="confidence[0.8,0.85]"),
             make_row("latency_predicted", 1.15, "ms", policy="confidence", threshold=0.9, batch_size=1, n=100,
                      **f, detail={"policy_description": "confidence[0.9]"}),
             make_row("latency_predicted", 0.95, "ms", policy="confidence@budget0.5", batch_size=1, n=100,
                      **f, detail={"policy_description": "confidence[0.8,0.85]"}),
             make_row("memory_peak_activations", 1.5 * c.memory_factor, "MiB", exit=2, batch_size=1, **f)]
    return rows


def _skipnet_rows(model: str, c: Cell) -> list[dict]:
    f, lat = c.f, c.lat
    rows = [make_row("params", 500_000, "count", **f),
            make_row("macs", 38_000_000 + c.macs_delta, "MACs", exit=0, batch_size=1, **f),
            make_row("top1", 89.0 + c.top1_shift, "%", exit=0, split="test", n=1000, **f),
            make_row("policy_top1", 88.5 + c.top1_shift, "%", policy="gates", split="test", n=1000, **f),
            make_row("expected_macs", 30_000_000, "MACs", policy="gates", n=1000, batch_size=1, **f),
            lat(1.8, exit=0, batch_size=1), lat(1.5, policy="gates", batch_size=1, description="default")]
    return rows + [make_row("gate_rate", r, "fraction", policy="gates", n=1000, **f, detail={"gate": g})
                   for g, r in enumerate((0.9, 0.6, 0.3))]


def _moe_rows(model: str, c: Cell) -> list[dict]:
    f, lat = c.f, c.lat
    rows = [make_row("params", 800_000, "count", **f), make_row("params_active", 350_000, "count", **f),
            make_row("macs", 22_000_000 + c.macs_delta, "MACs", exit=0, batch_size=1, **f),
            make_row("top1", 87.0 + c.top1_shift, "%", exit=0, split="test", n=1000, **f),
            make_row("policy_top1", 87.0 + c.top1_shift, "%", policy="router", split="test", n=1000, **f),
            make_row("expected_macs", 15_000_000, "MACs", policy="router", n=1000, batch_size=1, **f),
            lat(1.4, exit=0, batch_size=1), lat(1.3, policy="router", batch_size=1, description="default")]
    for layer in range(2):
        loads = np.array([0.4, 0.3, 0.2, 0.1]) if layer == 0 else np.array([0.25, 0.25, 0.25, 0.25])
        rows += [make_row("expert_load", v, "fraction", policy="router", n=16000, **f,
                          detail={"layer": layer, "expert": e, "count": int(v * 16000), "dropped": 0})
                 for e, v in enumerate(loads)]
        rows.append(make_row("tokens_dropped", 0.125 * layer, "fraction", policy="router", n=16000, **f,
                             detail={"layer": layer, "count": 2000 * layer, "routable": 16000}))
    rows += [make_row("energy_meter", 1, "count", **f, detail={"source": "rapl", "domains": ["intel-rapl:0"]}),
             make_row("energy_per_sample", 0.004, "J", policy="router", batch_size=1, n=100, **f,
                      detail={"path": "policy stream", "net_j_per_sample": 0.003, "idle_w": 20.0, "seconds": 0.2,
                              "source": "rapl"}),
             make_row("expert_macs_useful", 6_000_000, "MACs", policy="router", n=1000, **f),
             make_row("expert_macs_padded", 8_000_000, "MACs", policy="router", n=1000, **f),
             make_row("expert_utilization", 0.75, "fraction", policy="router", n=1000, **f)]
    return rows


def foreign_row(metric: str, value: float, unit: str, **fields: Any) -> dict:
    """A row of a metric the catalogue does not know (as a newer build might write): make_row
    refuses it, so it is written around make_row."""
    return {**make_row("params", value, "count", **fields), "metric": metric, "unit": unit}


def extra_rows(model: str) -> list[dict]:
    """Rows only some runs carry: cross-checks (fvcore MACs, latency timer ratio) and a metric
    unknown to the catalogue, on the static ResNet."""
    if model != "resnet20":
        return []
    f = {"model": model, "variant": model, "dataset": "digits16", "device": "cpu", "suite": "smoke",
         "cell_id": f"{model}__digits16__cpu"}
    return [make_row("macs_fvcore", 40_550_400, "MACs", exit=0, batch_size=1, **f),
            make_row("latency_timer_ratio", 1.03, "ratio", exit=0, batch_size=1, **f),
            foreign_row("brand_new_metric", 1.5, "zz", **f)]


def write_patterns(folder: Path) -> None:
    import matplotlib.image

    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[-1.5:1.5:64j, -2:1:64j]
    c, z, it = x + 1j * y, np.zeros((64, 64), complex), np.zeros((64, 64))
    for _ in range(20):
        z = np.where(abs(z) < 2, z * z + c, z)
        it += abs(z) < 2
    np.save(folder / "pattern_mandelbrot.npy", (it / it.max()).astype(np.float32))
    sierpinski = (np.indices((32, 32)).prod(0) % 3 == 0).astype(float)
    matplotlib.image.imsave(folder / "pattern_sierpinski.png", sierpinski, cmap="gray")


def build_run(path: Path, *, models: tuple[str, ...] = ("resnet20", "branchynet", "skipnet", "moe", "fractalbrainnet"),
              failed: bool = True, seed: int = 0, labels: dict[str, str] | None = None, suite_name: str = "smoke",
              compare: dict[str, float] | None = None, error_text: str = "RuntimeError: out of memory",
              extra: bool = False, **options: Any) -> Path:
    """A run directory at ``path`` (see the module docstring); ``options`` go to ``model_rows``;
    ``extra``: add :func:`extra_rows`."""
    rng = np.random.default_rng(seed)
    store = RunStore(path)
    path.mkdir(parents=True, exist_ok=True)
    content = {"name": suite_name, "models": [{"name": m} for m in models], "metrics": ["accuracy", "cost", "latency"]}
    if compare:
        content["compare"] = compare
    store.write_meta("suite.json", {"name": suite_name, "path": "suites/smoke.yaml", "digest": "abc123",
                                    "content": content})
    store.write_meta("environment.json", {"hostname": "test", "cpu": "Test CPU", "cpu_count": 2, "torch_threads": 1,
                                          "libraries": {"torch": "2.x"}, "git_commit": "deadbeef", "gpus": []})
    for model in models:
        label = (labels or {}).get(model)
        rows = model_rows(model, rng, label=label, **options)
        if extra:
            rows += [{**r, "model": label or model} for r in extra_rows(model)]
        cell_id = rows[0]["cell_id"]
        card = {"paper": "x", "notes": "", **CARDS[model]}
        meta = {"model": model, "dataset": "digits16", "device": "cpu", "card": card}
        store.write_cell(CellRecord(cell_id, "ok", rows, meta=meta))
        if model == "fractalbrainnet":
            write_patterns(store.artifact_dir(cell_id))
    if failed:
        f = {"model": (labels or {}).get("broken", "broken"), "variant": "broken", "dataset": "digits16",
             "device": "cpu", "cell_id": "broken__digits16__cpu"}
        meta = {"model": "broken", "traceback": "Traceback (most recent call last):\n  ..."}
        rows = [make_row("error", None, "", error=error_text, **f)]
        store.write_cell(CellRecord("broken__digits16__cpu", "error", rows, error_text, meta))
    store.write_tables()
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return build_run(tmp_path / "run_a")


EVIL_LABEL = "<script>alert(1)</script>"
EVIL_ERROR = '<img src=x onerror="alert(2)"> & more'
EVIL_SUITE = "smoke<b>bold</b>"


@pytest.fixture(scope="session")
def reported_run(tmp_path_factory) -> tuple[Path, Path]:
    """A full run whose labels, suite name and error text try to inject HTML, and its report
    (written once per session: (run directory, report.html))."""
    from fractalbench.reports.html import write_report

    run = build_run(tmp_path_factory.mktemp("reported") / "run_evil", labels={"resnet20": EVIL_LABEL},
                    error_text=EVIL_ERROR, suite_name=EVIL_SUITE, extra=True)
    return run, write_report([run])
