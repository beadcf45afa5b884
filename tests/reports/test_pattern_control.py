"""Each fractal pattern against the uniform control (fractalbench.reports.pattern_control), on a run directory
written by hand: counts, p-values and intervals computed by hand in the comments."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fractalbench.harness.outcomes import CellOutcomes, outcomes_path
from fractalbench.harness.results import CellRecord, RunStore, make_row, open_run
from fractalbench.reports.html import write_report
from fractalbench.reports.pattern_control import control_table

N = 100
MACS = 18_766_904.0


def _cell(store: RunStore, pattern: str | None, correct: np.ndarray | None, seed: int = 0, top1: float | None = None,
          model: str = "fractalbrainnet_small") -> str:
    label = f"fbn_{pattern}_s{seed}" if pattern else f"fbn_default_s{seed}"
    cell_id = f"{label}__cifar10__cpu"
    fields = {"cell_id": cell_id, "model": label, "variant": model, "dataset": "cifar10", "device": "cpu",
              "seed": seed, "run_id": "r", "suite": "fractal_patterns"}
    value = 100.0 * correct.mean() if correct is not None else top1
    rows = [make_row("top1", value, "%", split="test", n=N, exit=0, **fields),
            make_row("macs", MACS, "MACs", exit=0, **fields)]
    kwargs = {"fractal_pattern": pattern} if pattern else {}
    meta = {"model": model, "kwargs": kwargs, "dataset": "cifar10", "device": "cpu", "seed": seed}
    store.write_cell(CellRecord(cell_id, "ok", rows, "", meta))
    if correct is not None:
        outcomes = CellOutcomes(np.arange(N) % 10)
        outcomes.add("top1", correct, exit=0)
        outcomes.save(outcomes_path(store.run_dir, cell_id))
    return cell_id


def _bits(*ranges: tuple[int, int]) -> np.ndarray:
    out = np.zeros(N, bool)
    for lo, hi in ranges:
        out[lo:hi] = True
    return out


@pytest.fixture
def run_dir(tmp_path):
    store = RunStore(tmp_path / "run")
    store.run_dir.mkdir()
    (store.run_dir / "cells").mkdir()
    store.write_meta("suite.json", {"name": "fractal_patterns"})
    _cell(store, "uniform", _bits((0, 60)))                 # control: 60 right
    _cell(store, "sierpinski", _bits((0, 50), (60, 70)))    # b = 10 (50..59), c = 10 (60..69)
    _cell(store, "julia", _bits((0, 70)))                   # b = 0, c = 10
    _cell(store, "cantor", None, top1=55.0)                 # no outcomes: unpaired
    _cell(store, "mandelbrot", _bits((0, 40)), seed=1)      # another seed: no control of its own
    _cell(store, None, _bits((0, 30)))                      # pattern not named: not in the study
    store.write_tables()
    return store.run_dir


def test_each_pattern_is_tested_against_the_uniform_control(run_dir):
    table = control_table([open_run(run_dir)]).set_index("pattern")
    assert table.index[0] == "uniform"  # the control first, then the others in cell order
    assert sorted(table.index) == ["cantor", "julia", "sierpinski", "uniform"]  # seed 1 and the unnamed cell left out
    assert table.loc["uniform", "vs control (points)"] == "control"
    assert table.loc["uniform", "top1 %"] == 60.0 and table.loc["uniform", "MACs"] == MACS

    # sierpinski: b = c = 10, difference 0, McNemar two-sided p = 1
    assert table.loc["sierpinski", "b / c"] == "10 / 10"
    assert table.loc["sierpinski", "vs control (points)"] == 0.0
    assert table.loc["sierpinski", "p (two-sided)"] == 1.0

    # julia: b = 0, c = 10: one-sided P(X >= 10 | m = 10) = 2**-10, two-sided 2**-9
    julia = table.loc["julia"]
    assert julia["b / c"] == "0 / 10" and julia["vs control (points)"] == 10.0
    assert julia["p (two-sided)"] == pytest.approx(2.0 ** -9, rel=1e-12)
    # the interval: share of discordant pairs lost s = 0/10, its Wilson upper limit at z = 1.96 is
    # z^2 / (10 + z^2); difference = 10 (1 - 2 s): low = 10 (1 - 2 * 0.27754) = 4.45, high = 10
    z2 = 1.959963984540054 ** 2
    assert julia["95 % interval of the difference"] == f"{10 * (1 - 2 * z2 / (10 + z2)):+.2f} to +10.00"
    assert julia["95 % interval of the difference"] == "+4.45 to +10.00"
    assert julia["test"] == "McNemar exact, paired"

    # cantor has no outcomes: Newcombe's interval and the z-test on 55/100 against 60/100
    cantor = table.loc["cantor"]
    assert cantor["b / c"] == "" and cantor["test"].startswith("Newcombe") and cantor["vs control (points)"] == -5.0
    q = 115 / 200
    z = (0.55 - 0.60) / math.sqrt(q * (1 - q) * (2 / N))
    from scipy.stats import norm
    assert cantor["p (two-sided)"] == pytest.approx(2 * norm.cdf(z), rel=1e-9)

    # Holm over the three patterns: julia's 2**-9 x 3; cantor's x 2 (capped by what follows); sierpinski 1
    assert julia["p Holm"] == pytest.approx(3 * 2.0 ** -9, rel=1e-12)
    assert cantor["p Holm"] == pytest.approx(max(3 * 2.0 ** -9, min(1.0, 2 * 2 * norm.cdf(z))), rel=1e-9)
    assert table.loc["sierpinski", "p Holm"] == 1.0


def test_no_control_means_no_table(tmp_path):
    store = RunStore(tmp_path / "run")
    (store.run_dir / "cells").mkdir(parents=True)
    _cell(store, "julia", _bits((0, 70)))
    _cell(store, "cantor", _bits((0, 60)))
    assert control_table([open_run(store.run_dir)]).empty


def test_the_report_shows_the_control_table(run_dir):
    page = write_report(run_dir).read_text()
    assert "against the uniform control" in page
    table = (run_dir / "report" / "pattern_control.csv").read_text()
    assert "julia" in table and "0 / 10" in table


def test_patterns_run_with_seeds_get_a_welch_row_over_seeds(tmp_path):
    store = RunStore(tmp_path / "run")
    (store.run_dir / "cells").mkdir(parents=True)
    for seed, control, julia in ((0, 60, 70), (1, 62, 66)):
        _cell(store, "uniform", _bits((0, control)), seed=seed)
        _cell(store, "julia", _bits((0, julia)), seed=seed)
    table = control_table([open_run(store.run_dir)])
    assert list(table["seed"]) == [0, 0, 1, 1, "mean of 2", "mean of 2"]  # per seed, paired; then over seeds
    over = table.set_index(["pattern", "seed"]).loc[("julia", "mean of 2")]
    # means 61 vs 68; variances of the means 2/2 = 1 and 8/2 = 4: se = sqrt 5, Welch df = 25 / 17
    from scipy.stats import t as student
    se, df = math.sqrt(5.0), 25.0 / 17.0
    assert over["vs control (points)"] == 7.0 and over["top1 %"] == 68.0 and over["95 % interval"] == "sd 2.83"
    assert over["p (two-sided)"] == pytest.approx(2 * student.sf(7.0 / se, df), rel=1e-9)
    half = student.ppf(0.975, df) * se
    assert over["95 % interval of the difference"] == f"{7 - half:+.2f} to {7 + half:+.2f}"
    assert over["test"].startswith("Welch") and over["label"] == "fbn_julia_s1 (over seeds)"
    control = table.set_index(["pattern", "seed"]).loc[("uniform", "mean of 2")]
    assert control["top1 %"] == 61.0 and control["95 % interval"] == "sd 1.41"
