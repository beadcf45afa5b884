"""MSDNet (Huang et al., ICLR 2018): the CIFAR networks as the authors' released code builds them."""
import pytest
import torch

from fractalbench.baselines.msdnet import MSDNet, block_layers, kept_scales
from fractalbench.harness import contract
from fractalbench.harness.checker import run_checks, settle_batchnorm
from fractalbench.harness.registry import create_model, model_card


def params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, count", [("msdnet_cifar_anytime", 3_067_960), ("msdnet_cifar_budget", 2_078_924)])
def test_parameters_match_the_authors_code(name, count):
    """Counted on kalviny/MSDNet-PyTorch's models/msdnet.py with its CIFAR-100 settings (nChannels 16,
    growth 6, grFactor and bnFactor 1-2-4, bottleneck, prune max, reduction 0.5); with the same
    weights it gave the same logits at every exit as this build (checked out of tree)."""
    model = create_model(name, num_classes=100)
    assert params(model) == count == model_card(name).reference["params_cifar100"]


def test_blocks_and_the_scales_each_layer_keeps():
    assert block_layers(7, 4, 2, "even") == [4, 2, 2, 2, 2, 2, 2]
    assert block_layers(5, 1, 1, "lin_grow") == [1, 2, 3, 4, 5]
    # 16 layers over 3 scales: spans of ceil(16 / 3) = 6 layers keep 3, 2, 1 scales; layers 7 and 13
    # take 3 and 2 scales in and give 2 and 1 out (each followed by a transition)
    schedule = [kept_scales(layer, 16, 3) for layer in range(1, 17)]
    assert schedule[:6] == [(3, 3)] * 6 and schedule[6] == (3, 2) and schedule[7:12] == [(2, 2)] * 5
    assert schedule[12] == (2, 1) and schedule[13:] == [(1, 1)] * 3
    with pytest.raises(ValueError, match="step_mode 'odd' is not one of even, lin_grow"):
        block_layers(3, 1, 1, "odd")


def test_features_per_scale_and_the_classifiers_on_the_coarsest():
    model = create_model("msdnet_cifar_anytime", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model.stages[0](x)
        assert [tuple(t.shape[1:]) for t in first] == [(16 + 4 * 6, 32, 32), (32 + 4 * 12, 16, 16),
                                                       (64 + 4 * 24, 8, 8)]
        logits = contract.forward_exits(model, x)
    assert len(logits) == 7 and all(tuple(t.shape) == (2, 10) for t in logits)
    assert torch.equal(model(x), logits[-1])


def test_the_contract_holds_and_samples_leave_with_every_scale_compacted():
    torch.manual_seed(0)
    model = create_model("msdnet_cifar_anytime", num_classes=10, blocks=3, base=2, step=2)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    report = run_checks(settle_batchnorm(model, x), x, num_classes=10)
    assert report.ok, report.text()


def test_each_exit_costs_more_than_the_one_before():
    from fractalbench.harness.metrics.flops import build_cost_table

    model = create_model("msdnet_cifar_anytime", num_classes=100).eval()
    exits = build_cost_table(model, torch.randn(1, 3, 32, 32)).exits
    assert len(exits) == 7 and all(a < b for a, b in zip(exits, exits[1:]))


def test_bad_options_are_one_error():
    with pytest.raises(ValueError, match="bottleneck_factors needs 3 values"):
        MSDNet(10, 3, bottleneck_factors=(1, 2))
    with pytest.raises(ValueError, match="reduction must be in"):
        MSDNet(10, 3, reduction=0)
