"""Dynamic width (Slimmable ResNet, FBS): parameter and MAC counts by hand, compact vs mask logits,
really narrow convolutions, the cost table x trace vs FlopCounterMode on the executed path, batch-1 vs
batched decisions, dense weights loaded give the dense ResNet, training terms, and errors."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fractalbench.baselines.dynamic_width import (
    FBSResNet,
    SlimmableResNet,
    channels_at,
    kept_channels,
    winners,
)
from fractalbench.baselines.resnet import CifarResNet
from fractalbench.harness import contract
from fractalbench.harness.metrics._mac_formulas import EXTRA_FORMULAS
from fractalbench.harness.policies import ConfidencePolicy, DecisionThreshold
from fractalbench.harness.registry import create_model, list_models, model_card
from fractalbench.harness.weights import fit_weights

X_SEED = 1


def counted_macs(fn, *args) -> int:
    """MACs FlopCounterMode sees while ``fn`` runs (FLOPs / 2), with the harness's formulas for the ops
    torch's registry lacks (FBS's one-sample predictors use ``addmv``)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def unit_table(model, x1) -> dict[str, int]:
    """MACs per cost unit: its probe's minus its baseline's probe's (batch 1)."""
    units = model.cost_units()
    probes = {u.name: counted_macs(u.probe, x1) for u in units}
    return {u.name: probes[u.name] - (probes[u.baseline] if u.baseline else 0) for u in units}


def batch(n=6, side=32, seed=X_SEED):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def reset_norms(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average of the batches that follow


@torch.no_grad()
def settled_slimmable(depth=20, widths=(0.25, 0.5, 0.75, 1.0), seed=0, x=None):
    """A random slimmable ResNet whose every width's BN holds the statistics of ``x`` at that width,
    so every width gives spread-out logits (no degenerate comparisons)."""
    torch.manual_seed(seed)
    model = SlimmableResNet(depth, widths=widths)
    reset_norms(model)
    model.train()
    x = batch(16) if x is None else x
    for w in model.widths:
        model.width = w
        model(x)
    model.width = 1.0
    return model.eval()


@torch.no_grad()
def settled_fbs(depth=20, seed=0, sharpen=5.0, density=0.5, x=None):
    """A random FBS ResNet with clearly input-dependent decisions (predictor weights scaled by
    ``sharpen``) and the BN statistics of ``x`` at ``density`` (the kept, boosted channels)."""
    torch.manual_seed(seed)
    model = FBSResNet(depth, density=density, zero_init_residual=False)  # every residual branch matters
    for p in model.saliency:
        p.weight.mul_(sharpen)
    reset_norms(model)
    model.train()
    model(batch(16) if x is None else x)  # training mode: every channel computed, the masked ones zeroed
    return model.eval()


def conv_weight_shapes(fn, *args):
    """Shapes of the weights of every convolution that runs inside ``fn`` (aten level)."""
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.convolution:
                shapes.append((tuple(args[1].shape), args[8]))  # (weight shape, groups)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        fn(*args)
    return shapes


# ----- registration and parameters by hand -------------------------------------------------------

# ResNet-(6n+2), option A: 97,216 n - 21,926 parameters (ResNet-20: 269,722; ResNet-56: 853,018).
# Switchable BN: every narrower width w has a BN (weight + bias) per BN layer of the full network,
# w (16 + 224 n) channels in all (stem 16, and bn1 + bn2 of n blocks of 16, 32 and 64 channels):
# widths 0.25 + 0.5 + 0.75 = 1.5 -> 2 x 1.5 x (16 + 224 n) = 3 (16 + 224 n): 2,064 (n = 3), 6,096 (n = 9).
# FBS: a predictor (C_in x C_out + C_out) per 3x3 conv of every block: stage 1 2 x (256 + 16) = 544 a
# block; stage 2: 544 + 1,056 for the first block (16 -> 32), 2 x 1,056 = 2,112 for the others; stage 3:
# 2,112 + 4,160 for the first (32 -> 64), 8,320 for the others -> 10,976 n - 2,560: 30,368 and 96,224.
def resnet_params(n):
    return 97_216 * n - 21_926


EXACT_PARAMS = {
    "slimmable_resnet20": resnet_params(3) + 2_064,  # 271,786
    "slimmable_resnet56": resnet_params(9) + 6_096,  # 859,114
    "fbs_resnet20": resnet_params(3) + 30_368,  # 300,090
    "fbs_resnet56": resnet_params(9) + 96_224,  # 949,242
}


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_parameter_counts_by_hand(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[name]
    assert EXACT_PARAMS["slimmable_resnet20"] == 271_786 and EXACT_PARAMS["fbs_resnet56"] == 949_242
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.backbone.parameters())
    assert extra == EXACT_PARAMS[name] - resnet_params(3 if name.endswith("20") else 9)


def test_registered_names_and_cards():
    assert {"slimmable_resnet20", "slimmable_resnet56", "fbs_resnet20", "fbs_resnet56"} <= set(list_models())
    slim, fbs = model_card("slimmable_resnet56"), model_card("fbs_resnet20")
    assert slim.dynamic_kind == fbs.dynamic_kind == "gated"
    assert (slim.family, fbs.family) == ("slimmable", "fbs")
    assert slim.reference["s_resnet50_imagenet_top1_err_pct_w1.00"] == 24.0
    assert slim.reference["s_resnet50_imagenet_top1_err_pct_w0.25"] == 35.0
    assert slim.reference["s_mobilenet_v1_imagenet_mmacs_w1.00"] == 569.0
    assert fbs.reference["mcifarnet_fbs_d0.5_top1_pct"] == 90.54 and fbs.reference["mcifarnet_dense_macs"] == 174e6
    assert "epochs=100" in slim.paper_recipe and "lambda = 1e-8" in fbs.paper_recipe
    assert create_model("fbs_resnet56", density=0.25).density == 0.25
    assert create_model("slimmable_resnet20", width=0.5).width == 0.5


def test_fbs_zero_init_residual_starts_identity_blocks():
    model = create_model("fbs_resnet20")
    identity = [b for b in model.blocks if isinstance(b.shortcut, nn.Identity)]
    assert len(identity) == 7 and all(b.bn2.weight.abs().sum() == 0 for b in identity)
    assert all(b.bn2.weight.eq(1).all() for b in model.blocks if b not in identity)
    assert all(b.bn2.weight.eq(1).all() for b in create_model("fbs_resnet20", zero_init_residual=False).blocks)
    with torch.no_grad():  # a random ResNet-56 with default BN statistics stays finite in eval mode
        assert torch.isfinite(create_model("fbs_resnet56").eval()(batch(2))).all()


def test_channel_rules():
    assert [channels_at(64, w) for w in (0.25, 0.375, 0.5, 0.75, 1.0)] == [16, 24, 32, 48, 64]
    assert channels_at(16, 0.01) == 1
    assert [kept_channels(16, d) for d in (0.0, 0.25, 0.3, 0.5, 0.99, 1.0)] == [0, 4, 5, 8, 16, 16]
    g = torch.tensor([[0.5, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    idx, val = winners(g, 2)  # ties go to the lower channel index
    assert idx.tolist() == [[1, 2], [3, 0]] and val.tolist() == [[2.0, 2.0], [3.0, 0.0]]
    assert winners(g, 4)[0] is None


# ----- MACs by hand ----------------------------------------------------------------------------------

# ResNet-20 at 32x32: stem 3*16*9*1024 = 442,368; every other 3x3 conv 2,359,296 except the two
# stride-2 first convs (1,179,648 each); head 64*10 = 640; total 40,551,040.
# Slimmable at width w: every conv has both sides scaled (w^2) but the stem (w) and the head (w):
# MACs(w) = 443,008 w + 40,108,032 w^2.
SLIM20 = {0.25: 2_617_504, 0.5: 10_248_512, 0.75: 22_893_024, 1.0: 40_551_040}


def test_slimmable_macs_by_hand():
    assert all(SLIM20[w] == 443_008 * w + 40_108_032 * w * w for w in SLIM20)
    model = settled_slimmable()
    x1 = batch(1)
    assert unit_table(model, x1) == {"width_0.25": 2_617_504, "width_0.5": 10_248_512 - 2_617_504,
                                     "width_0.75": 22_893_024 - 10_248_512, "width_1": 40_551_040 - 22_893_024}
    for w, macs in SLIM20.items():
        model.width = w
        assert counted_macs(model, x1) == macs
        assert counted_macs(model.dynamic_forward, x1, None, "mask") == SLIM20[1.0]  # mask: every channel


# FBS on ResNet-20, per block: base = stem 442,368 + head 640 + the first-conv predictors (sum of
# C_in x C1: 3*256 + 512 + 2*1,024 + 2,048 + 2*4,096 = 13,568) = 456,576; unit conv1 (one kept output
# channel of conv1, and conv2's predictor reading it) = C_in*9*H'W' + C2: 147,472 (stage 1),
# 36,896 / 73,760 (stage 2 first / others), 18,496 / 36,928 (stage 3); unit conv2 (one channel
# pair) = 9*H'W': 9,216 / 2,304 / 576. A sample at (k1, k2) per block: base + sum k1 u1 + k1 k2 u2.
FBS20_UNITS = {"base": 456_576, "layer1.0.conv1": 147_472, "layer1.0.conv2": 9_216,
               "layer2.0.conv1": 36_896, "layer2.0.conv2": 2_304, "layer2.1.conv1": 73_760,
               "layer3.0.conv1": 18_496, "layer3.0.conv2": 576, "layer3.2.conv1": 36_928}
# density 0.25: k = 4 / 8 / 16; 0.5: 8 / 16 / 32; 1.0: every channel (dense 40,551,040 + the 29,696
# MACs of all predictors).
FBS20 = {0.25: 6_506_304, 0.5: 15_210_240, 1.0: 40_580_736}


def fbs20_by_hand(density):
    stage = [(16, 16, 147_472, 147_472, 9_216), (16, 32, 36_896, 73_760, 2_304), (32, 64, 18_496, 36_928, 576)]
    total = 456_576
    for _, c, first_u1, u1, u2 in stage:
        k = kept_channels(c, density)
        total += k * first_u1 + k * k * u2 + 2 * (k * u1 + k * k * u2)
    return total


def test_fbs_macs_by_hand():
    assert {d: fbs20_by_hand(d) for d in FBS20} == FBS20
    model = settled_fbs()
    x1 = batch(1)
    table = unit_table(model, x1)
    assert len(table) == 1 + 2 * 9
    assert {k: table[k] for k in FBS20_UNITS} == FBS20_UNITS
    for d in (0.25, 0.5, 0.75, 1.0):
        model.density = d
        assert counted_macs(model, x1) == fbs20_by_hand(d)
    assert counted_macs(model.dynamic_forward, x1, None, "mask") == FBS20[1.0]
    assert counted_macs(model.dynamic_forward, x1, DecisionThreshold((1.0,))) == 456_576  # nothing kept


# ----- really narrow: the weights the convolutions run with --------------------------------------------

def test_compact_runs_narrow_convolutions():
    slim = settled_slimmable()
    slim.width = 0.5
    shapes = conv_weight_shapes(slim, batch(1))
    assert shapes[0] == ((8, 3, 3, 3), 1) and shapes[1] == ((8, 8, 3, 3), 1) and shapes[-1] == ((32, 32, 3, 3), 1)
    assert all(s[0][0] <= 32 for s in shapes)
    fbs = settled_fbs(density=0.5)
    shapes = conv_weight_shapes(fbs, batch(1))
    assert shapes[1:3] == [((8, 16, 3, 3), 1), ((8, 8, 3, 3), 1)]  # conv1: 8 of 16 out; conv2: 8 x 8
    assert shapes[-2:] == [((32, 64, 3, 3), 1), ((32, 32, 3, 3), 1)]
    # a batch: one grouped convolution of every sample's own channels (groups = N)
    shapes = conv_weight_shapes(fbs, batch(3))
    assert shapes[1:3] == [((24, 16, 3, 3), 3), ((24, 8, 3, 3), 3)]
    # mask mode computes every channel
    shapes = conv_weight_shapes(lambda x: fbs.dynamic_forward(x, mode="mask"), batch(1))
    assert shapes[1:3] == [((16, 16, 3, 3), 1), ((16, 16, 3, 3), 1)]


# ----- compact vs mask, batch 1 vs batched, the cost table vs counted MACs --------------------------------

@pytest.mark.parametrize("width", [0.25, 0.5, 0.75, 1.0])
def test_slimmable_compact_equals_mask(width):
    model = settled_slimmable()
    model.width = width
    x = batch(6)
    with torch.no_grad():
        compact, mask = model.dynamic_forward(x), model.dynamic_forward(x, mode="mask")
        ones = [model.dynamic_forward(x[i:i + 1]).logits[0] for i in range(6)]
    assert compact.logits.std() > 0.1  # spread-out logits: a real comparison
    assert torch.allclose(compact.logits, mask.logits, rtol=1e-4, atol=1e-4)
    assert torch.allclose(torch.stack(ones), compact.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(compact.trace.gates, mask.trace.gates)
    j = model.widths.index(width)
    assert compact.trace.gates[0].tolist() == [g <= j for g in range(4)]
    assert compact.trace.extras["width"].tolist() == [width] * 6


def test_slimmable_sub_network_is_the_narrow_resnet():
    """Width 0.5 is CifarResNet with stage widths (8, 16, 32) on the first weight slices and that width's BNs."""
    model = settled_slimmable()
    model.width = 0.5
    narrow = CifarResNet(20, widths=(8, 16, 32)).eval()
    full, j = model.backbone, model.widths.index(0.5)
    bns = iter(model.switchable_bn[j])
    with torch.no_grad():
        for m, big in zip(narrow.modules(), full.modules()):
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(big.weight[:m.out_channels, :m.in_channels])
            elif isinstance(m, nn.BatchNorm2d):
                m.load_state_dict(next(bns).state_dict())
            elif isinstance(m, nn.Linear):
                m.weight.copy_(big.weight[:, :m.in_features])
                m.bias.copy_(big.bias)
        x = batch(4)
        assert torch.allclose(model(x), narrow(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75, 1.0])
def test_fbs_compact_equals_mask_and_batch1(density):
    model = settled_fbs(density=density)
    x = batch(6)
    with torch.no_grad():
        compact, mask = model.dynamic_forward(x), model.dynamic_forward(x, mode="mask")
        ones = [model.dynamic_forward(x[i:i + 1]) for i in range(6)]
    assert compact.logits.std() > 0.1
    assert torch.allclose(compact.logits, mask.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(compact.trace.gates, mask.trace.gates)
    for i, one in enumerate(ones):
        assert torch.equal(one.trace.gates[0], compact.trace.gates[i])
        assert torch.allclose(one.logits[0], compact.logits[i], rtol=1e-4, atol=1e-4)
    gates = compact.trace.gates
    assert gates.shape == (6, 2 * (3 * 16 + 3 * 32 + 3 * 64))
    if density < 1.0:  # the decisions depend on the input: samples keep different channels
        assert not all(torch.equal(gates[0], gates[i]) for i in range(1, 6))
        first = gates[:, :16].sum(1)  # layer1.0.conv1
        assert first.tolist() == [kept_channels(16, density)] * 6


@pytest.mark.parametrize("kind,setting", [("slim", 0.25), ("slim", 0.75), ("fbs", 0.25), ("fbs", 0.5),
                                          ("fbs", 1.0)])
def test_trace_times_cost_table_equals_counted_macs(kind, setting):
    """FlopCounterMode on the executed path (the batch, each sample at batch 1, and mask mode) equals
    the cost table times the trace of that same call."""
    if kind == "slim":
        model = settled_slimmable()
        model.width = setting
    else:
        model = settled_fbs(density=setting)
    x = batch(5)
    table = unit_table(model, x[:1])
    for mode in ("compact", "mask"):
        out = model.dynamic_forward(x, None, mode)
        counted = counted_macs(model.dynamic_forward, x, None, mode)
        assert counted == float(contract.executed_macs(out.trace, table).sum())
    for i in range(5):
        out = model.dynamic_forward(x[i:i + 1])
        assert counted_macs(model.dynamic_forward, x[i:i + 1]) == float(contract.executed_macs(out.trace, table)[0])


def test_decision_threshold_sets_width_and_density():
    slim = settled_slimmable()
    x = batch(2)
    for t, w in [(0.0, 1.0), (0.2, 0.75), (0.25, 0.75), (0.3, 0.5), (0.6, 0.25), (1.0, 0.25)]:
        assert slim.dynamic_forward(x, DecisionThreshold((t,))).trace.extras["width"].tolist() == [w, w]
    fbs = settled_fbs(density=1.0)
    out = fbs.dynamic_forward(x, DecisionThreshold((0.5,)))
    assert out.trace.extras["density"].tolist() == [0.5, 0.5]
    assert out.trace.unit_counts["layer3.1.conv2"].tolist() == [32 * 32.0] * 2
    # t = 1 keeps no channel: every block is its shortcut
    b = fbs.backbone
    with torch.no_grad():
        h = b.stem(x)
        for block in fbs.blocks:
            h = torch.relu(block.shortcut(h))
        assert torch.allclose(fbs.dynamic_forward(x, DecisionThreshold((1.0,))).logits, b.head(h), atol=1e-6)
    with pytest.raises(ValueError, match=r"decision_threshold 1.5 is outside \[0, 1\]"):
        fbs.dynamic_forward(x, DecisionThreshold((1.5,)))
    with pytest.raises(TypeError, match="decision_threshold policy or None"):
        slim.dynamic_forward(x, ConfidencePolicy(thresholds=()))


# ----- dense weights ------------------------------------------------------------------------------

@torch.no_grad()
def trained_looking_resnet(depth=20, seed=3):
    torch.manual_seed(seed)
    dense = CifarResNet(depth)
    for m in dense.modules():  # non-trivial BN statistics and affine, as in a trained network
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    dense.train()
    reset_norms(dense)
    dense(batch(16))
    return dense.eval()


def test_dense_weights_give_the_dense_resnet_at_full_width_and_density():
    dense = trained_looking_resnet()
    x = batch(4)
    with torch.no_grad():
        expected = dense(x)
    slim = create_model("slimmable_resnet20")
    assert fit_weights(slim, dense.state_dict(), "test") == "backbone"
    slim.eval()
    with torch.no_grad():
        assert torch.equal(slim(x), expected)
        assert torch.allclose(slim.dynamic_forward(x, mode="mask").logits, expected, atol=1e-5)
    for j, w in enumerate(slim.widths[:-1]):  # every width's BN starts from the dense BN's first channels
        stem_bn, dense_bn = slim.switchable_bn[j][0], dense.stem[1]
        k = channels_at(16, w)
        assert torch.equal(stem_bn.running_var, dense_bn.running_var[:k])
        assert torch.equal(stem_bn.weight, dense_bn.weight[:k])
        last = slim.switchable_bn[j][-1]
        assert torch.equal(last.running_mean, dense.layer3[-1].bn2.running_mean[:channels_at(64, w)])

    fbs = create_model("fbs_resnet20", density=1.0)
    assert fit_weights(fbs, dense.state_dict(), "test") == "backbone"
    fbs.eval()
    with torch.no_grad():
        assert torch.equal(fbs.dynamic_forward(x, mode="mask").logits, expected)  # saliencies all exactly 1
        assert torch.allclose(fbs(x), expected, rtol=1e-5, atol=1e-5)  # compact: BN folded into the weights
        fbs.density = 0.5  # every saliency is 1: the ties keep the first half of the channels
        gates = fbs.dynamic_forward(x).trace.gates
    assert gates[:, :16].tolist() == [[True] * 8 + [False] * 8] * 4


def test_state_dicts_hold_each_tensor_once():
    dense_keys = {f"backbone.{k}" for k in CifarResNet(20).state_dict()}
    slim = create_model("slimmable_resnet20")
    keys = set(slim.state_dict())
    assert dense_keys <= keys and len(slim.state_dict()) == len(keys)
    narrow = keys - dense_keys
    assert all(k.startswith("switchable_bn.") for k in narrow)
    assert len(narrow) == 3 * 19 * 5  # 3 narrower widths x 19 BN layers x (weight, bias, mean, var, count)
    pointers = [t.data_ptr() for t in slim.state_dict().values() if t.numel()]
    assert len(pointers) == len(set(pointers))
    fbs_keys = set(create_model("fbs_resnet20").state_dict())
    assert fbs_keys - dense_keys == {f"saliency.{i}.{p}" for i in range(18) for p in ("weight", "bias")}


def test_attribute_sweep_copies_keep_their_setting():
    """The harness's attribute_sweep deep-copies the model and sets the attribute."""
    slim = settled_slimmable()
    copied = copy.deepcopy(slim)
    copied.width = 0.25
    assert slim.width == 1.0 and copied.head.__dict__["linear"] is copied.backbone.head[2]
    with torch.no_grad():
        assert torch.equal(copied.dynamic_forward(batch(2)).logits, slim.dynamic_forward(batch(2), DecisionThreshold(
            (0.75,))).logits)


# ----- training ------------------------------------------------------------------------------------

def test_slimmable_training_runs_every_width():
    model = settled_slimmable()
    model.train()
    x, y = batch(8), torch.arange(8) % 10
    terms = model.loss_terms(x, y)
    assert list(terms) == [f"cross_entropy_width{w:g}" for w in (0.25, 0.5, 0.75, 1.0)]
    sum(terms.values()).backward()
    assert all(bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
               for bns in model.switchable_bn for bn in bns)
    assert model.backbone.layer1[0].conv1.weight.grad.abs().sum() > 0
    for p in model.backbone.parameters():  # freeze: backbone trains the narrow widths' BNs only
        p.requires_grad_(False)
    assert list(model.loss_terms(x, y)) == [f"cross_entropy_width{w:g}" for w in (0.25, 0.5, 0.75)]


def test_fbs_training_terms_and_gradients():
    model = settled_fbs(density=0.5)
    model.l1_weight = 1e-3
    model.train()
    x, y = batch(8), torch.arange(8) % 10
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    terms = model.loss_terms(x, y)
    assert set(terms) == {"cross_entropy", "saliency_l1"}
    # the lasso by hand: every predictor's g = relu(W avgpool(input) + b) on the masked forward
    saliencies = []
    h = model.backbone.stem(x)
    for i, block in enumerate(model.blocks):
        g1 = model.saliency[2 * i](h.mean((2, 3)))
        idx1, _ = winners(g1, 8 * (1 + (i >= 3) + 2 * (i >= 6)))
        pi1 = g1 * torch.zeros_like(g1).scatter_(1, idx1, 1.0)
        o = torch.relu(block.bn1(block.conv1(h)) * pi1[:, :, None, None])
        g2 = model.saliency[2 * i + 1](o.mean((2, 3)))
        idx2, _ = winners(g2, idx1.shape[1])
        pi2 = g2 * torch.zeros_like(g2).scatter_(1, idx2, 1.0)
        h = torch.relu(block.bn2(block.conv2(o)) * pi2[:, :, None, None] + block.shortcut(h))
        saliencies += [g1, g2]
    expected = 1e-3 * sum(float(g.detach().abs().sum(1).mean()) for g in saliencies)
    assert float(terms["saliency_l1"].detach()) == pytest.approx(expected, rel=1e-5)
    assert float(terms["cross_entropy"].detach()) == pytest.approx(float(torch.nn.functional.cross_entropy(
        model.backbone.head(h), y).detach()), rel=1e-5)
    sum(terms.values()).backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in model.saliency)


# ----- errors ----------------------------------------------------------------------------------------

def test_errors_name_what_is_allowed():
    slim = create_model("slimmable_resnet20")
    with pytest.raises(ValueError, match="width 0.3 is not one of the widths this network was built with: "
                                         "0.25, 0.5, 0.75, 1"):
        slim.width = 0.3
    with pytest.raises(ValueError, match="width 0.6 is not one of"):
        create_model("slimmable_resnet20", width=0.6)
    with pytest.raises(ValueError, match="widths must be distinct, increasing, in \\(0, 1\\] and end at 1.0"):
        create_model("slimmable_resnet20", widths=[0.5, 0.75])
    with pytest.raises(ValueError, match="end at 1.0"):
        create_model("slimmable_resnet20", widths=[0.5, 0.25, 1.0])
    with pytest.raises(ValueError, match="widths must be a list of numbers"):
        create_model("slimmable_resnet20", widths="wide")
    fbs = create_model("fbs_resnet20")
    for bad in (0.0, 1.5, -0.25, "half"):
        with pytest.raises(ValueError, match="must be in \\(0, 1\\]: the fraction of channels FBS keeps"):
            fbs.density = bad
    with pytest.raises(ValueError, match="density 2 must be in"):
        create_model("fbs_resnet56", density=2)
    with pytest.raises(ValueError, match="exit index 1 is out of range"):
        contract.forced_forward(fbs, batch(1), 1)
    with pytest.raises(ValueError, match="inference mode 'skip' is not one of compact, mask"):
        contract.dynamic_forward(slim, batch(1), None, "skip")
