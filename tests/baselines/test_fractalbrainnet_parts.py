"""FractalBrainNet's parts: the fractal patterns (baselines/_fractal_patterns.py) checked against
their closed forms, the numpy bilinear resize against ``F.interpolate``, and the building blocks
(baselines/_fractal_blocks.py) against the description's formulas, drop-path included. The network
built from them is tested in test_fractalbrainnet.py."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fractalbench.baselines._fractal_blocks as _fractal_blocks
import fractalbench.baselines.fractalbrainnet as fb
from fractalbench.baselines.fractalbrainnet import (
    CerebralDynamicsModule,
    FractalMaskCache,
    FractalNeuralBlock,
    FractalPatternType,
    GlobalAttention,
    resize_bilinear,
)
from fractalbench.baselines.fractalbrainnet import FractalPatternGenerator as G

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


@pytest.mark.parametrize("out_size", [(7, 9), (32, 32), (4, 4), (1, 1), (16, 16)])
def test_numpy_bilinear_resize_matches_interpolate(out_size):
    pattern = np.random.default_rng(0).random((16, 16))
    ref = F.interpolate(torch.from_numpy(pattern)[None, None], size=out_size, mode="bilinear", align_corners=False)
    assert np.allclose(resize_bilinear(pattern, *out_size), ref[0, 0].numpy(), atol=1e-12)


# ----- building blocks ------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma_band", ["constant", "mask"])
def test_cerebral_dynamics_equals_the_description_formula(gamma_band):
    torch.manual_seed(0)
    pattern = G.mandelbrot_connectivity(16, 16)
    cd = CerebralDynamicsModule(12, FractalMaskCache(pattern, gamma_band))
    nn.init.normal_(cd.normalization.weight), nn.init.normal_(cd.normalization.bias)
    x = torch.randn(2, 12, 6, 5)
    m = F.interpolate(torch.from_numpy(pattern).float()[None, None], size=(6, 5), mode="bilinear", align_corners=False)
    gamma = 0.5 if gamma_band == "constant" else m * 0.5  # the description: "* 0.5"; the old build: 0.5 x mask
    bands = []
    for name, factor in zip(("alpha", "beta", "gamma", "theta"), (m, 1 - m, gamma, torch.sin(m * math.pi))):
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
    # the blocks live in baselines/_fractal_blocks.py (re-exported by fractalbench.baselines.fractalbrainnet)
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


def test_uniform_control_pattern_is_constant_and_reaches_every_band_unchanged():
    assert np.array_equal(G.generate("uniform", 8), np.full((8, 8), 0.5))
    assert np.array_equal(G.generate("uniform", 4, value=0.25), np.full((4, 4), 0.25))
    with pytest.raises(ValueError, match=r"uniform pattern value must be in \[0, 1\], got 2"):
        G.generate("uniform", 4, value=2)
    masks = FractalMaskCache(G.generate("uniform", 16))
    bands = masks.modulation(5, 7, "cpu", torch.float32)[0, :, 0]  # [4, h, w]: alpha, beta, gamma, theta
    assert bands.shape == (4, 5, 7)
    for band, factor in zip(bands, (0.5, 0.5, 0.5, 1.0)):  # mask, 1 - mask, 0.5, sin(pi mask) at mask 0.5
        assert torch.allclose(band, torch.full((5, 7), factor))
