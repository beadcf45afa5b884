import math

import pytest

from fractalbench.harness.results import load_run, make_row
from fractalbench.harness.runner import run_suite
from fractalbench.harness.stats import accuracy_interval, wilson_interval
from fractalbench.harness.suites import parse_suite


def test_wilson_interval_by_hand():
    # 90 of 100: p = 0.9, z^2 = 3.8415: centre (0.9 + 0.019207) / 1.038415 = 0.885200,
    # half 1.96 * sqrt(0.0009 + 0.00009604) / 1.038415 = 0.059570 -> (0.8256, 0.9448)
    low, high = wilson_interval(90, 100)
    assert (round(low, 4), round(high, 4)) == (0.8256, 0.9448)
    # none or all right: the bounds are z^2 / (n + z^2) from the end (10 samples: 0.2775)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.8415 / 13.8415), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((1 - 3.8415 / 13.8415, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # it narrows as 1 / sqrt(n): 9,000 of 10,000 -> about +-0.59 points
    low, high = accuracy_interval(90.0, 10_000)
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(0.09 / 10_000) * 100, rel=1e-3)
    with pytest.raises(ValueError, match="need 0 <= successes <= n"):
        wilson_interval(11, 10)


def test_accuracy_rows_get_their_interval_and_other_rows_do_not():
    row = make_row("top1", 90.0, "%", n=100, split="test")
    assert (round(row["ci_low"], 2), round(row["ci_high"], 2)) == (82.56, 94.48)
    assert make_row("top1", 90.0, "%")["ci_low"] is None  # no sample count, no interval
    assert make_row("macs", 5.0, "MACs", n=100)["ci_low"] is None


def test_every_accuracy_row_of_a_run_has_n_and_its_interval(tmp_path):
    raw = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}], "train": {"epochs": 1, "batch_size": 64},
           "models": ["resnet20", "branchynet_resnet20",
                      {"name": "fractalnet20", "kwargs": {"widths": [8, 8, 8, 8, 8]}}],
           "metrics": ["accuracy", "sweep"], "budgets": [0.5]}
    assert run_suite(parse_suite(raw, "t.yaml"), tmp_path).failed == []
    frame = load_run(tmp_path)
    acc = frame[frame.metric.isin(["top1", "top5", "top1_full", "policy_top1"])]
    assert set(acc.metric) == {"top1", "top5", "top1_full", "policy_top1"} and len(acc) > 20
    assert (acc.n > 0).all() and acc.ci_low.notna().all()
    for row in acc.itertuples():
        assert (row.ci_low, row.ci_high) == pytest.approx(accuracy_interval(row.value, int(row.n)))
        assert row.ci_low <= row.value <= row.ci_high
