import pytest
import torch

from fractalbench.harness.registry import create_model, model_card

# He et al. 2016, Table 6: parameters of the CIFAR-10 ResNets (option A shortcuts add none).
PUBLISHED_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6, "resnet110": 1.7e6}
# Exact counts by hand, e.g. ResNet-20: stem 432+32, stage1 3*(2*2304+64), stage2 13952+2*18560,
# stage3 55552+2*73984, FC 650 = 269,722.
EXACT_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
                "resnet110": 1_727_962}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_the_paper(name):
    model = create_model(name, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    assert count == EXACT_PARAMS[name]
    assert count == pytest.approx(PUBLISHED_PARAMS[name], rel=0.025)
    assert model_card(name).reference["params"] == PUBLISHED_PARAMS[name]


def test_depth_must_be_6n_plus_2():
    from fractalbench.baselines.resnet import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


def test_option_a_shortcut_subsamples_and_zero_pads():
    from fractalbench.baselines.resnet import ShortcutA

    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    y = ShortcutA(2, 6, stride=2)(x)
    assert y.shape == (1, 6, 2, 2)
    assert torch.equal(y[:, 2:4], x[:, :, ::2, ::2])
    assert y[:, :2].abs().sum() == 0 and y[:, 4:].abs().sum() == 0


def test_forward_backward_finite_one_channel_input():
    model = create_model("resnet20", num_classes=7, in_chans=1)
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
