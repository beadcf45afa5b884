"""The metric catalogue: one entry per metric, writers refuse what it lacks, readers take their sets from it."""
from __future__ import annotations

import pytest

from fractalbench.harness import catalogue
from fractalbench.harness.catalogue import UnknownMetricError, check_metric, metric_info, names
from fractalbench.harness.results import make_row


def test_entries_are_unique_and_well_formed():
    all_names = [m.name for m in catalogue.METRICS]
    assert len(all_names) == len(set(all_names))
    for m in catalogue.METRICS:
        assert m.kind in catalogue.KINDS and m.group in catalogue.GROUPS and m.description
    # what depends on the machine: timings, memory, wall-clock training and cell time; nothing else
    assert names(machine_dependent=True) == names(kinds=["timing", "memory"]) | {
        "latency_predicted", "latency_timer_ratio", "train_seconds", "cell_seconds", "latency_at_length",
        "memory_at_length", "energy_per_sample", "energy_meter", "serving_latency", "serving_throughput",
        "serving_max_rate", "serving_single_stream", "latency_backend"}


def test_writers_refuse_unknown_metrics_and_wrong_units():
    assert make_row("top1", 90.0, "%", model="m")["metric"] == "top1"
    assert make_row("train_loss_reinforce", 0.3, "nats")["metric"] == "train_loss_reinforce"  # a family
    with pytest.raises(UnknownMetricError, match="'top_1' is not in the catalogue.*did you mean: top1"):
        make_row("top_1", 90.0, "%")
    with pytest.raises(UnknownMetricError, match="'macs' is measured in 'MACs', not 'FLOPs'"):
        make_row("macs", 1.0, "FLOPs")
    assert check_metric("error", "").kind == "error"
    assert metric_info("train_loss_anything").name == "train_loss_*"


def test_readers_derive_their_sets_from_the_catalogue():
    from fractalbench.reports import compare, tables

    assert compare.ACCURACY_METRICS == names(kinds=["accuracy"]) == {"top1", "top5", "top1_full", "policy_top1"}
    assert compare.EXACT_METRICS == names(kinds=["count"])
    assert compare.LATENCY_METRICS == names(kinds=["timing"])
    assert compare.MEMORY_METRICS == tables.MEMORY_METRICS == names(groups=["memory"])
    assert compare.DRIFT_METRICS == {"exit_fraction"}
    assert "latency" not in compare.MACHINE_INDEPENDENT_METRICS and "macs" in compare.MACHINE_INDEPENDENT_METRICS
    with pytest.raises(ValueError, match="unknown metric kind"):
        names(kinds=["speed"])
