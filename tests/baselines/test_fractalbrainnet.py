"""FractalBrainNet, the network: the shared mask cache and the gamma band, the presets against the
measured numbers in their model cards, the options (downsampling included), the early-exit variant
against the dynamic-model contract and the pattern analysis. The patterns and building blocks are
tested in test_fractalbrainnet_parts.py."""
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fractalbench.baselines.fractalbrainnet as fb
from fractalbench.baselines.fractalbrainnet import (
    CerebralDynamicsModule,
    FractalBrainNet,
    FractalBrainNetEE,
    FractalMaskCache,
    FractalPatternType,
    analyze_fractal_patterns,
    create_fractal_brain_net,
    pattern_images,
)
from fractalbench.baselines.fractalbrainnet import FractalPatternGenerator as G
from fractalbench.harness import contract
from fractalbench.harness.metrics.flops import ZERO_MAC_OPS, count_macs
from fractalbench.harness.policies import ConfidencePolicy
from fractalbench.harness.registry import create_model, list_models, model_card

SIZES = ("small", "medium", "large", "xlarge")
ALL_NAMES = [f"fractalbrainnet_{s}" for s in SIZES] + ["fractalbrainnet_small_ee", "fractalbrainnet_medium_ee"]


def tiny(**kw):
    """A FractalBrainNet small enough for many forwards."""
    options = dict(fractal_levels=(1, 2), base_channels=8, pattern_resolution=16)
    options.update(kw)
    return FractalBrainNet(**options)


def output_sizes(model, modules, size):
    """The (h, w) of every output of ``modules`` while the model (eval) runs on one size x size input."""
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[-2:]))) for m in modules]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, model.config["in_chans"], size, size))
    finally:
        for h in hooks:
            h.remove()
    return sizes


# ----- masks and bands ------------------------------------------------------------------------------

def test_mask_is_cached_shared_and_not_in_the_state_dict():
    model = tiny()
    cds = [m for m in model.modules() if isinstance(m, CerebralDynamicsModule)]
    assert len(cds) == 1 + 3  # level-1 block of stage 0, level-2 block of stage 1 (3 convs)
    assert all(cd.masks is model.mask_cache for cd in cds)
    first = cds[0].fractal_mask(8, 8)
    assert cds[0].fractal_mask(8, 8) is first and cds[1].fractal_mask(8, 8) is first
    assert cds[0].masks.modulation(8, 8) is cds[1].masks.modulation(8, 8, "cpu", torch.float32)
    assert cds[0].fractal_mask(8, 8, dtype=torch.float64) is not first
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    entries = len(model.mask_cache)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(model.mask_cache) == entries  # no new resizing on the second forward
    assert not any("pattern" in k or "mask" in k for k in model.state_dict())


def test_masks_made_in_inference_mode_still_train():
    model = tiny()
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 32, 32))
    model.train()
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()


@pytest.mark.parametrize("early_exit", [False, True])
def test_gamma_band_is_half_by_default_and_half_the_mask_as_an_option(early_exit):
    """Every band modulation a forward uses: gamma = 0.5 exactly (the description), or 0.5 x mask."""
    for option, gamma_band in ((None, "constant"), ("constant", "constant"), ("mask", "mask")):
        model = create_fractal_brain_net("small", early_exit=early_exit,
                                         **({} if option is None else {"gamma_band": option})).eval()
        assert model.config["gamma_band"] == gamma_band and model.mask_cache.gamma_band == gamma_band
        cds = [m for m in model.modules() if isinstance(m, CerebralDynamicsModule)]
        assert all(cd.masks is model.mask_cache for cd in cds)
        seen = set(output_sizes(model, cds, 32))  # a band module's output has its input's size
        assert seen == {(16, 16), (8, 8), (4, 4)}
        for h, w in seen:
            mod, mask = model.mask_cache.modulation(h, w), fb.resize_bilinear(model.mask_cache.pattern, h, w)
            gamma = np.full((h, w), 0.5) if gamma_band == "constant" else 0.5 * mask
            assert torch.equal(mod[0, 2, 0], torch.from_numpy(gamma).float())
            assert torch.equal(mod[0, 0, 0], torch.from_numpy(mask).float())  # alpha stays the mask
            if gamma_band == "constant":
                assert torch.all(mod[0, 2] == 0.5)


# ----- presets, registration, reference numbers -----------------------------------------------------

def test_registered_names_and_cards():
    assert list_models("fractalbrainnet*") == sorted(ALL_NAMES)
    for name in ALL_NAMES:
        card = model_card(name)
        assert card.family == "fractalbrainnet" and card.input_size == 32
        assert card.dynamic_kind == ("early_exit" if name.endswith("_ee") else "static")
        assert {"params", "macs_32", "macs_64"} <= set(card.reference)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_parameters_and_macs_match_the_model_card(name):
    """Counted on the meta device (shapes only: no memory, no arithmetic)."""
    ref = model_card(name).reference
    with torch.device("meta"):
        model = create_model(name, num_classes=10, in_chans=3).eval()
    assert sum(p.numel() for p in model.parameters()) == ref["params"]
    for size in (32, 64):
        count = count_macs(model, torch.empty(1, 3, size, size, device="meta"))
        assert count.unsupported_ops == {}
        assert count.total == ref[f"macs_{size}"]
    for k in range(contract.num_exits(model) if name.endswith("_ee") else 0):
        count = count_macs(lambda t, k=k: model.forced_forward(t, k), torch.empty(1, 3, 32, 32, device="meta"),
                           module=model)
        assert count.total == ref[f"macs_32_exit_{k}"]


def test_meta_counts_equal_real_counts_and_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = create_model("fractalbrainnet_small").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() / 2 == model_card("fractalbrainnet_small").reference["macs_32"]
    assert sum(p.numel() for p in model.parameters()) == model_card("fractalbrainnet_small").reference["params"]


def test_small_is_cheap_and_the_pattern_does_not_change_the_cost():
    ref = model_card("fractalbrainnet_small").reference
    assert ref["macs_32"] < 100e6 and ref["macs_64"] == pytest.approx(4 * ref["macs_32"], rel=0.01)
    model = create_model("fractalbrainnet_small", fractal_pattern="dragon_curve").eval()
    assert count_macs(model, torch.randn(1, 3, 32, 32)).total == ref["macs_32"]


@pytest.mark.parametrize("name", ["fractalbrainnet_small", "fractalbrainnet_medium_ee"])
@pytest.mark.parametrize("size", [32, 64, 37])
def test_adaptive_downsampling_saves_exactly_the_stride_two_convs(name, size):
    """conv minus adaptive = the removed 3x3 stride-2 convs, computed by hand (their BN and GELU and
    the adaptive pooling are 0 MACs in this counter); nothing else changes."""
    preset = fb.PRESETS[name.removeprefix("fractalbrainnet_").removesuffix("_ee")]
    counts, params = {}, {}
    for kind in ("conv", "adaptive"):
        with torch.device("meta"):
            model = create_model(name, downsample=kind).eval()
        counts[kind] = count_macs(model, torch.empty(1, 3, size, size, device="meta"))
        params[kind] = sum(p.numel() for p in model.parameters())
    side, macs, weights = math.ceil(size / 2), 0, 0  # after the 7x7 stride-2 stem
    removed = len(preset["fractal_levels"]) - 1  # every stage but the last downsamples
    for i in range(removed):
        c = preset["base_channels"] * 2 ** min(i, 4)
        side = math.ceil(side / 2)  # (side + 2 - 3) // 2 + 1
        macs += c * c * 9 * side * side  # Cout * Cin * 9 * Hout * Wout
        weights += c * c * 9 + c + 2 * c  # conv weight and bias, BN weight and bias
    conv, adaptive = counts["conv"], counts["adaptive"]
    assert conv.total - adaptive.total == macs
    assert conv.by_operator["aten.convolution"] - adaptive.by_operator["aten.convolution"] == macs
    assert {k: v for k, v in conv.by_operator.items() if k != "aten.convolution"} == {
        k: v for k, v in adaptive.by_operator.items() if k != "aten.convolution"}
    assert params["conv"] - params["adaptive"] == weights
    bn, pool = "aten._native_batch_norm_legit_no_training", "aten._adaptive_avg_pool2d"
    assert bn in ZERO_MAC_OPS and pool in ZERO_MAC_OPS
    assert conv.op_calls[bn] - adaptive.op_calls[bn] == removed
    assert adaptive.op_calls.get(pool, 0) - conv.op_calls.get(pool, 0) == removed
    assert conv.unsupported_ops == adaptive.unsupported_ops == {}


def _sgd_step(model, size, in_chans=3, batch=2, num_classes=10):
    model.train()
    x, y = torch.randn(batch, in_chans, size, size), torch.arange(batch) % num_classes
    params = list(model.parameters())
    watched = params[:1] + params[-1:]  # stem conv and last classifier layer (cloning all of xlarge costs 3.5 GB)
    before = [p.detach().clone() for p in watched]
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    loss = sum(contract.loss_terms(model, x, y).values())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, watched))
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", list(FractalPatternType))
def test_small_with_every_pattern_trains_at_32_and_64(kind):
    torch.manual_seed(0)
    model = create_model("fractalbrainnet_small", fractal_pattern=kind.value)
    assert model.pattern_type is kind
    _sgd_step(model, 32)
    _sgd_step(model, 64)


@pytest.mark.parametrize("name", ["fractalbrainnet_small_ee", "fractalbrainnet_medium", "fractalbrainnet_medium_ee"])
def test_medium_and_early_exit_presets_train_at_32_and_64(name):
    torch.manual_seed(0)
    model = create_model(name)
    _sgd_step(model, 32, batch=2)
    _sgd_step(model, 64, batch=1 if "medium" in name else 2)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["large", "xlarge"])
def test_large_presets_train_at_32_and_64(size):
    torch.manual_seed(0)
    model = create_model(f"fractalbrainnet_{size}")
    _sgd_step(model, 32, batch=1)
    _sgd_step(model, 64, batch=1)


@pytest.mark.parametrize("name", ["fractalbrainnet_small", "fractalbrainnet_small_ee"])
def test_one_channel_16px_digits_input(name):
    torch.manual_seed(0)
    _sgd_step(create_model(name, in_chans=1, num_classes=10), 16, in_chans=1, batch=4)


def test_options_and_errors():
    model = create_fractal_brain_net("small", num_classes=5, fractal_pattern="julia", downsample="avgpool",
                                     branch_attention="pixel", enable_continuous_learning=False,
                                     pattern_options={"c_real": 0.285, "c_imag": 0.01})
    assert model.head.meta_learner is None and model.config["downsample"] == "avgpool"
    assert np.array_equal(pattern_images(model)["julia"], G.julia_connectivity(16, 16, 0.285, 0.01))
    _sgd_step(model, 32, num_classes=5)
    with pytest.raises(ValueError, match="allowed: small, medium, large, xlarge"):
        create_fractal_brain_net("tiny")
    with pytest.raises(ValueError, match="fractal_levels"):
        FractalBrainNet(fractal_levels=())
    with pytest.raises(ValueError, match="downsample must be one of 'adaptive', 'conv', 'avgpool'"):
        tiny(fractal_levels=(1,), downsample="maxpool")  # checked even when no stage downsamples
    allowed_gamma = "gamma_band must be one of 'constant', 'mask', got 'pixel'"
    for build in (tiny, tiny_ee, lambda **kw: create_model("fractalbrainnet_small", **kw),
                  lambda **kw: FractalMaskCache(np.full((4, 4), 0.5), **kw)):
        with pytest.raises(ValueError, match=allowed_gamma):
            build(gamma_band="pixel")
    with pytest.raises(ValueError, match="branch_attention"):
        tiny(branch_attention="sigmoid")
    with pytest.raises(ValueError, match="allowed"):
        create_model("fractalbrainnet_small", fractal_pattern="koch")
    with pytest.raises(ValueError, match="does not take these options"):
        create_model("fractalbrainnet_small", widen=2)


@pytest.mark.parametrize("downsample", ["adaptive", "conv", "avgpool"])
def test_downsampling_halves_and_never_goes_below_one_pixel(downsample):
    model = tiny(fractal_levels=(1, 1, 1, 1, 1), stem_stride=2, downsample=downsample)
    sizes = output_sizes(model, model.fractal_stages, 16)
    assert [h for h, _ in sizes] == [4, 2, 1, 1, 1]  # stem 8; the last stage keeps its size


def test_default_downsampling_is_adaptive_pooling_to_half_the_size():
    halve = fb.AdaptiveHalving()
    for (h, w), out in {(32, 32): (16, 16), (16, 16): (8, 8), (5, 5): (3, 3), (5, 8): (3, 4), (1, 1): (1, 1)}.items():
        x = torch.randn(2, 3, h, w)
        assert halve(x).shape == (2, 3, *out) and torch.equal(halve(x), F.adaptive_avg_pool2d(x, out))
    x = torch.randn(1, 2, 6, 6)
    assert torch.allclose(halve(x), F.avg_pool2d(x, 2))  # even sizes: plain 2x2 means
    model = create_fractal_brain_net("small").eval()
    assert model.config["downsample"] == "adaptive"
    pools = [stage.pool for stage in model.fractal_stages]
    assert all(type(p) is fb.AdaptiveHalving for p in pools[:-1]) and isinstance(pools[-1], nn.Identity)
    assert not [p for pool in pools for p in pool.parameters()]
    for size, expected in ((64, [16, 8, 8]), (32, [8, 4, 4]), (10, [3, 2, 2])):  # stem: 32, 16, 5
        assert [h for h, _ in output_sizes(model, model.fractal_stages, size)] == expected
    conv = create_fractal_brain_net("small", downsample="conv")  # the build's former default, unchanged
    for stage, channels in zip(conv.fractal_stages[:-1], conv.stage_channels):
        assert [type(m) for m in stage.pool] == [nn.Conv2d, nn.BatchNorm2d, nn.GELU]
        c = stage.pool[0]
        assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) == (
            channels, channels, (3, 3), (2, 2), (1, 1))


def test_initialisation():
    model = tiny()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(m.bias.abs().sum() == 0 for m in linears)
    weights = torch.cat([m.weight.flatten() for m in linears])  # trunc_normal_(std=0.02), cut at +-2 (absolute)
    assert weights.std().item() == pytest.approx(0.02, rel=0.1) and weights.abs().max() <= 2
    conv = model.fractal_stages[1].scale.global_processor  # kaiming fan_out: std = sqrt(2 / (out * k * k))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (16 * 25)), rel=0.1)
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, nn.Conv2d))


# ----- early exit -----------------------------------------------------------------------------------

def tiny_ee(**kw):
    options = dict(fractal_levels=(1, 2, 1), base_channels=8, pattern_resolution=16)
    options.update(kw)
    return FractalBrainNetEE(**options)


def test_early_exit_variant_shares_the_backbone():
    torch.manual_seed(0)
    plain = tiny(fractal_levels=(1, 2, 1)).eval()
    torch.manual_seed(0)
    ee = tiny_ee().eval()
    assert ee.num_exits == 3 and contract.dynamic_kind(ee) == "early_exit"
    extra = sum(p.numel() for h in ee.heads[:-1] for p in h.parameters())
    assert extra == (8 + 1) * 10 + (16 + 1) * 10
    assert sum(p.numel() for p in ee.parameters()) == sum(p.numel() for p in plain.parameters()) + extra
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ee(x), plain(x), atol=1e-5)
        assert torch.allclose(ee.forward_exits(x)[-1], plain(x), atol=1e-5)


def later_modules(model, k):
    """Every module of the stages and heads after exit k."""
    parts = [p for i in range(k + 1, model.num_exits) for p in (model.stages[i], model.heads[i])]
    return [m for p in parts for m in p.modules()]


@contextmanager
def record_calls(modules):
    fired = []
    hooks = [m.register_forward_pre_hook(lambda m, i: fired.append(type(m).__name__)) for m in modules]
    try:
        yield fired
    finally:
        for h in hooks:
            h.remove()


def test_forced_forward_equals_exits_and_runs_nothing_after():
    torch.manual_seed(0)
    model = tiny_ee().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        with record_calls(later_modules(model, 0)) as fired:
            exits = model.forward_exits(x)
        assert "CerebralDynamicsModule" in fired and "GlobalAttention" in fired  # the hooks do see calls
        for k in range(model.num_exits):
            with record_calls(later_modules(model, k)) as fired:
                out = model.forced_forward(x, k)
            assert fired == [], f"exit {k}: later modules ran"
            assert torch.allclose(out, exits[k], atol=1e-5)


def test_dynamic_forward_batch_one_equals_batched_decisions():
    torch.manual_seed(0)
    model = tiny_ee().eval()
    x = torch.randn(10, 3, 32, 32)
    with torch.no_grad():
        first = torch.softmax(model.forward_exits(x)[0], -1).amax(-1)
        policy = ConfidencePolicy(thresholds=(float(first.median()), 2.0))  # half leave at exit 0, none at 1
        batched = model.dynamic_forward(x, policy)
        masked = model.dynamic_forward(x, policy, mode="mask")
        assert 0 < (batched.trace.exit_index == 0).sum() < 10
        assert torch.equal(batched.trace.exit_index, masked.trace.exit_index)
        assert torch.allclose(batched.logits, masked.logits, atol=1e-5)
        for i in range(10):
            one = model.dynamic_forward(x[i:i + 1], policy)
            assert one.trace.exit_index.item() == batched.trace.exit_index[i].item()
            for unit, counts in batched.trace.unit_counts.items():
                assert one.trace.unit_counts[unit].item() == counts[i].item()
            assert torch.allclose(one.logits[0], batched.logits[i], atol=1e-4)
        leaver = int((batched.trace.exit_index == 0).nonzero()[0])
        with record_calls(later_modules(model, 0)) as fired:
            model.dynamic_forward(x[leaver:leaver + 1], policy)
        assert fired == []  # at batch 1 a sample that leaves at exit 0 runs nothing after it


def test_early_exit_loss_terms_weight_every_exit():
    torch.manual_seed(0)
    model = tiny_ee(exit_weights=(0.5, 0.5, 1.0))
    terms = contract.loss_terms(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert list(terms) == ["exit_0", "exit_1", "exit_2"]
    sum(terms.values()).backward()
    assert all(h[-1].weight.grad.abs().sum() > 0 for h in model.heads[:-1])


# ----- analysis and pattern images --------------------------------------------------------------------

@pytest.mark.parametrize("early_exit", [False, True])
def test_analyze_fractal_patterns(early_exit):
    torch.manual_seed(0)
    model = (tiny_ee() if early_exit else tiny(fractal_levels=(1, 2, 1))).train()
    result = model.analyze_fractal_patterns(torch.randn(4, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())  # flags restored
    maps = result["attention_maps"]
    assert [m.shape for m in maps] == [(4, 1, 8, 8), (4, 1, 4, 4), (4, 1, 4, 4)]
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps)
    for c, cn, m in zip(result["pattern_complexity"], result["pattern_complexity_normalized"], maps):
        assert isinstance(c, float) and 0 < c <= math.log(m.shape[-1] * m.shape[-2]) + 1e-9
        assert cn == pytest.approx(c / math.log(m.shape[-1] * m.shape[-2]))
    hier = result["hierarchical_organization"]
    assert len(hier["correlations"]) == 2 and all(-1 <= c <= 1 for c in hier["correlations"])
    assert hier["correlation"] == pytest.approx(np.mean(hier["correlations"]))
    assert hier["hierarchy_score"] == pytest.approx(1 - hier["correlation"])
    assert torch.equal(result["fractal_pattern"], torch.from_numpy(G.mandelbrot_connectivity(16, 16)).float())


def test_analysis_measures_by_hand():
    maps = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])  # p = (0, 1/3, 1/3, 1/3): entropy ln 3
    assert fb._entropy(maps).item() == pytest.approx(math.log(3))
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]])
    assert fb._pearson(a, b).item() == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert fb._pearson(a, torch.ones(1, 3)).item() == 0.0
    assert torch.equal(fb._normalise_maps(torch.full((1, 1, 2, 2), 3.0)), torch.ones(1, 1, 2, 2))


def test_pattern_images_of_plain_and_early_exit_models():
    for model in (tiny(fractal_pattern="cantor"), tiny_ee(fractal_pattern="cantor")):
        images = pattern_images(model)
        assert list(images) == ["cantor"] and np.array_equal(images["cantor"], G.cantor_connectivity(16, 4))
    with pytest.raises(ValueError, match="not a FractalBrainNet"):
        pattern_images(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a FractalBrainNet"):
        analyze_fractal_patterns(nn.Linear(2, 2), torch.randn(1, 2))
