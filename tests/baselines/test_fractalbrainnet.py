"""FractalBrainNet: fractal patterns checked against their closed forms, the building blocks
against the description's formulas, the presets against the measured numbers in their model cards,
and the early-exit variant against the dynamic-model contract."""
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import baselines._fractal_blocks as _fractal_blocks
import baselines.fractalbrainnet as fb
from baselines.fractalbrainnet import (
    CerebralDynamicsModule,
    FractalBrainNet,
    FractalBrainNetEE,
    FractalMaskCache,
    FractalNeuralBlock,
    FractalPatternType,
    GlobalAttention,
    analyze_fractal_patterns,
    create_fractal_brain_net,
    pattern_images,
)
from baselines.fractalbrainnet import FractalPatternGenerator as G
from harness import contract
from harness.metrics.flops import count_macs
from harness.policies import ConfidencePolicy
from harness.registry import create_model, list_models, model_card

SIZES = ("small", "medium", "large", "xlarge")
ALL_NAMES = [f"fractalbrainnet_{s}" for s in SIZES] + ["fractalbrainnet_small_ee", "fractalbrainnet_medium_ee"]


def tiny(**kw):
    """A FractalBrainNet small enough for many forwards."""
    options = dict(fractal_levels=(1, 2), base_channels=8, pattern_resolution=16)
    options.update(kw)
    return FractalBrainNet(**options)


# ----- patterns -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(FractalPatternType))
@pytest.mark.parametrize("size", [17, 32])
def test_patterns_are_in_unit_interval_deterministic_and_not_trivial(kind, size):
    a, b = G.generate(kind, size), G.generate(kind.value.upper(), size)
    assert a.shape == (size, size) and a.dtype == np.float64
    assert np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert 0.0 < a.mean() < 1.0


def test_mandelbrot_escape_time_by_hand():
    assert G.escape_time(0, 0, max_iter=100) == 1.0  # c = 0 stays at 0: inside
    assert G.escape_time(0, 2, max_iter=100) == 0.02  # z = 0, 2, 6: |z| <= 2 held twice
    # c = -2, -1, 0 are in the set; c = 1: z = 0, 1, 2, 5 (3 bounded iterations); c = 2: 2
    row = G.mandelbrot_connectivity(5, 1, max_iter=100, x_range=(-2, 2), y_range=(0, 0))
    assert np.array_equal(row, [[1.0, 1.0, 1.0, 0.03, 0.02]])
    grid = G.mandelbrot_connectivity(64, 48)
    assert grid.shape == (48, 64) and grid.max() == 1.0
    assert np.array_equal(grid, grid[::-1])  # symmetric in the imaginary axis (rows)


def test_julia_with_c_zero_is_the_unit_disc():
    # c = 0: |z0| <= 1 stays bounded; z0 = +-2 is bounded once, then 4; |z0| = 3 never
    row = G.julia_connectivity(7, 1, c_real=0.0, c_imag=0.0, max_iter=100, x_range=(-3, 3), y_range=(0, 0))
    assert np.array_equal(row, [[0.0, 0.01, 1.0, 1.0, 1.0, 0.01, 0.0]])
    other = G.julia_connectivity(16, 16, c_real=0.285, c_imag=0.01)
    assert not np.array_equal(other, G.julia_connectivity(16, 16))


@pytest.mark.parametrize("size, iterations", [(32, 0), (32, 1), (32, 3), (32, 5), (8, 3), (24, 3), (24, 5), (64, 6)])
def test_sierpinski_keeps_three_quarters_of_the_area_per_iteration(size, iterations):
    pattern = G.sierpinski_connectivity(size, iterations)
    triangle = size * size / 2
    assert pattern.sum() == triangle * 0.75 ** iterations  # exact: coverage is in halves
    if size % 2 ** iterations == 0:
        assert set(np.unique(pattern)) <= {0.0, 0.5, 1.0}


def test_sierpinski_is_self_similar():
    level4 = G.sierpinski_connectivity(32, 4)
    level3 = G.sierpinski_connectivity(16, 3)
    assert np.array_equal(level4[:16, :16], level3)  # top copy
    assert np.array_equal(level4[16:, 16:], level3)  # bottom-right copy
    assert np.array_equal(level4[16:, :16], level3)  # bottom-left copy
    assert level4[:16, 16:].sum() == 0  # nothing above the hypotenuse


@pytest.mark.parametrize("iterations", [0, 1, 2, 3])
def test_cantor_line_keeps_two_thirds_per_iteration(iterations):
    line = G.cantor_line(27, iterations)  # exact: 3^3 cells
    assert set(np.unique(line)) <= {0.0, 1.0}
    assert line.sum() == pytest.approx(27 * (2 / 3) ** iterations, rel=1e-15)
    assert line.sum() == 2 ** iterations * 3 ** (3 - iterations)
    assert G.cantor_line(32, iterations).mean() == pytest.approx((2 / 3) ** iterations, rel=1e-12)


def test_cantor_line_by_hand():
    assert np.array_equal(G.cantor_line(9, 1), [1, 1, 1, 0, 0, 0, 1, 1, 1])
    assert np.array_equal(G.cantor_line(9, 2), [1, 0, 1, 0, 0, 0, 1, 0, 1])
    # 12-cell lattice averaged by 3: pixel [1/4, 1/2] meets [0, 1/3] over 1/12, a third of it
    assert np.allclose(G.cantor_line(4, 1), [1, 1 / 3, 1 / 3, 1], atol=1e-15)


def test_cantor_dust_keeps_two_thirds_per_axis():
    dust = G.cantor_connectivity(27, 2)
    rows, cols = (dust.sum(axis=1) > 0), (dust.sum(axis=0) > 0)
    assert rows.sum() == cols.sum() == 27 * (2 / 3) ** 2  # each axis keeps (2/3)^n
    assert (dust > 0).sum() == 27 * 27 * (4 / 9) ** 2
    assert np.array_equal(dust, np.outer(G.cantor_line(27, 2), G.cantor_line(27, 2)))
    line = G.cantor_connectivity(27, 2, mode="line")
    assert all(np.array_equal(r, G.cantor_line(27, 2)) for r in line)
    assert G.cantor_connectivity(32, 4).mean() == pytest.approx((4 / 9) ** 4, rel=1e-12)
    with pytest.raises(ValueError, match="dust"):
        G.cantor_connectivity(9, 1, mode="carpet")


@pytest.mark.parametrize("folds", [0, 1, 2, 5, 10])
def test_dragon_curve_after_n_folds(folds):
    pts = G.dragon_curve_points(folds)
    assert pts.shape == (2 ** folds + 1, 2)
    steps = np.diff(pts, axis=0)
    assert np.array_equal(np.abs(steps).sum(axis=1), np.ones(2 ** folds))  # unit steps
    assert np.hypot(*(pts[-1] - pts[0])) == pytest.approx(2 ** (folds / 2))  # end at sqrt(2)^n
    edges = {tuple(sorted((tuple(a), tuple(b)))) for a, b in zip(pts[:-1], pts[1:])}
    assert len(edges) == 2 ** folds  # never retraces an edge


def test_dragon_curve_by_hand_and_raster():
    assert G.dragon_curve_points(2).tolist() == [[0, 0], [1, 0], [1, 1], [0, 1], [0, 2]]
    raster = G.dragon_curve_connectivity(33, folds=6)
    assert set(np.unique(raster)) == {0.0, 1.0}
    assert raster[0].sum() == raster[-1].sum() == raster[:, 0].sum() == raster[:, -1].sum() == 0  # margin


def test_pattern_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: mandelbrot, sierpinski, julia, cantor, dragon_curve"):
        FractalPatternType.parse("koch")
    assert FractalPatternType.parse("Dragon-Curve") is FractalPatternType.DRAGON_CURVE
    with pytest.raises(ValueError, match="does not take"):
        G.generate("sierpinski", 16, max_iter=3)
    with pytest.raises(ValueError, match="iterations"):
        G.sierpinski_connectivity(16, -1)
    with pytest.raises(ValueError, match="lattice"):
        G.sierpinski_connectivity(4095, 3)


# ----- masks and modules ----------------------------------------------------------------------------

@pytest.mark.parametrize("out_size", [(7, 9), (32, 32), (4, 4), (1, 1), (16, 16)])
def test_numpy_bilinear_resize_matches_interpolate(out_size):
    pattern = np.random.default_rng(0).random((16, 16))
    ref = F.interpolate(torch.from_numpy(pattern)[None, None], size=out_size, mode="bilinear", align_corners=False)
    assert np.allclose(fb.resize_bilinear(pattern, *out_size), ref[0, 0].numpy(), atol=1e-12)


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


def test_cerebral_dynamics_equals_the_description_formula():
    torch.manual_seed(0)
    pattern = G.mandelbrot_connectivity(16, 16)
    cd = CerebralDynamicsModule(12, FractalMaskCache(pattern))
    nn.init.normal_(cd.normalization.weight), nn.init.normal_(cd.normalization.bias)
    x = torch.randn(2, 12, 6, 5)
    m = F.interpolate(torch.from_numpy(pattern).float()[None, None], size=(6, 5), mode="bilinear", align_corners=False)
    bands = []
    for name, factor in zip(("alpha", "beta", "gamma", "theta"), (m, 1 - m, m * 0.5, torch.sin(m * math.pi))):
        weight, bias = cd.band_conv(name)
        assert weight.shape == (3, 12, 1, 1)
        bands.append(F.conv2d(x, weight, bias) * factor)
    integrated = cd.integration(torch.cat(bands, 1))
    expected = cd.normalization(integrated.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x
    assert torch.allclose(cd(x), expected, atol=1e-5)


def test_global_attention_equals_multihead_attention():
    torch.manual_seed(0)
    att = GlobalAttention(24, heads=8).eval()
    assert att.heads == 8 and GlobalAttention(20).heads == 4 and GlobalAttention(9).heads == 1
    x = torch.randn(3, 24, 4, 5)
    tokens = x.flatten(2).transpose(1, 2)
    ref = att.attention(tokens, tokens, tokens, need_weights=False)[0]
    expected = (tokens + ref).transpose(1, 2).reshape(3, 24, 4, 5)
    assert torch.allclose(att(x), expected, atol=1e-5)


def test_adaptive_scale_processor_is_residual_over_three_scales():
    asp = fb.AdaptiveScaleProcessor(6).eval()
    for conv in (asp.local_processor, asp.regional_processor, asp.global_processor, asp.scale_fusion[0]):
        nn.init.zeros_(conv.weight), nn.init.zeros_(conv.bias)
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(asp(x), x + F.gelu(asp.scale_fusion[1](torch.zeros(2, 6, 5, 5))))
    scales = (asp.local_processor, asp.regional_processor, asp.global_processor)
    assert [c.kernel_size for c in scales] == [(1, 1), (3, 3), (5, 5)]


def test_fractal_block_structure():
    masks = FractalMaskCache(G.sierpinski_connectivity(16, 3))
    block = FractalNeuralBlock(3, 4, 8, masks)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 2 ** 3 - 1  # c(L) = 2 c(L-1) + 1
    assert isinstance(block.deep_branch[0].deep_branch[0].cerebral_dynamics, CerebralDynamicsModule)
    with pytest.raises(ValueError, match="level"):
        FractalNeuralBlock(0, 4, 8, masks)


# ----- drop-path ------------------------------------------------------------------------------------

def test_drop_path_never_drops_both_branches():
    torch.manual_seed(0)
    block = FractalNeuralBlock(2, 4, 8, FractalMaskCache(np.full((4, 4), 0.5)), drop_path_prob=0.5).train()
    x = torch.randn(8, 4, 4, 4)
    seen = torch.zeros(2, 2, dtype=torch.long)
    for _ in range(150):
        out = block(x)
        keep = block.last_keep
        assert keep.shape == (8, 2) and keep.any(dim=1).all()
        for row in keep.long():
            seen[row[0], row[1]] += 1
        assert torch.isfinite(out).all()
    assert seen[0, 0] == 0 and seen[1, 0] > 0 and seen[0, 1] > 0 and seen[1, 1] > 0
    keep = fb.sample_branch_keep(40_000, 0.5)
    assert keep.any(dim=1).all()
    both, deep_only = keep.all(dim=1).float().mean(), (keep[:, 0] & ~keep[:, 1]).float().mean()
    assert both == pytest.approx(0.25, abs=0.01) and deep_only == pytest.approx(0.375, abs=0.01)


def test_a_dropped_branch_leaves_the_other_alone(monkeypatch):
    torch.manual_seed(0)
    block = FractalNeuralBlock(2, 4, 8, FractalMaskCache(np.full((4, 4), 0.5)), drop_path_prob=0.3).train()
    forced = torch.tensor([[True, False], [False, True], [True, True]])
    # the blocks live in baselines/_fractal_blocks.py (re-exported by baselines.fractalbrainnet)
    monkeypatch.setattr(_fractal_blocks, "sample_branch_keep", lambda n, p, device: forced)
    x = torch.randn(3, 4, 4, 4)
    out = block(x)
    deep, shallow = block.deep_branch(x), block.shallow_branch(x)  # train-mode BN: same batch, same output
    w = block.fractal_attention(deep, shallow)
    assert torch.allclose(out[0], deep[0], atol=1e-6)
    assert torch.allclose(out[1], shallow[1], atol=1e-6)
    assert torch.allclose(out[2], w[2, 0] * deep[2] + w[2, 1] * shallow[2], atol=1e-6)
    assert torch.allclose(w.sum(dim=1), torch.ones(3, 1, 1))
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(x), block(x))


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
    with pytest.raises(ValueError, match="downsample"):
        tiny(downsample="maxpool")
    with pytest.raises(ValueError, match="branch_attention"):
        tiny(branch_attention="sigmoid")
    with pytest.raises(ValueError, match="allowed"):
        create_model("fractalbrainnet_small", fractal_pattern="koch")
    with pytest.raises(ValueError, match="does not take these options"):
        create_model("fractalbrainnet_small", widen=2)


def test_downsampling_halves_and_never_goes_below_one_pixel():
    model = tiny(fractal_levels=(1, 1, 1, 1, 1), stem_stride=2).eval()
    sizes = []
    hooks = [s.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for s in model.fractal_stages]
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    assert sizes == [4, 2, 1, 1, 1]  # stem 8; the last stage keeps its size
    for h in hooks:
        h.remove()


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
