"""FractalBrainNet's fractal patterns: the rasters (Mandelbrot and Julia escape time, Sierpinski
triangle, Cantor dust, dragon curve; [H, W] float64 in [0, 1], deterministic, vectorised; and
``uniform``, a constant raster with no structure, the control of the pattern study), the bilinear
resize that turns a pattern into a feature-map mask, and the per-model mask cache.

Re-exported by :mod:`fractalbench.baselines.fractalbrainnet`, whose docstring gives the choices made (raster
orientation, exact coverage lattices, the dragon's rasterisation, the cached masks).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import Tensor

MAX_LATTICE = 4096  # largest lattice side the exact Sierpinski raster may use

class FractalPatternType(Enum):
    """Pattern families of the generator."""

    MANDELBROT = "mandelbrot"
    SIERPINSKI = "sierpinski"
    JULIA = "julia"
    CANTOR = "cantor"
    DRAGON_CURVE = "dragon_curve"
    UNIFORM = "uniform"  # not a fractal: the control (every pixel the same value)

    @classmethod
    def parse(cls, value: FractalPatternType | str) -> FractalPatternType:
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
    def uniform_connectivity(size: int, value: float = 0.5) -> np.ndarray:
        """The control: every pixel ``value`` (default 0.5, where the alpha, beta and gamma bands get
        the same factor 0.5 and theta sin(pi / 2) = 1), so the bands see no spatial structure."""
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"uniform pattern value must be in [0, 1], got {value}")
        return np.full((size, size), float(value))

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
            if kind is FractalPatternType.UNIFORM:
                return gen.uniform_connectivity(resolution, **options)
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


GAMMA_BANDS = ("constant", "mask")  # gamma band factor: 0.5 (the description) or 0.5 x mask


class FractalMaskCache:
    """The model's pattern and its resized masks, computed once per (height, width, device, dtype).

    ``modulation`` is [1, 4, 1, h, w]: the factors of the alpha, beta, gamma and theta bands
    (mask, 1 - mask, gamma, sin(pi mask)) with gamma = 0.5 for ``gamma_band="constant"`` (the
    description) or 0.5 mask for ``"mask"``. Entries are normal tensors (never inference tensors)
    that do not require grad; they are not part of any state dict.
    """

    def __init__(self, pattern: np.ndarray, gamma_band: str = "constant") -> None:
        pattern = np.asarray(pattern, dtype=np.float64)
        if pattern.ndim != 2 or pattern.min() < 0 or pattern.max() > 1:
            raise ValueError("a fractal pattern must be a 2-D array with values in [0, 1]")
        if gamma_band not in GAMMA_BANDS:
            raise ValueError(f"gamma_band must be one of {', '.join(map(repr, GAMMA_BANDS))}, got {gamma_band!r}")
        self.pattern = pattern
        self._gamma_band = gamma_band
        self._masks: dict[tuple, Tensor] = {}
        self._modulations: dict[tuple, Tensor] = {}

    @property
    def gamma_band(self) -> str:
        """The gamma band's factor, fixed at construction (the cached modulations follow from it)."""
        return self._gamma_band

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
            gamma = 0.5 * m if self._gamma_band == "mask" else np.full_like(m, 0.5)
            bands = np.stack([m, 1.0 - m, gamma, np.sin(np.pi * m)])[None, :, None]
            self._modulations[key] = self._tensor(bands, device, dtype)
        return self._modulations[key]

    def __len__(self) -> int:
        return len(self._masks) + len(self._modulations)
