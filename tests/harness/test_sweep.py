"""Threshold sweeps from exit logits: the same accuracy, exits and cost as running the real stopping
path for every point (two independent paths), and a real path that disagrees fails the cell."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fractalbench.harness._sweep import check_real_path, simulated_logits, spread_indices
from fractalbench.harness.contract import executed_macs
from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.evaluate import collect_exit_logits, run_policy
from fractalbench.harness.policies import make_policy


def cascade() -> EarlyExitNetwork:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)) for _ in stages]
    return EarlyExitNetwork(stages, heads).eval()


@pytest.fixture
def data():
    torch.manual_seed(1)
    return TensorDataset(torch.randn(300, 2, 6, 6), torch.randint(0, 5, (300,)))


@pytest.mark.parametrize("name, thresholds", [("confidence", [0.2, 0.25, 0.3, 0.4]), ("entropy", [1.0, 1.4, 1.6]),
                                              ("patience", [1, 2])])
def test_simulated_sweep_equals_the_real_path_on_every_sample(data, name, thresholds):
    model = cascade()
    logits, labels = collect_exit_logits(model, data, 64)
    unit_macs = {"exit_0": 10.0, "exit_1": 25.0, "exit_2": 45.0}
    for t in thresholds:
        policy = make_policy(name, t)
        sim_exit, sim_logits = simulated_logits(policy, logits)
        real_logits, real_trace, real_labels = run_policy(model, data, policy, 64)
        assert torch.equal(real_labels, labels)
        assert torch.equal(sim_exit, real_trace.exit_index)
        assert torch.equal(sim_logits.argmax(-1), real_logits.argmax(-1))
        sim_trace = model.trace_for_exits(sim_exit)
        assert torch.equal(executed_macs(sim_trace, unit_macs), executed_macs(real_trace, unit_macs))
    if name != "patience":  # an untrained cascade's exits rarely agree, so patience mostly runs to the end
        exits = {int(e) for t in thresholds for e in simulated_logits(make_policy(name, t), logits)[0].unique()}
        assert len(exits) >= 2, "the grid should make samples leave at more than one exit"


def test_real_path_check_counts_agreement_and_catches_a_path_that_does_not_stop(data, monkeypatch):
    model = cascade()
    logits, _ = collect_exit_logits(model, data, 64)
    deciders = [make_policy("confidence", t) for t in (0.25, 0.3)]
    check = check_real_path(model, data, deciders, logits, samples=100, batch_size=32, device="cpu")
    assert check["mismatches"] == 0 and check["checked"] == 200 and check["samples"] == 100

    def never_stops(x, policy=None, mode="compact"):  # computes everything and takes the last exit
        return EarlyExitNetwork.dynamic_forward(model, x, make_policy("confidence", 2.0), mode)

    monkeypatch.setattr(model, "dynamic_forward", never_stops)
    broken = check_real_path(model, data, deciders, logits, samples=100, batch_size=32, device="cpu")
    assert broken["mismatches"] > 0 and broken["exit_differences"] >= broken["mismatches"]


def test_subset_is_spread_over_a_class_sorted_split():
    assert spread_indices(10, 4) == [0, 2, 5, 7]
    assert spread_indices(3, 10) == [0, 1, 2]
    assert spread_indices(0, 5) == []
