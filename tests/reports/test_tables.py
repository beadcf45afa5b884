"""Tables: Pareto frontier on hand-made points, operating points, summary, reference numbers,
and runs that carry only some metrics."""
from pathlib import Path

import numpy as np
import pytest
from conftest import build_run, foreign_row

from fractalbench.harness.results import CellRecord, RunStore, make_row
from fractalbench.harness.stats import accuracy_interval
from fractalbench.reports import tables


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
    frame = frame_of(run_dir)
    points, grid = tables.operating_points(frame, "macs"), tables.grid_points(frame, "macs")
    # the confidence sweep is scored on test: only in the test-grid view, never among the headline points
    assert "confidence" not in set(points["policy"]) and set(grid["policy"]) == {"confidence"}
    bn = grid[grid["label"] == "branchynet"].set_index("threshold")
    # fixture: threshold 0.9 -> exit fractions (0.15, 0.51, 0.34) of exits costing 10M/25M/40M MACs
    assert bn.loc[0.9, "cost"] == pytest.approx(0.15 * 10e6 + 0.51 * 25e6 + 0.34 * 40e6)
    assert bn.loc[0.9, "accuracy"] == pytest.approx(0.15 * 84 + 0.51 * 90 + 0.34 * 92.5)
    assert bn.loc[0.9, "ci_high"] == pytest.approx(accuracy_interval(bn.loc[0.9, "accuracy"], 1000)[1])
    static = points[points["label"] == "resnet20"]
    assert static[["source", "selection", "cost", "accuracy"]].values.tolist() == \
        [["static", "fixed", 40_550_400.0, 91.2]]
    # the frontier is recomputed independently from the points
    assert points["pareto"].tolist() == tables.pareto_mask(points["cost"], points["accuracy"]).tolist()
    # the forced exits of branchynet (10M 80 %, 25M 89 %, 40M 92.5 %) and the router (15M, 87 %) make the frontier
    front = points[points["pareto"]]
    assert sorted(zip(front["label"], front["source"], front["cost"])) == [
        ("branchynet", "exit", 10e6), ("branchynet", "exit", 25e6), ("branchynet", "exit", 40e6),
        ("branchynet", "policy", 20e6), ("fractalbrainnet", "static", 120e6), ("moe", "policy", 15e6)]


def test_latency_points_match_policy_streams_by_policy_and_threshold(run_dir):
    frame = frame_of(run_dir)
    points, grid = tables.operating_points(frame, "latency"), tables.grid_points(frame, "latency")
    bn = points[(points["label"] == "branchynet") & (points["source"] == "policy")].set_index("policy")
    # streamed: (confidence, 0.9) of the sweep (a test-grid point, apart) and the budget fit
    # (confidence@budget0.5, no threshold); the other thresholds of the sweep have no stream
    assert list(bn.index) == ["confidence@budget0.5"] and bn.loc["confidence@budget0.5", "accuracy"] == 88.0
    assert grid[["label", "policy", "threshold"]].values.tolist() == [["branchynet", "confidence", 0.9]]
    streams = frame[(frame["metric"] == "latency") & (frame["label"] == "branchynet") & (frame["policy"] != "")]
    assert grid["cost"].item() == streams.loc[streams["threshold"] == 0.9, "value"].item()
    assert bn.loc["confidence@budget0.5", "cost"] == streams.loc[streams["threshold"].isna(), "value"].item()
    assert points.loc[points["label"] == "skipnet", "policy"].tolist() == ["gates", ""]  # and its forced path
    assert points.loc[points["label"] == "moe", "policy"].tolist() == ["router", ""]


def test_latency_is_never_matched_by_the_old_description_string(tmp_path):
    # a stream labelled only by its description (the old key) is no operating point's latency
    run = build_run(tmp_path / "old_key", models=("branchynet",), failed=False)
    frame = frame_of(run)
    old = frame["metric"].isin(["latency", "latency_predicted"]) & (frame["policy"] == "confidence")
    frame.loc[old, "policy"], frame.loc[old, "threshold"] = "confidence[0.9]", np.nan
    points = tables.operating_points(frame, "latency")
    assert points.loc[points["source"] == "policy", "policy"].tolist() == ["confidence@budget0.5"]


def test_chosen_point_is_fitted_on_validation_or_learned(run_dir):
    chosen = tables.chosen_points(frame_of(run_dir)).set_index("label")
    # branchynet: the budget fit (fitted on validation), never a test-scored grid point, though
    # grid points are more accurate on test; skipnet and moe: their learned decisions
    assert chosen.loc["branchynet", ["policy", "accuracy", "cost"]].tolist() == ["confidence@budget0.5", 88.0, 20e6]
    assert chosen.loc["skipnet", "policy"] == "gates" and chosen.loc["moe", "policy"] == "router"
    assert "resnet20" not in chosen.index


def test_measured_policy_latency_beside_its_prediction(run_dir):
    pairs = tables.latency_vs_predicted(frame_of(run_dir)).set_index(["label", "policy"])
    frame = frame_of(run_dir)
    stream = frame[(frame["metric"] == "latency") & (frame["policy"] == "confidence") & (frame["threshold"] == 0.9)]
    row = pairs.loc[("branchynet", "confidence")]
    assert row["threshold"] == 0.9 and row["predicted ms"] == 1.15
    assert row["measured mean ms"] == stream["value"].item()
    assert row["measured / predicted"] == pytest.approx(stream["value"].item() / 1.15)
    assert pairs.loc[("branchynet", "confidence@budget0.5"), "predicted ms"] == 0.95
    # skipnet's stream has no prediction (no exits to predict from): not in the table
    assert set(pairs.index.get_level_values("label")) == {"branchynet"}


def test_routed_compute_puts_useful_beside_padded_with_drops_and_the_busiest_expert(run_dir):
    routed = tables.routed_compute(frame_of(run_dir))
    assert len(routed) == 1
    row = routed.iloc[0]
    assert row["model"] == "moe" and row["policy"] == "router"
    assert (row["useful expert MACs"], row["padded expert MACs"], row["utilization"]) == (6e6, 8e6, 0.75)
    assert row["dropped per layer"] == "0: 0.000, 1: 0.125"
    assert row["busiest expert share (p90)"] == "0: 0.400, 1: 0.250"  # the fixture's rows carry no p90


def test_energy_table_keeps_measured_rows_and_states_each_skip(run_dir):
    measured, skipped = tables.energy_table(frame_of(run_dir))
    assert list(measured["model"]) == ["moe"] and measured.iloc[0]["J per sample"] == 0.004
    assert measured.iloc[0]["net J per sample"] == 0.003 and measured.iloc[0]["path"] == "policy stream"
    assert set(skipped["model"]) == {"resnet20", "fractalbrainnet"}
    assert set(skipped["reason"]) == {"no RAPL counters here"}


def test_summary_has_one_row_per_model_with_last_exit_numbers(run_dir):
    summary = frame_of(run_dir).pipe(tables.summary_table).set_index("label")
    assert summary.loc["branchynet", "top1 %"] == 92.5 and summary.loc["branchynet", "MACs (last exit)"] == 40e6
    assert summary.loc["moe", "params active"] == 350_000
    assert summary.loc["broken", "status"] == "failed"
    assert summary.loc["branchynet", "chosen point"] == "confidence@budget0.5"
    assert summary.loc["branchynet", "its expected MACs"] == 20e6
    wanted = {"latency p50 ms (b=1)", "latency p99 ms (b=1)", "latency p50 ms (b=8)", "peak activations MiB"}
    assert wanted <= set(summary.columns)
    assert not {"GPU peak allocated MiB", "best policy top1 %"} & set(summary.columns)


def test_brief_summary_keeps_only_the_chosen_columns(run_dir):
    summary = frame_of(run_dir).pipe(tables.summary_table)
    brief = tables.brief_summary(summary)
    assert list(brief.columns) == ["model", "kind", "top1 %", "top1 95% CI", "MACs (last exit)", "chosen point",
                                   "its top1 %", "its expected MACs", "params", "latency p50 ms (b=1)",
                                   "peak activations MiB", "status"]
    top1 = brief.set_index("model").loc["resnet20", "top1 %"]
    low, high = accuracy_interval(top1, 1000)  # the fixture's rows are on 1,000 test images
    assert brief.set_index("model").loc["resnet20", "top1 95% CI"] == f"{low:.1f}-{high:.1f}"
    assert brief.set_index("model").loc["branchynet", "latency p50 ms (b=1)"] == \
        summary.set_index("label").loc["branchynet", "latency p50 ms (b=1)"]
    # a second dataset adds the dataset column, nothing else
    two = summary.assign(dataset=["a"] + ["b"] * (len(summary) - 1))
    assert list(tables.brief_summary(two).columns)[:2] == ["model", "dataset"]


def test_reference_numbers_beside_measured(run_dir):
    runs = tables.load_runs([run_dir])
    ref = tables.reference_table(runs, tables.combined_rows(runs)).set_index(["label", "quantity"])
    assert ref.loc[("resnet20", "params"), "measured"] == 269722
    assert ref.loc[("resnet20", "macs"), "measured / published"] == pytest.approx(40_550_400 / 40.8e6)
    assert np.isnan(ref.loc[("resnet20", "top1_cifar10"), "measured"])  # measured on digits, not CIFAR-10


def test_partial_runs_give_empty_tables_not_errors(tmp_path):
    store = RunStore(tmp_path / "tiny")
    f = {"model": "m", "dataset": "d", "device": "cpu", "cell_id": "c"}
    rows = [make_row("params", 10, "count", **f), foreign_row("mystery_metric", 3.0, "zz", **f),
            make_row("train_loss_ce", 0.3, "nats", **f)]
    store.write_cell(CellRecord("c", "ok", rows))
    frame = frame_of(tmp_path / "tiny")
    assert tables.summary_table(frame)["params"].tolist() == [10]
    assert tables.operating_points(frame, "macs").empty and tables.per_exit_table(frame).empty
    assert tables.latency_vs_predicted(frame).empty and tables.chosen_points(frame).empty
    # families match by prefix: train_loss_* covers train_loss_ce
    assert tables.other_metrics_table(frame, {"params", "train_loss_*"})["metric"].tolist() == ["mystery_metric"]
    assert tables.rows_table(frame, {"train_loss_*"})["metric"].tolist() == ["train_loss_ce"]
    empty = tables.combined_rows(tables.load_runs([build_run(tmp_path / "empty", models=(), failed=False)]))
    assert tables.summary_table(empty).empty


def test_format_value():
    assert [tables.format_value(v) for v in (None, float("nan"), 40_550_400.0, 91.2, 0.123456, 3, True)] == \
        ["", "", "40,550,400", "91.2", "0.1235", "3", "yes"]


def test_reference_keys_with_input_size_match_only_that_size():
    import pandas as pd

    from fractalbench.harness.results import make_row as row

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
