"""FractalBrainNet (J. R. F. Junior, 2024): fractal patterns as attention masks, "cerebral" band
processing and FractalNet-style recursive blocks, plus an early-exit variant.

Built from the description and original code in ``shared/reference/fractalbrainnet-description.txt``
(issue #6). The parts, in the order data flows:

- :class:`FractalPatternGenerator` draws one pattern (values in [0, 1], shape [H, W], float64,
  deterministic, vectorised) at construction: Mandelbrot and Julia escape time, Sierpinski
  triangle, Cantor dust and the dragon curve.
- :class:`CerebralDynamicsModule`: the pattern resized (bilinear) to the feature map is ``mask``.
  Four 1x1 "bands" see the input: alpha x mask, beta x (1 - mask), gamma x 0.5 mask,
  theta x sin(pi mask); concatenated, fused by a 1x1 integration conv, LayerNorm over channels,
  plus the input.
- :class:`FractalNeuralBlock` (level L): level 1 is conv3x3-BN-CerebralDynamics-GELU; level L > 1
  joins a deep branch (two level L-1 blocks) and a shallow branch (conv3x3-CerebralDynamics-BN-GELU)
  with learnt weights (alpha, beta) = softmax(MLP(features)).
- :class:`AdaptiveScaleProcessor`: 1x1, 3x3 and 5x5 convs in parallel, 1x1 fusion (BN, GELU),
  plus the input.
- :class:`FractalBrainNet`: stem (7x7 conv, BN, GELU, scale processor), one stage per entry of
  ``fractal_levels`` (block, scale processor, downsampling), global multi-head self-attention over
  the final feature map's pixels, then the head: average pool, optional meta-learner, MLP classifier.
- :class:`FractalBrainNetEE`: the same network as a cascade with a classifier after every stage
  (:class:`harness.early_exit.EarlyExitNetwork`: real early exit, compaction, masking, cost units).

Choices where the description is vague or the original code disagrees with the issue (each is a
constructor option unless said otherwise):

- Pattern rasters put row = y (imaginary part), column = x; the original's ``meshgrid('ij')`` gave
  the transpose. Escape time value = (iterations with |z| <= 2) / max_iter, so points that stay
  bounded get exactly 1. Sierpinski is the right-angled triangle (the affine image of the
  equilateral one; area fractions are affine-invariant) drawn as exact pixel coverage (0, 1/2 or 1)
  on a lattice of side lcm(size, 2^n), then box-averaged to ``size``: the mean is exactly
  (3/4)^n / 2 (the triangle is half the square). Cantor keeps the pixels whose first n ternary
  digits avoid 1 on a lattice of lcm(size, 3^n) cells, box-averaged: each axis keeps (2/3)^n; the
  2-D dust is the outer product (``mode="dust"``, default) or the 1-D set repeated down the rows
  (``mode="line"``). The dragon curve after n folds is its 2^n unit steps, scaled into the square
  with a 1-pixel margin and drawn as 0/1 pixels. ``pattern_options`` passes the generator's
  keyword options (``max_iter``, ``c_real``, ``c_imag``, ``iterations``, ``folds``, ``mode``).
- Resized masks are computed once per (height, width, device, dtype) in numpy (bilinear,
  align_corners=False, the same numbers as ``F.interpolate``) and kept in a cache shared by every
  module of a model. They are not in the state dict (they follow from the configuration) and no
  resampling op runs inside a forward, so MAC counters see only the network.
- The four band convs are one conv with 4 x (C // 4) outputs whose chunks are modulated (the
  original's four C -> C // 4 convs, mathematically identical; with the cached masks this cut
  fractalbrainnet_small's CPU time at 32x32 by ~25% at batch 1 and ~15% for a batch-64 training
  step). The original's gamma band is ``gamma(x) * mask * 0.5``, kept as is.
- Branch weights: the original uses a per-pixel sigmoid; here ``branch_attention="global"``
  (default: global average pool of both branches -> Linear(2C, C/4) -> GELU -> Linear(C/4, 2) ->
  softmax) or ``"pixel"`` (the same MLP as 1x1 convs, softmax per pixel), so alpha + beta = 1.
- Drop-path (training only, per sample): each branch of a join is dropped with probability
  ``drop_path_prob``; when both would go, one of them (chosen at random) is kept. A lone branch
  passes with weight 1 (FractalNet's join of one input). The original's Dropout2d on every block
  output is not used.
- Downsampling after every stage but the last: ``downsample="conv"`` (default, the original:
  3x3 stride-2 conv, BN, GELU) or ``"avgpool"`` (2x2 average pooling, ceil mode). Either halves
  the size (rounding up) and never goes below 1 pixel.
- Global attention: the original attends over the pooled vector (a single token). Here the tokens
  are the pixels of the final feature map, with a residual connection; heads = the largest of
  ``attention_heads`` (8), 4, 2, 1 that divides the channels. The projections are those of an
  ``nn.MultiheadAttention`` but the product is written out (matmul, softmax, matmul), identical to
  its forward, so that MAC counters see every multiply (its fused fast path is one opaque op).
- Head: AdaptiveAvgPool2d -> meta-learner ``f + 0.1 * MLP(f)`` when
  ``enable_continuous_learning`` -> Dropout(0.2), Linear(C, C/2), GELU, Dropout(0.1), Linear.
- Presets: medium, large and xlarge are the original's; ``small`` is levels (2, 2, 3) with 16 base
  channels, 0.55 M parameters and 19 M MACs at 32x32 (the original's (2, 3) x 32 has as many
  parameters but 59 M MACs), cheap enough to train on 2 CPU cores. large and xlarge are very large
  (0.25 and 0.87 billion parameters; xlarge takes ~15 s and 4 GB just to build on a CPU).
- Early exit: exit k reads the output of stage k through AdaptiveAvgPool2d + Linear; the last
  exit is the main head. Stage 0 includes the stem and the last stage the global attention.
- Init as in the original: ``trunc_normal_(std=0.02)`` keeps torch's absolute cut at +-2, so it
  is in effect a plain normal. With such small classifier weights plain SGD (lr 0.05) barely moves
  the network in a few epochs; Adam (lr ~3e-3, the original example used Adam) trains it.
- ``analyze_fractal_patterns``: stage maps are channel means of each stage's output, min-max
  normalised per sample; complexity is the entropy of map / sum(map) (per sample, then averaged;
  the original took a softmax over the whole batch); correlations are per-sample Pearson, averaged.

Units: MACs as counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) at batch 1,
in eval mode; the reference numbers in the model cards were measured that way on this code.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.early_exit import EarlyExitNetwork
from harness.registry import ModelCard, register_model

PAPER = ("J. R. F. Junior, FractalBrainNet (LinkedIn Pulse, 2024-08-19), on FractalNet "
         "(Larsson, Maire, Shakhnarovich, ICLR 2017)")

MAX_LATTICE = 4096  # largest lattice side the exact Sierpinski raster may use


# ----- fractal patterns ---------------------------------------------------------------------------

class FractalPatternType(Enum):
    """Pattern families of the generator."""

    MANDELBROT = "mandelbrot"
    SIERPINSKI = "sierpinski"
    JULIA = "julia"
    CANTOR = "cantor"
    DRAGON_CURVE = "dragon_curve"

    @classmethod
    def parse(cls, value: "FractalPatternType | str") -> "FractalPatternType":
        """The member for an enum or a name such as ``"julia"``, ``"JULIA"`` or ``"dragon-curve"``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_").replace(" ", "_")
            for member in cls:
                if key in (member.value, member.name.lower()):
                    return member
        allowed = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown fractal pattern {value!r}; allowed: {allowed}")


def _escape_time(z: np.ndarray, c: np.ndarray | complex, max_iter: int) -> np.ndarray:
    """Fraction of ``max_iter`` iterations of z <- z^2 + c during which |z| <= 2 held (1 = bounded)."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    z = np.array(z, dtype=np.complex128)
    count = np.zeros(z.shape, dtype=np.int64)
    for _ in range(max_iter):
        alive = z.real * z.real + z.imag * z.imag <= 4.0
        if not alive.any():
            break
        count += alive
        z = np.where(alive, z * z + c, z)  # escaped points stay frozen (no overflow)
    return count / max_iter


def _grid(width: int, height: int, x_range: Sequence[float], y_range: Sequence[float]) -> np.ndarray:
    """Complex grid [height, width]: row = imaginary part, column = real part, ends included."""
    x = np.linspace(x_range[0], x_range[1], width)
    y = np.linspace(y_range[0], y_range[1], height)
    return x[None, :] + 1j * y[:, None]


def _block_mean(values: np.ndarray, factor: int, axes: int) -> np.ndarray:
    """Average non-overlapping blocks of ``factor`` cells along the first ``axes`` axes."""
    if factor == 1:
        return values
    if axes == 1:
        return values.reshape(-1, factor).mean(axis=1)
    n = values.shape[0] // factor
    return values.reshape(n, factor, n, factor).mean(axis=(1, 3))


def _check_size(size: int, what: str) -> None:
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{what} must be a whole number >= 1, got {size!r}")


def _check_iterations(n: int, what: str = "iterations") -> None:
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{what} must be a whole number >= 0, got {n!r}")


class FractalPatternGenerator:
    """Fractal rasters in [0, 1] (numpy float64, [height, width]); every method is vectorised over
    pixels (loops run over iterations only) and deterministic."""

    @staticmethod
    def escape_time(z0: np.ndarray | complex, c: np.ndarray | complex, max_iter: int = 100) -> np.ndarray:
        """Normalised escape time of z <- z^2 + c from z0 (Mandelbrot: z0 = 0; Julia: c fixed)."""
        return _escape_time(np.asarray(z0), c, max_iter)

    @staticmethod
    def mandelbrot_connectivity(width: int, height: int, max_iter: int = 100,
                                x_range: Sequence[float] = (-2.5, 1.5),
                                y_range: Sequence[float] = (-1.5, 1.5)) -> np.ndarray:
        """Mandelbrot set: c on the grid, z0 = 0; bounded points (the set) get 1."""
        _check_size(width, "width")
        _check_size(height, "height")
        c = _grid(width, height, x_range, y_range)
        return _escape_time(np.zeros_like(c), c, max_iter)

    @staticmethod
    def julia_connectivity(width: int, height: int, c_real: float = -0.7, c_imag: float = 0.27015,
                           max_iter: int = 100, x_range: Sequence[float] = (-2.0, 2.0),
                           y_range: Sequence[float] = (-2.0, 2.0)) -> np.ndarray:
        """Julia set of c = c_real + i c_imag: z0 on the grid; bounded points get 1."""
        _check_size(width, "width")
        _check_size(height, "height")
        return _escape_time(_grid(width, height, x_range, y_range), complex(c_real, c_imag), max_iter)

    @staticmethod
    def sierpinski_connectivity(size: int, iterations: int = 5) -> np.ndarray:
        """Sierpinski triangle after ``iterations`` subdivisions, as pixel coverage.

        The level-0 shape is the lower-left right triangle of the square (half its area); each
        iteration keeps 3 of its 4 half-size copies, so the covered area is (3/4)^n of the
        triangle. Coverage is exact on a lattice of side lcm(size, 2^n) (every edge is a lattice
        line or a lattice diagonal, so each cell is covered 0, 1/2 or 1), averaged down to ``size``.
        """
        _check_size(size, "size")
        _check_iterations(iterations)
        side = math.lcm(size, 2 ** iterations)
        if side > MAX_LATTICE:
            raise ValueError(f"sierpinski: {iterations} iterations need a {side}-pixel lattice at size {size}, "
                             f"more than {MAX_LATTICE}; use fewer iterations or a power-of-2 size")
        row, col = np.indices((side, side))
        value = np.where(col < row, 1.0, np.where(col == row, 0.5, 0.0))
        half = side
        for _ in range(iterations):
            half //= 2
            bottom, right = row >= half, col >= half
            row = np.where(bottom, row - half, row)
            col = np.where(bottom & right, col - half, col)
            # in the copy it now lies in: strictly inside stays 1, its hypotenuse 1/2, above it 0
            # (that is the removed middle triangle); pixels already at 1/2 or 0 keep their value
            value = np.where(value == 1.0, np.where(col < row, 1.0, np.where(col == row, 0.5, 0.0)), value)
        return _block_mean(value, side // size, axes=2)

    @staticmethod
    def cantor_line(size: int, iterations: int = 4) -> np.ndarray:
        """Middle-thirds Cantor set after ``iterations`` steps as coverage of ``size`` cells
        (mean exactly (2/3)^n when 3^n divides the size, else up to float rounding)."""
        _check_size(size, "size")
        _check_iterations(iterations)
        scale = 3 ** iterations
        cells = math.lcm(size, scale)
        digits = np.arange(cells) // (cells // scale)  # index in [0, 3^n) at the n-th iteration
        keep = np.ones(cells, dtype=bool)
        for _ in range(iterations):
            keep &= digits % 3 != 1
            digits //= 3
        return _block_mean(keep.astype(np.float64), cells // size, axes=1)

    @staticmethod
    def cantor_connectivity(size: int, iterations: int = 4, mode: str = "dust") -> np.ndarray:
        """2-D Cantor pattern: ``"dust"`` (product set; every row and column keeps (2/3)^n) or
        ``"line"`` (the 1-D set repeated down the rows)."""
        line = FractalPatternGenerator.cantor_line(size, iterations)
        if mode == "dust":
            return np.outer(line, line)
        if mode == "line":
            return np.tile(line, (size, 1))
        raise ValueError(f"cantor mode must be 'dust' or 'line', got {mode!r}")

    @staticmethod
    def dragon_curve_points(folds: int) -> np.ndarray:
        """Vertices [2^folds + 1, 2] (integers) of the Heighway dragon after ``folds`` folds: unit
        steps starting east; the turn after step i is left when the bit above the lowest set bit of
        i is 0, else right."""
        _check_iterations(folds, "folds")
        steps = 2 ** folds
        i = np.arange(1, steps, dtype=np.int64)
        right = ((i & -i) << 1) & i
        turns = np.where(right != 0, -1, 1)
        heading = np.concatenate([[0], np.cumsum(turns)]) % 4
        moves = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.int64)[heading]
        return np.concatenate([np.zeros((1, 2), dtype=np.int64), np.cumsum(moves, axis=0)])

    @staticmethod
    def dragon_curve_connectivity(size: int, folds: int = 10) -> np.ndarray:
        """Dragon curve after ``folds`` folds, scaled into the square (1-pixel margin, aspect kept,
        centred) and rasterised: pixels the curve passes through are 1, others 0."""
        _check_size(size, "size")
        pts = FractalPatternGenerator.dragon_curve_points(folds).astype(np.float64)
        lo, extent = pts.min(axis=0), np.ptp(pts, axis=0)
        span = max(size - 3, 0)  # pixel centres 1 .. size-2
        scale = span / max(extent.max(), 1.0)
        offset = 1.0 + (span - extent * scale) / 2 if size > 2 else np.zeros(2)
        xy = (pts - lo) * scale + offset
        samples = int(math.ceil(scale)) * 2 + 2
        t = np.linspace(0.0, 1.0, samples)
        along = xy[:-1, None, :] + t[None, :, None] * (xy[1:] - xy[:-1])[:, None, :]
        cols = np.clip(np.rint(along[..., 0]), 0, size - 1).astype(np.int64).ravel()
        rows = np.clip(np.rint(size - 1 - along[..., 1]), 0, size - 1).astype(np.int64).ravel()
        raster = np.zeros((size, size))
        raster[rows, cols] = 1.0
        return raster

    @staticmethod
    def generate(pattern: FractalPatternType | str, resolution: int, **options: Any) -> np.ndarray:
        """A square pattern [resolution, resolution] of the given type; ``options`` go to its method."""
        kind = FractalPatternType.parse(pattern)
        gen = FractalPatternGenerator
        try:
            if kind is FractalPatternType.MANDELBROT:
                return gen.mandelbrot_connectivity(resolution, resolution, **options)
            if kind is FractalPatternType.JULIA:
                return gen.julia_connectivity(resolution, resolution, **options)
            if kind is FractalPatternType.SIERPINSKI:
                return gen.sierpinski_connectivity(resolution, **options)
            if kind is FractalPatternType.CANTOR:
                return gen.cantor_connectivity(resolution, **options)
            return gen.dragon_curve_connectivity(resolution, **options)
        except TypeError as exc:
            raise ValueError(f"pattern {kind.value!r} does not take the options {sorted(options)}: {exc}") from None


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D bilinear resampling with align_corners=False (``F.interpolate``'s
    source index: max(0, (i + 0.5) * n_in / n_out - 0.5))."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def resize_bilinear(pattern: np.ndarray, height: int, width: int) -> np.ndarray:
    """``pattern`` [H, W] resized to [height, width] (bilinear, align_corners=False)."""
    return bilinear_matrix(pattern.shape[0], height) @ pattern @ bilinear_matrix(pattern.shape[1], width).T


class FractalMaskCache:
    """The model's pattern and its resized masks, computed once per (height, width, device, dtype).

    ``modulation`` is [1, 4, 1, h, w]: the factors of the alpha, beta, gamma and theta bands
    (mask, 1 - mask, 0.5 mask, sin(pi mask)). Entries are normal tensors (never inference tensors)
    that do not require grad; they are not part of any state dict.
    """

    def __init__(self, pattern: np.ndarray) -> None:
        pattern = np.asarray(pattern, dtype=np.float64)
        if pattern.ndim != 2 or pattern.min() < 0 or pattern.max() > 1:
            raise ValueError("a fractal pattern must be a 2-D array with values in [0, 1]")
        self.pattern = pattern
        self._masks: dict[tuple, Tensor] = {}
        self._modulations: dict[tuple, Tensor] = {}

    @staticmethod
    def _key(h: int, w: int, device: torch.device | str, dtype: torch.dtype) -> tuple:
        return int(h), int(w), torch.device(device), dtype

    def _tensor(self, array: np.ndarray, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    def mask(self, h: int, w: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """The pattern resized to [h, w]."""
        key = self._key(h, w, device, dtype)
        if key not in self._masks:
            self._masks[key] = self._tensor(resize_bilinear(self.pattern, h, w), device, dtype)
        return self._masks[key]

    def modulation(self, h: int, w: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Band factors [1, 4, 1, h, w] (alpha, beta, gamma, theta) for an [h, w] feature map."""
        key = self._key(h, w, device, dtype)
        if key not in self._modulations:
            m = resize_bilinear(self.pattern, h, w)
            bands = np.stack([m, 1.0 - m, 0.5 * m, np.sin(np.pi * m)])[None, :, None]
            self._modulations[key] = self._tensor(bands, device, dtype)
        return self._modulations[key]

    def __len__(self) -> int:
        return len(self._masks) + len(self._modulations)


# ----- building blocks ----------------------------------------------------------------------------

BAND_NAMES = ("alpha", "beta", "gamma", "theta")


class CerebralDynamicsModule(nn.Module):
    """Band processing modulated by the fractal mask, integration, channel LayerNorm, residual.

    ``bands`` is the four band convs (C -> C // 4 each) stacked into one conv: output chunk b is
    band ``BAND_NAMES[b]``.
    """

    def __init__(self, channels: int, masks: FractalMaskCache) -> None:
        super().__init__()
        self.channels = channels
        self.band_channels = max(1, channels // 4)
        self.masks = masks  # shared, not a submodule and not in the state dict
        self.bands = nn.Conv2d(channels, 4 * self.band_channels, 1)
        self.integration = nn.Conv2d(4 * self.band_channels, channels, 1)
        self.normalization = nn.LayerNorm(channels)

    def fractal_mask(self, h: int, w: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """The cached mask [h, w] (the same tensor object on every call with the same key)."""
        return self.masks.mask(h, w, device, dtype)

    def band_conv(self, name: str) -> tuple[Tensor, Tensor]:
        """(weight, bias) of one band's 1x1 conv, as views into the stacked conv."""
        b = BAND_NAMES.index(name) * self.band_channels
        return self.bands.weight[b:b + self.band_channels], self.bands.bias[b:b + self.band_channels]

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        mod = self.masks.modulation(h, w, x.device, x.dtype)
        bands = self.bands(x).view(n, 4, self.band_channels, h, w) * mod
        y = self.integration(bands.view(n, 4 * self.band_channels, h, w))
        y = self.normalization(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels
        return y + x


class BranchAttention(nn.Module):
    """Weights (alpha, beta) of the deep and shallow branch, from both branches' features.

    ``mode="global"``: softmax(Linear-GELU-Linear(global average pool of [deep, shallow])), [N, 2, 1, 1].
    ``mode="pixel"``: the same MLP as 1x1 convs at every pixel, [N, 2, H, W].
    """

    def __init__(self, channels: int, mode: str = "global") -> None:
        super().__init__()
        if mode not in ("global", "pixel"):
            raise ValueError(f"branch_attention must be 'global' or 'pixel', got {mode!r}")
        self.mode = mode
        hidden = max(1, channels // 4)
        if mode == "global":
            self.mlp = nn.Sequential(nn.Linear(2 * channels, hidden), nn.GELU(), nn.Linear(hidden, 2))
        else:
            self.mlp = nn.Sequential(nn.Conv2d(2 * channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, 2, 1))

    def forward(self, deep: Tensor, shallow: Tensor) -> Tensor:
        if self.mode == "global":
            pooled = torch.cat([deep.mean(dim=(2, 3)), shallow.mean(dim=(2, 3))], dim=1)
            return torch.softmax(self.mlp(pooled), dim=1)[:, :, None, None]
        return torch.softmax(self.mlp(torch.cat([deep, shallow], dim=1)), dim=1)


def sample_branch_keep(n: int, drop_prob: float, device: torch.device | str = "cpu") -> Tensor:
    """[n, 2] bool: which of the two branches each sample keeps. Each is dropped with probability
    ``drop_prob``; where both would be dropped, one chosen at random is kept instead."""
    keep = torch.rand(n, 2, device=device) >= drop_prob
    none = ~keep.any(dim=1)
    revive = F.one_hot(torch.randint(0, 2, (n,), device=device), 2).bool()
    return keep | (none[:, None] & revive)


class FractalNeuralBlock(nn.Module):
    """Recursive fractal block. ``last_keep`` holds the branch mask [N, 2] of the latest training
    forward of a level > 1 block (None before one, or when drop-path is off)."""

    def __init__(self, level: int, in_channels: int, out_channels: int, masks: FractalMaskCache,
                 drop_path_prob: float = 0.15, branch_attention: str = "global") -> None:
        super().__init__()
        if not isinstance(level, (int, np.integer)) or level < 1:
            raise ValueError(f"a fractal level must be a whole number >= 1, got {level!r}")
        if not 0.0 <= drop_path_prob < 1.0:
            raise ValueError(f"drop_path_prob must be in [0, 1), got {drop_path_prob!r}")
        self.level = int(level)
        self.drop_path_prob = float(drop_path_prob)
        self.last_keep: Tensor | None = None
        if level == 1:
            self.base_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            self.norm = nn.BatchNorm2d(out_channels)
            self.cerebral_dynamics = CerebralDynamicsModule(out_channels, masks)
            self.activation = nn.GELU()
            return
        self.deep_branch = nn.Sequential(
            FractalNeuralBlock(level - 1, in_channels, out_channels, masks, drop_path_prob, branch_attention),
            FractalNeuralBlock(level - 1, out_channels, out_channels, masks, drop_path_prob, branch_attention))
        self.shallow_branch = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), CerebralDynamicsModule(out_channels, masks),
            nn.BatchNorm2d(out_channels), nn.GELU())
        self.fractal_attention = BranchAttention(out_channels, branch_attention)

    def forward(self, x: Tensor) -> Tensor:
        if self.level == 1:
            return self.activation(self.cerebral_dynamics(self.norm(self.base_conv(x))))
        deep, shallow = self.deep_branch(x), self.shallow_branch(x)
        weights = self.fractal_attention(deep, shallow)
        if self.training and self.drop_path_prob > 0:
            keep = sample_branch_keep(x.shape[0], self.drop_path_prob, x.device)
            self.last_keep = keep
            both = keep.all(dim=1)[:, None, None, None]
            weights = torch.where(both, weights, keep[:, :, None, None].to(weights.dtype))
        return weights[:, 0:1] * deep + weights[:, 1:2] * shallow


class AdaptiveScaleProcessor(nn.Module):
    """1x1 (local), 3x3 (regional) and 5x5 (global) convs, concatenated, fused (1x1, BN, GELU), plus input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.local_processor = nn.Conv2d(channels, channels, 1)
        self.regional_processor = nn.Conv2d(channels, channels, 3, padding=1)
        self.global_processor = nn.Conv2d(channels, channels, 5, padding=2)
        self.scale_fusion = nn.Sequential(nn.Conv2d(3 * channels, channels, 1), nn.BatchNorm2d(channels), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        multi = torch.cat([self.local_processor(x), self.regional_processor(x), self.global_processor(x)], dim=1)
        return self.scale_fusion(multi) + x


class FractalStage(nn.Module):
    """One stage: fractal block, scale processor, then downsampling (Identity on the last stage)."""

    def __init__(self, block: nn.Module, scale: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.block, self.scale, self.pool = block, scale, pool

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.scale(self.block(x)))


def _downsample(kind: str, channels: int) -> nn.Module:
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.GELU())
    if kind == "avgpool":
        return nn.AvgPool2d(2, ceil_mode=True)
    raise ValueError(f"downsample must be 'conv' or 'avgpool', got {kind!r}")


def attention_heads_for(channels: int, requested: int = 8) -> int:
    """The largest head count <= ``requested`` among requested, 8, 4, 2, 1 that divides ``channels``."""
    for h in [requested] + [h for h in (8, 4, 2, 1) if h < requested]:
        if h >= 1 and channels % h == 0:
            return h
    return 1


class GlobalAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (tokens [N, HW, C]), plus the input.

    Parameters live in ``attention`` (an ``nn.MultiheadAttention``, batch first, no dropout); the
    forward writes its math out so that every multiply is a visible matmul.
    """

    def __init__(self, channels: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = attention_heads_for(channels, heads)
        self.attention = nn.MultiheadAttention(channels, self.heads, batch_first=True)

    def attend(self, tokens: Tensor) -> Tensor:
        """``nn.MultiheadAttention(tokens, tokens, tokens)[0]``, written out."""
        n, length, c = tokens.shape
        h, d = self.heads, c // self.heads
        mha = self.attention
        qkv = F.linear(tokens, mha.in_proj_weight, mha.in_proj_bias).view(n, length, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(torch.matmul(q * (d ** -0.5), k.transpose(-2, -1)), dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(n, length, c)
        return mha.out_proj(out)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        return (tokens + self.attend(tokens)).transpose(1, 2).reshape(n, c, h, w)


class MetaLearner(nn.Module):
    """Residual modulation of pooled features: f + scale * MLP(f)."""

    def __init__(self, channels: int, scale: float = 0.1) -> None:
        super().__init__()
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(channels, max(1, channels // 4)), nn.GELU(),
                                 nn.Linear(max(1, channels // 4), channels))

    def forward(self, features: Tensor) -> Tensor:
        return features + self.scale * self.mlp(features)


class ClassifierHead(nn.Module):
    """AdaptiveAvgPool2d, optional meta-learner, then Dropout, Linear(C, C/2), GELU, Dropout, Linear."""

    def __init__(self, channels: int, num_classes: int, meta_learning: bool = True,
                 dropout: Sequence[float] = (0.2, 0.1)) -> None:
        super().__init__()
        p1, p2 = (float(p) for p in dropout)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.meta_learner = MetaLearner(channels) if meta_learning else None
        hidden = max(1, channels // 2)
        self.classifier = nn.Sequential(nn.Dropout(p1), nn.Linear(channels, hidden), nn.GELU(), nn.Dropout(p2),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        features = self.pool(x).flatten(1)
        if self.meta_learner is not None:
            features = self.meta_learner(features)
        return self.classifier(features)


def initialize_weights(module: nn.Module) -> None:
    """'Neuroplasticity' init: convs kaiming_normal_(fan_out, relu), linears trunc_normal_(std
    0.02), norms weight 1 bias 0, biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ----- the network --------------------------------------------------------------------------------

class FractalBrainNet(nn.Module):
    """Stem, fractal stages, global attention, head. ``forward(x)`` returns logits [N, num_classes].

    Stage i has ``base_channels * 2**min(i, 4)`` channels and a block of level ``fractal_levels[i]``.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, fractal_levels: Sequence[int] = (2, 3, 4, 5),
                 base_channels: int = 64, fractal_pattern: FractalPatternType | str = FractalPatternType.MANDELBROT,
                 pattern_resolution: int = 32, pattern_options: Mapping[str, Any] | None = None,
                 drop_path_prob: float = 0.15, enable_continuous_learning: bool = True, stem_stride: int = 2,
                 downsample: str = "conv", attention_heads: int = 8, branch_attention: str = "global",
                 dropout: Sequence[float] = (0.2, 0.1)) -> None:
        super().__init__()
        levels = [int(level) for level in fractal_levels]
        if not levels or any(level < 1 for level in levels):
            raise ValueError(f"fractal_levels must be a non-empty list of whole numbers >= 1, got {fractal_levels!r}")
        if base_channels < 4:
            raise ValueError(f"base_channels must be >= 4 (four bands of C // 4 channels), got {base_channels}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        self.pattern_type = FractalPatternType.parse(fractal_pattern)
        self.config = dict(num_classes=num_classes, in_chans=in_chans, fractal_levels=tuple(levels),
                           base_channels=base_channels, fractal_pattern=self.pattern_type.value,
                           pattern_resolution=pattern_resolution, pattern_options=dict(pattern_options or {}),
                           drop_path_prob=drop_path_prob, enable_continuous_learning=enable_continuous_learning,
                           stem_stride=stem_stride, downsample=downsample, attention_heads=attention_heads,
                           branch_attention=branch_attention, dropout=tuple(dropout))
        self.num_classes = num_classes
        self.fractal_levels = levels
        self.enable_continuous_learning = enable_continuous_learning
        pattern = FractalPatternGenerator.generate(self.pattern_type, pattern_resolution, **dict(pattern_options or {}))
        self.mask_cache = FractalMaskCache(pattern)
        self.register_buffer("fractal_pattern", torch.from_numpy(pattern).float(), persistent=False)

        self.stem = nn.Sequential(nn.Conv2d(in_chans, base_channels, 7, stride=stem_stride, padding=3),
                                  nn.BatchNorm2d(base_channels), nn.GELU(), AdaptiveScaleProcessor(base_channels))
        self.stage_channels = [base_channels * 2 ** min(i, 4) for i in range(len(levels))]
        stages, current = [], base_channels
        for i, (level, channels) in enumerate(zip(levels, self.stage_channels)):
            block = FractalNeuralBlock(level, current, channels, self.mask_cache, drop_path_prob, branch_attention)
            pool = _downsample(downsample, channels) if i < len(levels) - 1 else nn.Identity()
            stages.append(FractalStage(block, AdaptiveScaleProcessor(channels), pool))
            current = channels
        self.fractal_stages = nn.ModuleList(stages)
        self.global_attention = GlobalAttention(current, attention_heads)
        self.head = ClassifierHead(current, num_classes, enable_continuous_learning, dropout)
        initialize_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map after global attention, [N, C, h, w]."""
        x = self.stem(x)
        for stage in self.fractal_stages:
            x = stage(x)
        return self.global_attention(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

    def analyze_fractal_patterns(self, x: Tensor) -> dict[str, Any]:
        """See :func:`analyze_fractal_patterns`."""
        return analyze_fractal_patterns(self, x)


class ExitHead(nn.Sequential):
    """Side exit: AdaptiveAvgPool2d(1), Flatten, Linear(C, num_classes)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class FractalBrainNetEE(EarlyExitNetwork):
    """FractalBrainNet with a classifier after every fractal stage, trained jointly.

    stages = [stem + stage 0, stage 1, ..., last stage + global attention]; heads = [ExitHead, ...,
    the main ClassifierHead]. Takes :class:`FractalBrainNet`'s options plus ``exit_weights``
    (loss weight per exit, default 1 each).
    """

    def __init__(self, *, exit_weights: Sequence[float] | None = None, **options: Any) -> None:
        net = FractalBrainNet(**options)
        last = len(net.fractal_stages) - 1
        stages: list[nn.Module] = []
        for i, stage in enumerate(net.fractal_stages):
            parts = ([net.stem] if i == 0 else []) + [stage] + ([net.global_attention] if i == last else [])
            stages.append(nn.Sequential(*parts) if len(parts) > 1 else stage)
        side = [ExitHead(c, net.num_classes) for c in net.stage_channels[:-1]]
        for head in side:
            initialize_weights(head)
        super().__init__(stages, side + [net.head], exit_weights)
        self.config = dict(net.config, exit_weights=tuple(self.exit_weights))
        self.pattern_type = net.pattern_type
        self.stage_channels = net.stage_channels
        self.mask_cache = net.mask_cache
        self.register_buffer("fractal_pattern", net.fractal_pattern, persistent=False)

    def analyze_fractal_patterns(self, x: Tensor) -> dict[str, Any]:
        """See :func:`analyze_fractal_patterns` (on the full path, i.e. the last exit)."""
        return analyze_fractal_patterns(self, x)


# ----- analysis -----------------------------------------------------------------------------------

def _normalise_maps(maps: Tensor) -> Tensor:
    """Min-max per sample to [0, 1]; a constant map becomes all ones."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.ones_like(flat))
    return out.view_as(maps)


def _entropy(maps: Tensor) -> Tensor:
    """Shannon entropy (nats) per sample of p = map / sum(map), maps [N, 1, h, w] in [0, 1]."""
    flat = maps.flatten(1)
    p = flat / flat.sum(dim=1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per sample of a, b [N, ...]; 0 where either is constant."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(dim=1) / den.clamp_min(1e-300), torch.zeros_like(den))


def fractal_stages_of(model: nn.Module) -> list[FractalStage]:
    """The fractal stages of a FractalBrainNet or FractalBrainNetEE, in order."""
    stages = [m for m in model.modules() if isinstance(m, FractalStage)]
    if not stages:
        raise ValueError(f"{type(model).__name__} has no fractal stages (not a FractalBrainNet)")
    return stages


@torch.no_grad()
def analyze_fractal_patterns(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """Emergent-pattern analysis on input ``x`` (eval mode; the model's own flags are restored).

    - ``attention_maps``: per stage, the channel mean of the stage output, min-max normalised per
      sample to [0, 1], [N, 1, h, w].
    - ``pattern_complexity``: per stage, the mean over samples of the entropy (nats) of
      p = map / sum(map); ``pattern_complexity_normalized`` divides by its maximum ln(h w) (0 for 1 pixel).
    - ``hierarchical_organization``: ``correlations`` (Pearson, per consecutive pair of stages, the
      deeper map resized bilinearly to the shallower one's size, averaged over samples; 0 where a
      map is constant), ``correlation`` (their mean; 0 with one stage) and
      ``hierarchy_score`` = 1 - correlation.
    - ``fractal_pattern``: the generated pattern (tensor).
    Numbers are python floats.
    """
    stages = fractal_stages_of(model)
    captured: list[Tensor] = []
    hooks = [s.register_forward_hook(lambda _m, _i, out: captured.append(out.mean(dim=1, keepdim=True)))
             for s in stages]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for m, flag in flags:
            m.training = flag
    maps = [_normalise_maps(m.float()) for m in captured]
    complexity = [float(_entropy(m).mean()) for m in maps]
    normalized = [c / math.log(m.shape[-2] * m.shape[-1]) if m.shape[-2] * m.shape[-1] > 1 else 0.0
                  for c, m in zip(complexity, maps)]
    correlations = []
    for shallow, deep in zip(maps[:-1], maps[1:]):
        deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
        correlations.append(float(_pearson(shallow, deep).mean()))
    correlation = float(np.mean(correlations)) if correlations else 0.0
    return {
        "fractal_pattern": model.fractal_pattern.detach().cpu(),
        "attention_maps": [m.cpu() for m in maps],
        "pattern_complexity": complexity,
        "pattern_complexity_normalized": normalized,
        "hierarchical_organization": {"correlations": correlations, "correlation": correlation,
                                      "hierarchy_score": 1.0 - correlation},
    }


def pattern_images(model: nn.Module) -> dict[str, np.ndarray]:
    """The generated pattern of a FractalBrainNet(EE), keyed by pattern name: {name: [H, W] float64 in [0, 1]}."""
    cache = getattr(model, "mask_cache", None)
    kind = getattr(model, "pattern_type", None)
    if not isinstance(cache, FractalMaskCache) or kind is None:
        raise ValueError(f"{type(model).__name__} has no fractal pattern (not a FractalBrainNet)")
    return {kind.value: cache.pattern.copy()}


# ----- presets and registration -------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "small": {"fractal_levels": (2, 2, 3), "base_channels": 16, "pattern_resolution": 16},
    "medium": {"fractal_levels": (2, 3, 4), "base_channels": 64, "pattern_resolution": 32},
    "large": {"fractal_levels": (2, 3, 4, 5), "base_channels": 96, "pattern_resolution": 64},
    "xlarge": {"fractal_levels": (3, 4, 5, 6), "base_channels": 128, "pattern_resolution": 128},
}


def _preset(model_size: str) -> dict[str, Any]:
    if model_size not in PRESETS:
        raise ValueError(f"unknown FractalBrainNet size {model_size!r}; allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[model_size])


def create_fractal_brain_net(model_size: str = "medium", num_classes: int = 10,
                             fractal_pattern: FractalPatternType | str = FractalPatternType.MANDELBROT,
                             early_exit: bool = False, **kwargs: Any) -> FractalBrainNet | FractalBrainNetEE:
    """A preset (small, medium, large, xlarge) of FractalBrainNet; ``kwargs`` override the preset's
    levels, base channels and pattern resolution and set any other constructor option.
    ``early_exit=True`` builds :class:`FractalBrainNetEE`."""
    options = dict(_preset(model_size), num_classes=num_classes, fractal_pattern=fractal_pattern, **kwargs)
    return FractalBrainNetEE(**options) if early_exit else FractalBrainNet(**options)


# Measured on this code (tests/baselines/test_fractalbrainnet.py re-measures them): parameters with
# num_classes=10, in_chans=3; MACs at batch 1, eval, 32x32 and 64x64 input (FlopCounterMode / 2).
# Early-exit variants: macs_* is the full path (last exit); macs_32_exit_k the forced path to exit k.
MEASURED: dict[str, dict[str, float]] = {
    "small": {"params": 554_264, "macs_32": 19_061_816, "macs_64": 76_606_520},
    "medium": {"params": 15_053_808, "macs_32": 426_488_160, "macs_64": 1_706_553_696},
    "large": {"params": 252_251_990, "macs_32": 1_808_791_056, "macs_64": 7_218_656_784},
    "xlarge": {"params": 873_767_514, "macs_32": 5_935_220_032, "macs_64": 23_682_630_976},
    "small_ee": {"params": 554_764, "macs_32": 19_061_816, "macs_64": 76_606_520,
                 "macs_32_exit_0": 7_893_288, "macs_32_exit_1": 12_104_824, "macs_32_exit_2": 19_062_296},
    "medium_ee": {"params": 15_055_748, "macs_32": 426_488_160, "macs_64": 1_706_553_696,
                  "macs_32_exit_0": 119_065_248, "macs_32_exit_1": 227_881_056, "macs_32_exit_2": 426_490_080},
}

_SOURCE = ("no published numbers exist; parameters and MACs (FlopCounterMode FLOPs / 2, batch 1, eval) "
           "measured on this implementation with num_classes=10, in_chans=3")


def _card(size: str, early_exit: bool) -> ModelCard:
    preset = PRESETS[size]
    key = f"{size}_ee" if early_exit else size
    notes = (f"preset {size}: levels {list(preset['fractal_levels'])}, base channels {preset['base_channels']}, "
             f"pattern {preset['pattern_resolution']}px; options: fractal_pattern and the FractalBrainNet "
             "constructor's (see baselines/fractalbrainnet.py for the choices made where the description is vague)")
    if early_exit:
        notes += "; early exit after every fractal stage (pool + linear), the last exit is the main head"
    return ModelCard(family="fractalbrainnet", paper=PAPER, dynamic_kind="early_exit" if early_exit else "static",
                     input_size=32, in_chans=3, reference=dict(MEASURED[key]), reference_source=_SOURCE, notes=notes)


def _register(size: str, early_exit: bool) -> None:
    name = f"fractalbrainnet_{size}" + ("_ee" if early_exit else "")

    def build(*, num_classes: int = 10, in_chans: int = 3,
              fractal_pattern: FractalPatternType | str = FractalPatternType.MANDELBROT,
              **options: Any) -> FractalBrainNet | FractalBrainNetEE:
        return create_fractal_brain_net(size, num_classes, fractal_pattern, early_exit=early_exit,
                                        in_chans=in_chans, **options)

    build.__name__ = name
    build.__doc__ = f"FractalBrainNet preset {size!r}{' with early exits' if early_exit else ''}."
    register_model(name, card=_card(size, early_exit))(build)


for _size in PRESETS:
    _register(_size, early_exit=False)
for _size in ("small", "medium"):
    _register(_size, early_exit=True)
