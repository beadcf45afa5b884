"""SDN wrappers: splitting CIFAR ResNets and timm ResNets into units, IC placement by MACs, the
backbone's forward is kept, SDN's loss weights, clear errors for what cannot be split, and the
early-exit protocol (prefix-only forced paths, batch-1 = batched, cost table = counted MACs)."""
import pytest
import torch
from model_helpers import counted_macs, median_policy, unit_table, warm_batchnorm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fractalbench.baselines.resnet import CifarResNet
from fractalbench.baselines.sdn import SDN, MixedPoolClassifier, place_ics, split_backbone
from fractalbench.harness.contract import executed_macs
from fractalbench.harness.policies import ConfidencePolicy, PatiencePolicy
from fractalbench.harness.registry import create_model, model_card


@pytest.fixture(scope="module")
def sdn20():
    torch.manual_seed(0)
    return warm_batchnorm(create_model("sdn:resnet20"), torch.randn(32, 3, 32, 32))


def test_resnet56_placement_parameters_and_weights():
    torch.manual_seed(0)
    model = create_model("sdn:resnet56")
    assert isinstance(model, SDN) and model.num_exits == 7
    # units: stem + 27 blocks; the ICs follow blocks 4, 8 (16 ch), 12, 16 (32 ch), 20, 24 (64 ch)
    assert model.ic_units == [4, 8, 12, 16, 20, 24]
    assert model.ic_fractions == [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]
    # mixed-pool IC: alpha + FC(C x 4 x 4 -> 10): 2,571 (16 ch), 5,131 (32 ch), 10,251 (64 ch)
    assert sum(p.numel() for p in model.parameters()) == 853_018 + 2 * (2_571 + 5_131 + 10_251) == 888_924
    assert model.exit_weights == [0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0]
    card = model_card("sdn:resnet56")
    assert card.family == "sdn" and card.dynamic_kind == "early_exit" and card.input_size == 32


def test_exit_costs_are_backbone_prefixes_plus_ics():
    torch.manual_seed(0)
    model = create_model("sdn:resnet56").eval()
    x = torch.randn(1, 3, 32, 32)
    exits = [counted_macs(model.forced_forward, x, k) for k in range(7)]
    # blocks of stage 1/2/3 cost 4,718,592 / 4,718,592 (4,276,224 for the strided first) / likewise; ICs 16*C*10
    stem, block = 442_368, 4_718_592
    first_strided = 16 * 32 * 9 * 16 * 16 + 32 * 32 * 9 * 16 * 16  # 3,538,944
    ic = lambda c: c * 16 * 10  # noqa: E731
    assert exits[0] == stem + 4 * block + ic(16) == 19_319_296
    assert exits[1] == stem + 8 * block + 2 * ic(16)
    assert exits[2] == stem + 9 * block + first_strided + 2 * block + 2 * ic(16) + ic(32)
    assert exits[6] == 125_485_696 + 2 * (ic(16) + ic(32) + ic(64))  # ResNet-56 itself: 125,485,696
    fractions = [e / exits[6] for e in exits[:6]]
    assert all(abs(f - t) < 0.02 for f, t in zip(fractions, [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]))


def test_forward_is_the_backbones_forward():
    torch.manual_seed(0)
    backbone = CifarResNet(20).eval()
    units, head = split_backbone(backbone)
    assert len(units) == 10 and units[0] is backbone.stem and head is backbone.head
    model = SDN(units, head, 10, [16] * 4 + [32] * 3 + [64] * 3, place_ics([1] * 10 + [0], [0.3, 0.6], "macs")).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))
        assert torch.equal(model.forward_exits(x)[-1], backbone(x))


def test_timm_resnet18_is_split_into_stem_and_blocks():
    torch.manual_seed(0)
    model = create_model("sdn:timm:resnet18", num_classes=5).eval()
    # units: (conv1, bn1, act1, maxpool) + 8 basic blocks; ICs by MACs after blocks 1, 2, 3, 5, 6, 7
    assert model.ic_units == [1, 2, 3, 5, 6, 7]
    assert [len(s) for s in model.stages] == [2, 1, 1, 2, 1, 1, 1]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exits = model.forward_exits(x)
        assert [tuple(e.shape) for e in exits] == [(2, 5)] * 7
        for k in (0, 6):
            assert torch.equal(model.forced_forward(x, k), exits[k])
    assert model_card("sdn:timm:resnet18").input_size == 224


def test_timm_split_reproduces_the_timm_forward():
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    units, head = split_backbone(backbone, torch.randn(1, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = x
        for unit in units:
            h = unit(h)
        assert torch.equal(head(h), backbone(x))


def test_what_cannot_be_split_is_refused_clearly():
    with pytest.raises(ValueError, match="sdn:noop: cannot split NullModel"):
        create_model("sdn:noop")
    with pytest.raises(ValueError, match="already a dynamic model"):
        create_model("sdn:branchynet_resnet20")
    with pytest.raises(ValueError, match="cannot wrap another SDN"):
        create_model("sdn:sdn:resnet20")
    with pytest.raises(ValueError, match="unit 0 is the token embedding"):  # ViTs are split (test_vit.py), but
        create_model("sdn:vit_lite_2_4", ic_after=[0])  # an exit on the class token before any block is not
    with pytest.raises(ValueError, match="ic_after"):
        create_model("sdn:resnet20", ic_after=[9])
    with pytest.raises(ValueError, match="ic 'conv'"):
        create_model("sdn:resnet20", ic="conv")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("sdn:resnet21")


def test_options_explicit_positions_and_linear_ics():
    torch.manual_seed(0)
    model = create_model("sdn:resnet20", ic_after=[2, 5], ic="linear", num_classes=7, in_chans=1)
    assert model.ic_units == [2, 5] and model.num_exits == 3
    backbone = 269_722 - 3 * 16 * 9 + 16 * 9 - 650 + 455
    assert sum(p.numel() for p in model.parameters()) == backbone + (16 * 7 + 7) + (32 * 7 + 7)
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 7)
    depth = create_model("sdn:resnet20", placement="depth")
    # nearest of the 10 units' depth shares (0.1, 0.2, ...) to 15% ... 90%; 0.15 and 0.75 sit halfway
    # and (in floating point) go to the lower unit
    assert depth.ic_units == [0, 2, 3, 5, 6, 8]


def test_loss_terms_use_sdn_weights():
    torch.manual_seed(0)
    model = create_model("sdn:resnet20", num_classes=10, in_chans=1).eval()
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3])
    terms = model.loss_terms(x, y)
    exits = model.forward_exits(x)
    for k, (w, (name, value)) in enumerate(zip([0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0], terms.items())):
        assert name == f"exit_{k}"
        assert torch.allclose(value, w * nn.functional.cross_entropy(exits[k], y))
    model.train()
    sum(model.loss_terms(x, y).values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.heads[0], MixedPoolClassifier) and model.heads[0].alpha.grad is not None


def test_trainer_ramps_ic_weights_from_0_01_to_final():
    from torch.utils.data import TensorDataset

    from fractalbench.harness.train import TrainConfig, train_model

    torch.manual_seed(0)
    model = create_model("sdn:resnet20", num_classes=3, in_chans=1)
    seen = []
    original = model.on_train_epoch
    model.on_train_epoch = lambda e, n: (original(e, n), seen.append(list(model.exit_weights)))
    data = TensorDataset(torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    train_model(model, data, TrainConfig(epochs=3, batch_size=4, max_steps_per_epoch=1))
    final = [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]
    assert seen[0] == pytest.approx([0.01] * 6 + [1.0])
    assert seen[1] == pytest.approx([0.01 + (w - 0.01) / 2 for w in final] + [1.0])
    assert seen[2] == pytest.approx(final + [1.0])
    fixed = create_model("sdn:resnet20", num_classes=3, in_chans=1, weight_ramp=False)
    fixed.on_train_epoch(0, 3)
    assert fixed.exit_weights == pytest.approx(final + [1.0])


def test_forced_exit_runs_exactly_its_prefix(sdn20):
    x = torch.randn(2, 3, 32, 32)
    fired = []
    hooks = [m.register_forward_hook(lambda *a, tag=(kind, i): fired.append(tag))
             for kind, mods in (("stage", sdn20.stages), ("head", sdn20.heads)) for i, m in enumerate(mods)]
    try:
        with torch.no_grad():
            exits = sdn20.forward_exits(x)
            for k in range(sdn20.num_exits):
                fired.clear()
                assert torch.equal(sdn20.forced_forward(x, k), exits[k])
                expected = [("stage", i) for i in range(k + 1)] + [("head", i) for i in range(k + 1)]
                assert sorted(fired) == sorted(expected)
    finally:
        for h in hooks:
            h.remove()


def test_batch_one_equals_batched_and_cost_table_equals_counted_macs(sdn20):
    torch.manual_seed(3)
    x = torch.randn(10, 3, 32, 32)
    table = unit_table(sdn20, x[:1])
    for policy in (median_policy(sdn20, x), PatiencePolicy(thresholds=(1.0,))):
        with torch.no_grad():
            batched = sdn20.dynamic_forward(x, policy)
            masked = sdn20.dynamic_forward(x, policy, mode="mask")
        assert torch.equal(batched.trace.exit_index, masked.trace.exit_index)
        for i in range(len(x)):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                one = sdn20.dynamic_forward(x[i:i + 1], policy)
            assert one.trace.exit_index.item() == batched.trace.exit_index[i].item()
            assert torch.allclose(one.logits[0], batched.logits[i], atol=1e-5)
            assert executed_macs(one.trace, table).item() == counter.get_total_flops() // 2
        if isinstance(policy, ConfidencePolicy):
            assert len(set(batched.trace.exit_index.tolist())) >= 3
