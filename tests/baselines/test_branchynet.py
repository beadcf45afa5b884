"""BranchyNet B-ResNet: parameter and MAC counts by hand, the backbone is exactly the CIFAR ResNet,
forced paths stop after their exit, batch-1 and batched decisions agree, and the cost table times
the trace equals FlopCounterMode's count of the real dynamic forward, sample by sample."""
import pytest
import torch
from model_helpers import counted_macs, median_policy, unit_table, warm_batchnorm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fractalbench.baselines.branchynet import BranchyResNet
from fractalbench.baselines.resnet import CifarResNet
from fractalbench.harness.contract import executed_macs
from fractalbench.harness.policies import EntropyPolicy, PatiencePolicy
from fractalbench.harness.registry import create_model, model_card

# ResNet-(6n+2) exact counts (tests/baselines/test_resnet.py) plus the two branches:
# branch 1 (after the stem): conv 16->32 (4,608) + BN (64) + conv 32->32 (9,216) + BN (64) + FC 32->10 (330) = 14,282
# branch 2 (after stage 1): basic block 16->16 (2 x 2,304 + 2 x 32 = 4,672) + FC 16->10 (170) = 4,842
BRANCHES = 14_282 + 4_842
EXACT_PARAMS = {"branchynet_resnet20": 269_722 + BRANCHES, "branchynet_resnet56": 853_018 + BRANCHES,
                "branchynet_resnet110": 1_727_962 + BRANCHES}


@pytest.fixture(scope="module")
def b20():
    torch.manual_seed(0)
    model = create_model("branchynet_resnet20")
    return warm_batchnorm(model, torch.randn(32, 3, 32, 32))


@pytest.fixture(scope="module")
def small():
    """B-ResNet-20 at a quarter of the width (1/16 of the MACs): same structure, faster tests."""
    torch.manual_seed(0)
    model = create_model("branchynet_resnet20", widths=(4, 8, 16))
    return warm_batchnorm(model, torch.randn(32, 3, 32, 32))


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_parameter_counts_by_hand(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[name]
    card = model_card(name)
    assert card.dynamic_kind == "early_exit" and "entropy" in card.notes.lower()


def test_released_code_flatten_heads_parameter_count():
    # kunglab/branchynet heads at 32x32: branch 1 maxpool 3/2 -> 32x15x15 = 7,200 -> FC 3,600 -> FC 10,
    # branch 2 flatten 16x32x32 = 16,384 -> FC 10
    with torch.device("meta"):
        model = create_model("branchynet_resnet110", branch_head="flatten")
    expected = 1_727_962 + 13_952 + (7_200 * 3_600 + 3_600) + (3_600 * 10 + 10) + 4_672 + (16_384 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 27_870_046
    with pytest.raises(ValueError, match="branch_head"):
        BranchyResNet(20, branch_head="conv")


def test_macs_per_exit_resnet110_by_hand():
    torch.manual_seed(0)
    model = create_model("branchynet_resnet110").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        h0, h1 = model.stages[0](x), model.stages[1](model.stages[0](x))
        h2 = model.stages[2](h1)
    stem = 3 * 16 * 9 * 32 * 32                        # 442,368
    branch1 = (16 * 32 + 32 * 32) * 9 * 32 * 32 + 320  # 14,156,096
    stage1 = 18 * 2 * 16 * 16 * 9 * 32 * 32            # 84,934,656
    branch2 = 2 * 16 * 16 * 9 * 32 * 32 + 160           # 4,718,752
    assert counted_macs(model.stages[0], x) == stem and counted_macs(model.heads[0], h0) == branch1
    assert counted_macs(model.stages[1], h0) == stage1 and counted_macs(model.heads[1], h1) == branch2
    # the main exit's own path is ResNet-110's forward: 252,887,680 MACs (~253M as usually quoted)
    resnet110 = stem + stage1 + counted_macs(model.stages[2], h1) + counted_macs(model.heads[2], h2)
    assert resnet110 == 252_887_680
    exits = [counted_macs(model.forced_forward, x, k) for k in range(3)]
    assert exits == [stem + branch1, stem + branch1 + stage1 + branch2, resnet110 + branch1 + branch2]
    assert exits == [14_598_464, 104_251_872, 271_762_528]


def test_backbone_is_the_cifar_resnet():
    torch.manual_seed(0)
    model = create_model("branchynet_resnet20").eval()
    resnet = CifarResNet(20).eval()
    state = {}
    for prefix, module in [("stem", model.stages[0]), ("layer1", model.stages[1]), ("layer2", model.stages[2][0]),
                           ("layer3", model.stages[2][1]), ("head", model.heads[2])]:
        state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    resnet.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), resnet(x))
        assert torch.equal(model.forward_exits(x)[2], resnet(x))


def test_forced_exit_runs_exactly_its_prefix(b20):
    x = torch.randn(2, 3, 32, 32)
    fired = []
    hooks = [m.register_forward_hook(lambda *a, tag=(kind, i): fired.append(tag))
             for kind, mods in (("stage", b20.stages), ("head", b20.heads)) for i, m in enumerate(mods)]
    try:
        with torch.no_grad():
            exits = b20.forward_exits(x)
            for k in range(3):
                fired.clear()
                assert torch.equal(b20.forced_forward(x, k), exits[k])
                expected = [("stage", i) for i in range(k + 1)] + [("head", i) for i in range(k + 1)]
                assert sorted(fired) == sorted(expected)
    finally:
        for h in hooks:
            h.remove()
    # and by count: each forced path costs strictly more than the one before
    counts = [counted_macs(b20.forced_forward, x[:1], k) for k in range(3)]
    assert counts == [14_598_464, 33_472_992, 59_425_888]


def test_batch_one_decisions_equal_batched_and_masked(small):
    b20 = small
    torch.manual_seed(1)
    x = torch.randn(12, 3, 32, 32)
    policy = median_policy(b20, x, "entropy")
    with torch.no_grad():
        batched = b20.dynamic_forward(x, policy)
        masked = b20.dynamic_forward(x, policy, mode="mask")
        assert set(batched.trace.exit_index.tolist()) == {0, 1, 2}
        assert torch.equal(batched.trace.exit_index, masked.trace.exit_index)
        assert torch.allclose(batched.logits, masked.logits, atol=1e-5)
        for i in range(len(x)):
            one = b20.dynamic_forward(x[i:i + 1], policy)
            assert one.trace.exit_index.item() == batched.trace.exit_index[i].item()
            assert torch.allclose(one.logits[0], batched.logits[i], atol=1e-5)


@pytest.mark.parametrize("policy_name", ["entropy", "confidence", "patience"])
def test_executed_macs_equal_counted_macs_sample_by_sample(small, policy_name):
    b20 = small
    torch.manual_seed(2)
    x = torch.randn(8, 3, 32, 32)
    policy = PatiencePolicy(thresholds=(1.0,)) if policy_name == "patience" else median_policy(b20, x, policy_name)
    table = unit_table(b20, x[:1])
    # widths (4, 8, 16): stem 3*4*9*1024 = 110,592; branch 1 (4*8 + 8*8)*9*1024 + 80 = 884,816;
    # stage 1: 3 blocks of 2*4*4*9*1024 = 294,912 each; branch 2: 294,912 + 40
    assert table["exit_0"] == 110_592 + 884_816 == 995_408
    assert table["exit_1"] == table["exit_0"] + 3 * 294_912 + 294_952 == 2_175_096
    seen = set()
    for i in range(len(x)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = b20.dynamic_forward(x[i:i + 1], policy)
        assert executed_macs(out.trace, table).item() == counter.get_total_flops() // 2
        seen.add(out.trace.exit_index.item())
    if policy_name != "patience":
        assert seen == {0, 1, 2}


def test_batch_one_really_stops_at_exit_0(b20):
    fired = []
    hook = b20.stages[1].register_forward_hook(lambda *a: fired.append(1))
    try:
        with torch.no_grad():
            out = b20.dynamic_forward(torch.randn(1, 3, 32, 32), EntropyPolicy(thresholds=(10.0, 10.0)))
    finally:
        hook.remove()
    assert out.trace.exit_index.item() == 0 and fired == []


def test_loss_terms_are_weighted_exit_losses():
    torch.manual_seed(0)
    model = create_model("branchynet_resnet20", num_classes=7, in_chans=1, widths=(4, 8, 8),
                         exit_weights=(1.0, 0.5, 0.25))
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    model.eval()  # no batch-statistics noise: compare against the per-exit cross entropies
    terms = model.loss_terms(x, y)
    exits = model.forward_exits(x)
    assert list(terms) == ["exit_0", "exit_1", "exit_2"]
    for w, (name, value) in zip((1.0, 0.5, 0.25), terms.items()):
        k = int(name[-1])
        assert torch.allclose(value, w * nn.functional.cross_entropy(exits[k], y))
    model.train()
    sum(model.loss_terms(x, y).values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="exit_weights"):
        create_model("branchynet_resnet20", exit_weights=(1.0, 1.0))
