"""Tables: Pareto frontier on hand-made points, operating points, summary, reference numbers,
and runs that carry only some metrics."""
from pathlib import Path

import numpy as np
import pytest

from harness.results import CellRecord, RunStore, make_row
from reports import tables

from conftest import build_run


def frame_of(run: Path):
    return tables.combined_rows(tables.load_runs([run]))


def test_pareto_mask_on_hand_made_points():
    # (cost, accuracy): a=(1, 70) b=(2, 80) c=(2, 75: dominated by b) d=(3, 80: dominated by b)
    # e=(4, 90) f=(5, 85: dominated by e) g=(0.5, 60) h=(2, 80: equal to b, kept) i=(nan, 99: invalid)
    costs = [1, 2, 2, 3, 4, 5, 0.5, 2, np.nan]
    accs = [70, 80, 75, 80, 90, 85, 60, 80, 99]
    assert tables.pareto_mask(costs, accs).tolist() == [True, True, False, False, True, False, True, True, False]


def test_pareto_mask_edge_cases():
    assert tables.pareto_mask([], []).tolist() == []
    assert tables.pareto_mask([3.0], [50.0]).tolist() == [True]
    # same cost: only the most accurate; same accuracy: only the cheapest
    assert tables.pareto_mask([1, 1, 2], [50, 60, 60]).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="as many costs as accuracies"):
        tables.pareto_mask([1, 2], [1])


def test_operating_points_pair_policy_accuracy_with_its_expected_macs(run_dir):
    points = tables.operating_points(frame_of(run_dir), "macs")
    bn = points[(points["label"] == "branchynet") & (points["policy"] == "confidence")].set_index("threshold")
    # fixture: threshold 0.9 -> exit fractions (0.15, 0.51, 0.34) of exits costing 10M/25M/40M MACs
    assert bn.loc[0.9, "cost"] == pytest.approx(0.15 * 10e6 + 0.51 * 25e6 + 0.34 * 40e6)
    assert bn.loc[0.9, "accuracy"] == pytest.approx(0.15 * 84 + 0.51 * 90 + 0.34 * 92.5)
    static = points[points["label"] == "resnet20"]
    assert static[["source", "cost", "accuracy"]].values.tolist() == [["static", 40_550_400.0, 91.2]]
    # the frontier is recomputed independently from the points
    assert points["pareto"].tolist() == tables.pareto_mask(points["cost"], points["accuracy"]).tolist()
    assert set(points.loc[points["pareto"], "label"]) == {"moe", "branchynet", "resnet20", "fractalbrainnet"}


def test_latency_points_match_policy_streams_by_description(run_dir):
    points = tables.operating_points(frame_of(run_dir), "latency")
    bn = points[points["label"] == "branchynet"]
    # streamed: confidence[0.9] (grid point 0.9) and confidence[0.8,0.85] (budget point's thresholds)
    assert sorted(bn["policy"]) == ["confidence", "confidence@budget0.5"]
    gated = points[points["label"] == "skipnet"]
    assert gated["policy"].tolist() == ["gates"]  # learned decisions were streamed as "default"


def test_summary_has_one_row_per_model_with_last_exit_numbers(run_dir):
    summary = frame_of(run_dir).pipe(tables.summary_table).set_index("label")
    assert summary.loc["branchynet", "top1 %"] == 92.5 and summary.loc["branchynet", "MACs (last exit)"] == 40e6
    assert summary.loc["moe", "params active"] == 350_000
    assert summary.loc["broken", "status"] == "failed"
    assert {"latency p50 ms (b=1)", "latency p99 ms (b=1)", "latency p50 ms (b=8)", "peak activations MiB"} <= set(summary.columns)


def test_reference_numbers_beside_measured(run_dir):
    runs = tables.load_runs([run_dir])
    ref = tables.reference_table(runs, tables.combined_rows(runs)).set_index(["label", "quantity"])
    assert ref.loc[("resnet20", "params"), "measured"] == 269722
    assert ref.loc[("resnet20", "macs"), "measured / published"] == pytest.approx(40_550_400 / 40.8e6)
    assert np.isnan(ref.loc[("resnet20", "top1_cifar10"), "measured"])  # measured on digits, not CIFAR-10


def test_partial_runs_give_empty_tables_not_errors(tmp_path):
    store = RunStore(tmp_path / "tiny")
    f = {"model": "m", "dataset": "d", "device": "cpu", "cell_id": "c"}
    store.write_cell(CellRecord("c", "ok", [make_row("params", 10, "count", **f), make_row("mystery_metric", 3.0, "zz", **f)]))
    frame = frame_of(tmp_path / "tiny")
    assert tables.summary_table(frame)["params"].tolist() == [10]
    assert tables.operating_points(frame, "macs").empty and tables.per_exit_table(frame).empty
    assert tables.other_metrics_table(frame, {"params"})["metric"].tolist() == ["mystery_metric"]
    empty = tables.combined_rows(tables.load_runs([build_run(tmp_path / "empty", models=(), failed=False)]))
    assert tables.summary_table(empty).empty


def test_format_value():
    assert [tables.format_value(v) for v in (None, float("nan"), 40_550_400.0, 91.2, 0.123456, 3, True)] == \
        ["", "", "40,550,400", "91.2", "0.1235", "3", "yes"]


def test_reference_keys_with_input_size_match_only_that_size():
    from harness.results import make_row as row
    import pandas as pd

    f = {"model": "m", "dataset": "cifar10", "device": "cpu", "cell_id": "c", "batch_size": 1}
    rows = [row("macs", 100, "MACs", exit=0, detail={"input_shape": [1, 3, 32, 32]}, **f),
            row("macs", 250, "MACs", exit=1, detail={"input_shape": [1, 3, 32, 32]}, **f),
            row("top1", 91.0, "%", exit=1, split="test", **f)]
    frame = pd.DataFrame(rows).assign(run="r", label="m")
    for col in ("value", "exit", "batch_size", "n", "threshold"):
        frame[col] = pd.to_numeric(frame[col])
    assert tables.measured_for("macs", frame, "cifar10") == (250.0, "32x32")
    assert tables.measured_for("macs_32", frame, "cifar10") == (250.0, "32x32")
    assert tables.measured_for("macs_32_exit_0", frame, "cifar10") == (100.0, "32x32")
    assert tables.measured_for("macs_224", frame, "cifar10") == (None, "")
    assert tables.measured_for("top1_cifar10", frame, "cifar10") == (91.0, "cifar10")
    assert tables.measured_for("top1_imagenet", frame, "cifar10") == (None, "")
    assert tables.measured_for("depth", frame, "cifar10") == (None, "")
