"""Per-sample outcomes: stored for every accuracy row, equal to the row, loadable in one call."""
import json

import numpy as np
import pytest

from fractalbench.harness.outcomes import CellOutcomes, OutcomesError, load_outcomes, load_run_outcomes, sample_digest
from fractalbench.harness.results import export_run, load_run
from fractalbench.harness.runner import run_suite
from fractalbench.harness.suites import parse_suite


def suite(models, metrics=("accuracy", "sweep", "cost"), **extra):
    raw = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}], "models": models,
           "train": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 3}, "metrics": list(metrics),
           "budgets": [0.5], **extra}
    return parse_suite(raw, "t.yaml")


def test_round_trip_keeps_bits_exits_and_keys(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    out = CellOutcomes(labels)
    right = labels % 2 == 1
    out.add("top1", right, exit=0)
    out.add("policy_top1", ~right, policy="confidence", threshold=0.9, exit_index=np.arange(11) % 3)
    back = CellOutcomes.load(out.save(tmp_path / "o.npz"))
    assert back.n == 11 and back.digest == out.digest == sample_digest(labels)
    np.testing.assert_array_equal(back.get("top1", exit=0).correct, right)
    point = back.get("policy_top1", "confidence", 0.9000000000001)  # matched to 9 digits, like rows
    np.testing.assert_array_equal(point.correct, ~right)
    np.testing.assert_array_equal(point.exit_index, np.arange(11) % 3)
    assert back.get("top1", exit=0).exit_index is None and back.get("top1", exit=1) is None
    assert back.get("top1", exit=0).accuracy == pytest.approx(100 * 8 / 11)  # 3 1 1 5 9 3 5 5 are odd


def test_digest_changes_with_order_and_size():
    labels = np.array([0, 1, 2, 3])
    assert sample_digest(labels) != sample_digest(labels[::-1]) != sample_digest(labels[:3])


def test_bad_outcomes_are_refused(tmp_path):
    out = CellOutcomes(np.zeros(4, dtype=int))
    with pytest.raises(OutcomesError, match="has 3 samples; the split has 4"):
        out.add("top1", [True, False, True], exit=0)
    with pytest.raises(OutcomesError, match="not 'latency'"):
        out.add("latency", [True] * 4)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(OutcomesError, match="bad.npz is unreadable"):
        CellOutcomes.load(bad)


def _accuracy_rows(frame):
    return frame[frame.metric.isin(["top1", "top5", "top1_full", "policy_top1"]) & (frame.split == "test")]


SMALL_FRACTALNET = {"name": "fractalnet20", "kwargs": {"widths": [8, 16, 16, 16, 16]}}


@pytest.mark.parametrize("model", ["branchynet_resnet20", "skipnet38", SMALL_FRACTALNET],
                         ids=["branchynet", "skipnet", "fractalnet"])
def test_every_accuracy_row_has_its_outcome_and_equals_it(tmp_path, model):
    summary = run_suite(suite([model]), tmp_path)
    assert summary.failed == []
    frame = load_run(tmp_path)
    cell_id = frame.cell_id.iloc[0]
    outcomes = load_outcomes(tmp_path, cell_id)
    assert outcomes is not None and set(load_run_outcomes(tmp_path)) == {cell_id}
    rows = _accuracy_rows(frame)
    assert len(rows) >= 2
    for row in rows.to_dict("records"):
        got = outcomes.for_row(row)
        assert got is not None, row
        assert got.correct.size == row["n"] == outcomes.n
        assert got.accuracy == pytest.approx(row["value"], abs=1e-9)
        if row["metric"] == "policy_top1":  # the exits it stored are the exit histogram of that point
            hist = frame[(frame.metric == "exit_fraction") & (frame.policy == row["policy"])]
            if not hist.empty and row["threshold"] == row["threshold"]:  # not NaN: a grid point
                hist = hist[np.isclose(hist.threshold, row["threshold"])]
            counts = np.bincount(got.exit_index, minlength=len(hist))
            for r in hist.to_dict("records"):
                assert json.loads(r["detail"])["count"] == counts[int(r["exit"])]
    assert len(outcomes) == len(rows)
    cell = json.loads((tmp_path / "cells" / f"{cell_id}.json").read_text())
    assert cell["meta"]["outcomes"] == f"outcomes/{cell_id}.npz"


def test_export_keeps_outcomes_and_a_changed_cell_moves_them_to_stale(tmp_path):
    run = tmp_path / "run"
    run_suite(suite(["linear"], metrics=["accuracy"]), run)
    files = export_run(run, tmp_path / "exported", "cmd")
    assert tmp_path / "exported" / "outcomes" / "linear__digits8__cpu.npz" in files
    old = (run / "outcomes" / "linear__digits8__cpu.npz").read_bytes()
    changed = suite([{"name": "linear", "train": {"epochs": 2}}], metrics=["accuracy"])
    run_suite(changed, run)
    stale = list((run / "stale").rglob("outcomes/linear__digits8__cpu.npz"))
    assert len(stale) == 1 and stale[0].read_bytes() == old
    assert (run / "outcomes" / "linear__digits8__cpu.npz").is_file()
