"""Several seeds: averaged rows with their spread, the per-seed table, and seed groups in compare."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fractalbench.harness.results import make_row
from fractalbench.reports import tables
from fractalbench.reports._compare_stats import seed_group_test
from fractalbench.reports.compare import REGRESSION, compare
from fractalbench.reports.seeds import aggregate_seeds, seed_table


def _rows(values, metric="top1", exit=0, model="m", **extra):
    return [make_row(metric, v, "%", model=model, variant=model, dataset="d", device="cpu", exit=exit, split="test",
                     n=1000, seed=seed, cell_id=f"{model}__d__cpu__seed{seed}", **extra)
            for seed, v in enumerate(values)]


def _frame(rows):
    frame = pd.DataFrame(rows)
    frame["run"], frame["label"], frame["kind"] = "r", frame["model"], "static"
    for col in ("policy", "detail", "error", "unit", "split", "variant"):
        frame[col] = frame[col].fillna("").astype(str)
    return frame


def test_rows_over_seeds_become_their_mean_with_the_spread():
    frame = _frame(_rows([80.0, 82.0, 84.0]) + _rows([70.0], model="single"))
    out = aggregate_seeds(frame).set_index("model")
    assert out.loc["m", "value"] == pytest.approx(82.0) and out.loc["m", "seed_std"] == pytest.approx(2.0)
    assert out.loc["m", "seeds"] == 3 and math.isnan(out.loc["m", "seed"])
    ci = [make_row("top1", v, "%", n=1000)["ci_low"] for v in (80.0, 82.0, 84.0)]
    assert out.loc["m", "ci_low"] == pytest.approx(np.mean(ci))  # the mean per-seed interval
    assert out.loc["single", "value"] == 70.0 and out.loc["single", "seeds"] == 1
    assert math.isnan(out.loc["single", "seed_std"])


def test_one_seed_frames_are_left_as_they_are():
    frame = _frame(_rows([80.0]))
    out = aggregate_seeds(frame)
    assert out["value"].tolist() == [80.0] and out["seeds"].tolist() == [1]


def test_welch_over_seeds_matches_scipy():
    base, cand = [80.0, 82.0, 84.0], [70.0, 71.0, 72.0]
    test = seed_group_test(base, cand, 0.01)
    ref = stats.ttest_ind(cand, base, equal_var=False, alternative="less")
    assert test.diff == pytest.approx(-11.0) and test.p_worse == pytest.approx(ref.pvalue)
    se = math.sqrt(4 / 3 + 1 / 3)  # var 4 and 1 over 3 seeds each
    df = (5 / 3) ** 2 / ((4 / 3) ** 2 / 2 + (1 / 3) ** 2 / 2)
    assert test.high == pytest.approx(-11.0 + stats.t.ppf(0.99, df) * se)


def test_a_single_run_against_a_seed_group_uses_the_prediction_interval():
    test = seed_group_test([80.0, 82.0, 84.0], [76.0], 0.05)
    t = (76.0 - 82.0) / (2.0 * math.sqrt(1 + 1 / 3))
    assert test.p_worse == pytest.approx(stats.t.cdf(t, 2))


def test_compare_of_seed_groups():
    base = _rows([80.0, 82.0, 84.0])
    same = _rows([81.0, 83.0, 82.5])
    result = compare(base, same)
    row = next(r for r in result.results if r.key["metric"] == "top1")
    assert row.status != REGRESSION and "Welch t-test over seeds (3 vs 3 seeds)" in row.note
    worse = compare(base, _rows([70.0, 71.0, 72.0]))
    row = next(r for r in worse.results if r.key["metric"] == "top1")
    assert row.status == REGRESSION and row.baseline == pytest.approx(82.0) and row.candidate == pytest.approx(71.0)


def test_report_of_a_several_seed_run(tmp_path):
    from fractalbench.harness.runner import run_suite
    from fractalbench.harness.suites import parse_suite
    from fractalbench.reports.html import write_report

    raw = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}], "models": ["linear"],
           "train": {"epochs": 1}, "metrics": ["accuracy"], "seeds": [0, 1, 2]}
    run_suite(parse_suite(raw, "t.yaml"), tmp_path)
    runs = tables.load_runs([tmp_path])
    per_seed = tables.combined_rows(runs, per_seed=True)
    top1 = per_seed[per_seed.metric == "top1"].sort_values("seed").value
    summary = tables.summary_table(tables.combined_rows(runs))
    assert summary["top1 %"].iloc[0] == pytest.approx(top1.mean())
    assert summary["top1 sd over seeds"].iloc[0] == f"{top1.std(ddof=1):.2f} (3 seeds)"
    seeds = seed_table(per_seed)
    assert seeds["seed"].tolist() == [0, 1, 2] and seeds["top1 %"].tolist() == top1.tolist()
    html = write_report(tmp_path).read_text()
    assert "Seeds: per-seed accuracy and the spread" in html and "sd over seeds" in html
