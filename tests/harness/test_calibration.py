"""Threshold calibration: hand-computed sweeps, MSDNet-style budget fitting on validation (meets the
budget, follows the geometric exit shares), refusal to fit on test, and agreement between the
simulated operating point and the real cascade on the same data."""
import math

import pytest
import torch
from model_helpers import warm_batchnorm

from fractalbench.harness import calibration
from fractalbench.harness.contract import executed_macs
from fractalbench.harness.metrics.flops import build_cost_table
from fractalbench.harness.policies import make_policy
from fractalbench.harness.registry import create_model

# Two classes, three exits, four samples. Max-softmax of [a, b] = 1 / (1 + exp(-|a - b|)):
# exit 0: 0.982, 0.525, 0.953, 0.731; exit 1: 0.982, 0.881, 0.953, 0.881; exit 2 always right.
HAND_LOGITS = [torch.tensor([[4.0, 0.0], [0.0, 0.1], [0.0, 3.0], [1.0, 0.0]]),
               torch.tensor([[0.0, 4.0], [0.0, 2.0], [3.0, 0.0], [0.0, 2.0]]),
               torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])]
HAND_LABELS = torch.tensor([0, 1, 1, 0])
HAND_COSTS = [10.0, 30.0, 100.0]


def random_exits(n=600, k=4, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(1.0, 4.0, k)  # later exits are more confident on average
    base = torch.randn(n, classes, generator=gen)  # exits mostly agree with each other (patience can exit)
    logits = [(base + 0.5 * torch.randn(n, classes, generator=gen)) * scale[i] for i in range(k)]
    labels = torch.randint(classes, (n,), generator=gen)
    return logits, labels


def test_default_grids():
    assert calibration.default_grid("confidence", 3, 10) == [i / 10 for i in range(11)]
    entropy = calibration.default_grid("entropy", 3, 10)
    assert entropy[0] == 0.0 and entropy[-1] == pytest.approx(math.log(10), abs=1e-6) and len(entropy) == 11
    assert calibration.default_grid("patience", 5, 10) == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="unknown exit policy"):
        calibration.default_grid("random", 3, 10)


def test_sweep_by_hand():
    points = calibration.sweep("confidence", HAND_LOGITS, HAND_LABELS, HAND_COSTS, grid=[0.5, 0.85, 0.9, 1.0])
    assert [p.exit_counts for p in points] == [(4, 0, 0), (2, 2, 0), (2, 0, 2), (0, 0, 4)]
    assert [p.expected_macs for p in points] == [10.0, 20.0, 55.0, 100.0]
    # at 0.85 sample 3 leaves at exit 1 with the wrong class
    assert [p.accuracy for p in points] == [100.0, 75.0, 100.0, 100.0]
    assert points[1].thresholds == (0.85,) and points[1].split == "validation" and points[1].n == 4
    per_exit = calibration.sweep("confidence", HAND_LOGITS, HAND_LABELS, HAND_COSTS, grid=[(0.99, 0.85)])
    assert per_exit[0].exit_counts == (0, 4, 0) and per_exit[0].accuracy == 25.0  # exit 1 gets only sample 1 right


@pytest.mark.parametrize("policy", ["confidence", "entropy"])
@pytest.mark.parametrize("budget_fraction", [0.3, 0.5, 0.8])
def test_fit_to_budget_meets_the_budget_with_geometric_exit_shares(policy, budget_fraction):
    logits, labels = random_exits()
    costs = [1e6, 2e6, 3e6, 4e6]
    budget = budget_fraction * costs[-1]
    fit = calibration.fit_to_budget(policy, logits, costs, budget, split="validation", val_labels=labels)
    assert fit.fitted_on == "validation" and fit.meets_budget and fit.method == "geometric"
    assert fit.expected_macs <= budget
    assert fit.expected_macs >= 0.98 * budget  # bisection leaves little on the table
    assert len(fit.policy.thresholds) == 3 and fit.policy.name == policy
    # exactly floor(N * p_k) samples leave at each early exit, p_k ~ q^k
    p = calibration.geometric_fractions(fit.q, 4)
    assert fit.target_fractions == pytest.approx(tuple(p))
    counts = [round(f * 600) for f in fit.exit_fractions]
    assert counts[:3] == [math.floor(600 * pk + 1e-9) for pk in p[:3]]
    # the fit's numbers are the policy's numbers on the same validation data
    again = calibration.evaluate(fit.policy, logits, labels, costs, split="validation")
    assert again.expected_macs == fit.expected_macs and again.accuracy == fit.accuracy


def test_thresholds_come_from_validation_and_test_is_refused():
    val, val_labels = random_exits(seed=1)
    test, test_labels = random_exits(seed=2)
    costs = [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="test split"):
        calibration.fit_to_budget("confidence", test, costs, 2.0, split="test")
    with pytest.raises(ValueError, match="test split"):
        calibration.fit_grid("confidence", test, test_labels, costs, 2.0, split="test")
    with pytest.raises(ValueError, match="allowed: validation"):
        calibration.fit_to_budget("confidence", val, costs, 2.0, split="train")
    assert calibration.check_fit_split("val") == "validation"
    fit = calibration.fit_to_budget("confidence", val, costs, 2.0, split="validation")
    # each threshold lies strictly between validation scores: the validation data chose it
    conf0 = torch.softmax(val[0], -1).amax(-1)
    t0 = fit.policy.thresholds[0]
    assert int((conf0 >= t0).sum()) == round(fit.exit_fractions[0] * 600)
    assert not torch.isclose(conf0, torch.tensor(t0)).any()
    # the same thresholds on test: measured there, not refitted (exit shares drift from the targets)
    on_test = calibration.evaluate(fit.policy, test, test_labels, costs)
    assert on_test.split == "test" and on_test.exit_fractions != fit.exit_fractions
    refit = calibration.fit_to_budget("confidence", test, costs, 2.0, split="validation")
    assert refit.policy.thresholds != fit.policy.thresholds


def test_budget_extremes_and_patience():
    logits, labels = random_exits(n=200)
    costs = [1.0, 2.0, 3.0, 4.0]
    low = calibration.fit_to_budget("confidence", logits, costs, 0.5)
    assert not low.meets_budget and low.q == 0.0 and low.exit_fractions == (1.0, 0.0, 0.0, 0.0)
    high = calibration.fit_to_budget("entropy", logits, costs, 4.0)
    assert high.meets_budget and high.exit_fractions == (0.0, 0.0, 0.0, 1.0) and high.expected_macs == 4.0
    with pytest.raises(ValueError, match="fit_grid"):
        calibration.fit_to_budget("patience", logits, costs, 2.0)
    grid_fit = calibration.fit_grid("patience", logits, labels, costs, 3.5)
    points = calibration.sweep("patience", logits, labels, costs)
    best = max((p for p in points if p.expected_macs <= 3.5), key=lambda p: (p.accuracy, -p.expected_macs))
    assert grid_fit.fitted_on == "validation" and grid_fit.policy.thresholds == best.thresholds
    assert grid_fit.expected_macs == best.expected_macs <= 3.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="cost_per_exit has 2 values for 3 exits"):
        calibration.sweep("confidence", HAND_LOGITS, HAND_LABELS, [1.0, 2.0])
    with pytest.raises(ValueError, match="3 labels for 4 samples"):
        calibration.sweep("confidence", HAND_LOGITS, HAND_LABELS[:3], HAND_COSTS)


@pytest.mark.parametrize("name,kwargs,policy", [
    ("branchynet_resnet20", {"widths": (4, 8, 16)}, "entropy"),
    ("fractalnet20", {"widths": (4, 8, 8), "dropout": (0.0, 0.0, 0.0)}, "confidence"),
])
def test_simulated_operating_point_equals_the_real_cascade(name, kwargs, policy):
    torch.manual_seed(0)
    model = warm_batchnorm(create_model(name, num_classes=10, in_chans=1, **kwargs), torch.randn(64, 1, 16, 16))
    val_x, test_x = torch.randn(48, 1, 16, 16), torch.randn(48, 1, 16, 16)
    with torch.no_grad():
        val_logits, test_logits = model.forward_exits(val_x), model.forward_exits(test_x)
    # labels the network gets partly right, so accuracy depends on where samples exit
    val_y, test_y = val_logits[-1].argmax(-1), test_logits[-1].argmax(-1)
    val_y[::3], test_y[::3] = 0, 0
    table = build_cost_table(model, test_x[:1])
    fit = calibration.fit_to_budget(policy, val_logits, list(table.exits), 0.5 * table.exits[-1], val_labels=val_y)
    assert fit.meets_budget and fit.expected_macs <= 0.5 * table.exits[-1]
    simulated = calibration.evaluate(fit.policy, test_logits, test_y, list(table.exits))
    with torch.no_grad():
        real = model.dynamic_forward(test_x, fit.policy)
    counts = torch.bincount(real.trace.exit_index, minlength=model.num_exits).tolist()
    assert tuple(counts) == simulated.exit_counts and sum(c > 0 for c in counts) >= 2
    assert 100.0 * (real.logits.argmax(-1) == test_y).float().mean().item() == simulated.accuracy
    assert executed_macs(real.trace, table).mean().item() == simulated.expected_macs
    # a grid point too: the policy built from a sweep point behaves the same in the cascade
    point = calibration.sweep(policy, test_logits, test_y, list(table.exits), split="test")[5]
    with torch.no_grad():
        real = model.dynamic_forward(test_x, make_policy(policy, point.thresholds))
    assert tuple(torch.bincount(real.trace.exit_index, minlength=model.num_exits).tolist()) == point.exit_counts


def test_fit_decision_threshold_bisects_to_the_budget_on_validation_only():
    calls = []

    def measure(t):  # cost falls linearly from 100 (t = 0) to 20 (t = 1); accuracy with it
        calls.append(t)
        return 100.0 - 80.0 * t, 50.0 + 40.0 * (1 - t)

    cache = {}
    fit = calibration.fit_decision_threshold(measure, 0.5, cache=cache, iterations=10)
    assert fit.macs_all == 100.0 and fit.macs_none == 20.0 and fit.budget_macs == 60.0
    assert 0.5 <= fit.policy.value <= 0.5 + 1 / 1024 and fit.meets_budget and fit.expected_macs <= 60.0
    assert fit.fitted_on == "validation" and fit.evaluations == len(calls) == 12  # two end points + 10 halvings
    again = calibration.fit_decision_threshold(measure, 0.5, cache=cache, iterations=10)
    assert again.policy.value == fit.policy.value and len(calls) == 12  # all from the cache
    assert calibration.fit_decision_threshold(measure, 1.0).policy.value == 0.0  # everything fits
    assert calibration.fit_decision_threshold(measure, 0.0, iterations=4).policy.value == 1.0
    with pytest.raises(ValueError, match="refusing to fit exit thresholds on the test split"):
        calibration.fit_decision_threshold(measure, 0.5, split="test")
    with pytest.raises(ValueError, match=r"budget_fraction must be in \[0, 1\]"):
        calibration.fit_decision_threshold(measure, 1.5)
