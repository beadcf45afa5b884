"""The protocol on static models, the early-exit cascade, and the exit policies."""
import pytest
import torch
from torch import nn

from fractalbench.harness import contract
from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.policies import ConfidencePolicy, EntropyPolicy, PatiencePolicy, make_policy, softmax_entropy


def tiny_cascade():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)) for _ in stages]
    return EarlyExitNetwork(stages, heads, [0.5, 0.5, 1.0]).eval()


def test_static_model_is_the_one_exit_case():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(5, 1, 2, 2)
    assert contract.num_exits(model) == 1
    out = contract.dynamic_forward(model, x)
    assert torch.equal(out.logits, model(x))
    assert out.trace.exit_index.tolist() == [0] * 5
    assert contract.executed_macs(out.trace, {"full": 12.0}).tolist() == [12.0] * 5
    terms = contract.loss_terms(model, x, torch.tensor([0, 1, 2, 0, 1]))
    assert list(terms) == ["cross_entropy"]
    with pytest.raises(ValueError, match="exits 0..0"):
        contract.forced_forward(model, x, 1)


def test_cascade_forced_paths_equal_exits_and_stop_after_k():
    net = tiny_cascade()
    x = torch.randn(4, 1, 6, 6)
    exits = net.forward_exits(x)
    fired = []
    for i, stage in enumerate(net.stages):
        stage.register_forward_hook(lambda m, a, o, i=i: fired.append(("stage", i)))
    for i, head in enumerate(net.heads):
        head.register_forward_hook(lambda m, a, o, i=i: fired.append(("head", i)))
    for k in range(3):
        fired.clear()
        assert torch.allclose(net.forced_forward(x, k), exits[k])
        assert max(i for _, i in fired) == k and len(fired) == 2 * (k + 1)


def test_compaction_equals_batch_one_and_masking():
    net = tiny_cascade()
    x = torch.randn(16, 1, 6, 6)
    conf = [torch.softmax(logits, -1).amax(-1) for logits in net.forward_exits(x)]
    policy = ConfidencePolicy(thresholds=(conf[0].median().item(), conf[1].median().item()))
    batched = net.dynamic_forward(x, policy)
    masked = net.dynamic_forward(x, policy, mode="mask")
    assert len(set(batched.trace.exit_index.tolist())) > 1
    assert torch.equal(batched.trace.exit_index, masked.trace.exit_index)
    assert torch.allclose(batched.logits, masked.logits, atol=1e-6)
    for i in range(16):
        one = net.dynamic_forward(x[i:i + 1], policy)
        assert one.trace.exit_index.item() == batched.trace.exit_index[i].item()
        assert torch.allclose(one.logits[0], batched.logits[i], atol=1e-5)
    # masking computed everything: its counts say every sample ran to the last exit
    assert masked.trace.unit_counts["exit_2"].sum().item() == 16
    assert batched.trace.unit_counts["exit_0"].sum().item() == (batched.trace.exit_index == 0).sum().item()


def test_batch_one_really_stops():
    net = tiny_cascade()
    fired = []
    net.stages[1].register_forward_hook(lambda *a: fired.append(1))
    out = net.dynamic_forward(torch.randn(1, 1, 6, 6), ConfidencePolicy(thresholds=(0.0,)))
    assert out.trace.exit_index.item() == 0 and fired == []


def test_policy_simulation_matches_hand_computed_decisions():
    logits = [torch.tensor([[4.0, 0.0], [0.0, 0.1]]), torch.tensor([[0.0, 4.0], [0.0, 0.2]]),
              torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    # softmax([4, 0]) max = 0.982; softmax([0, 0.1]) max = 0.525
    assert ConfidencePolicy(thresholds=(0.9,)).simulate(logits).tolist() == [0, 2]
    # entropy of [4, 0] = 0.0878 nats; of [0, 0.2] = 0.6881 nats
    assert EntropyPolicy(thresholds=(0.1, 0.69)).simulate(logits).tolist() == [0, 1]
    assert softmax_entropy(torch.zeros(1, 4)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    # sample 1 predicts class 1 at exits 0 and 1: patience 1 leaves at exit 1; sample 0 flips
    assert PatiencePolicy(thresholds=(1,)).simulate(logits).tolist() == [2, 1]


def test_make_policy_rejects_bad_input():
    with pytest.raises(ValueError, match="allowed: confidence, entropy, patience"):
        make_policy("greedy", 0.5)
    with pytest.raises(ValueError, match="whole number"):
        make_policy("patience", 0.5)


def test_loss_terms_are_weighted_per_exit():
    net = tiny_cascade()
    x, y = torch.randn(3, 1, 6, 6), torch.tensor([0, 1, 2])
    terms = net.loss_terms(x, y)
    exits = net.forward_exits(x)
    assert list(terms) == ["exit_0", "exit_1", "exit_2"]
    assert terms["exit_0"].item() == pytest.approx(0.5 * nn.functional.cross_entropy(exits[0], y).item(), rel=1e-6)
