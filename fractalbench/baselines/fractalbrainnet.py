"""FractalBrainNet (J. R. F. Junior, 2024): fractal patterns as attention masks, "cerebral" band
processing and FractalNet-style recursive blocks, plus an early-exit variant.

Built from the description and original code in ``shared/reference/fractalbrainnet-description.txt``
(issue #6). The parts, in the order data flows:

- :class:`FractalPatternGenerator` draws one pattern (values in [0, 1], shape [H, W], float64,
  deterministic, vectorised) at construction: Mandelbrot and Julia escape time, Sierpinski
  triangle, Cantor dust and the dragon curve.
- :class:`CerebralDynamicsModule`: the pattern resized (bilinear) to the feature map is ``mask``.
  Four 1x1 "bands" see the input: alpha x mask, beta x (1 - mask), gamma x 0.5,
  theta x sin(pi mask); concatenated, fused by a 1x1 integration conv, LayerNorm over channels,
  plus the input.
- :class:`FractalNeuralBlock` (level L): level 1 is conv3x3-BN-CerebralDynamics-GELU; level L > 1
  joins a deep branch (two level L-1 blocks) and a shallow branch (conv3x3-CerebralDynamics-BN-GELU)
  with learnt weights (alpha, beta) = softmax(MLP(features)).
- :class:`AdaptiveScaleProcessor`: 1x1, 3x3 and 5x5 convs in parallel, 1x1 fusion (BN, GELU),
  plus the input.
- :class:`FractalBrainNet`: stem (7x7 conv, BN, GELU, scale processor), one stage per entry of
  ``fractal_levels`` (block, scale processor, adaptive pooling), global multi-head self-attention over
  the final feature map's pixels, then the head: average pool, optional meta-learner, MLP classifier.
- :class:`FractalBrainNetEE`: the same network as a cascade with a classifier after every stage
  (:class:`fractalbench.harness.early_exit.EarlyExitNetwork`: real early exit, compaction, masking, cost units).

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
  step).
- Gamma band: the description lists the factors as ``* fractal_mask``, ``* (1 - fractal_mask)``,
  ``* 0.5`` and ``* torch.sin(fractal_mask * math.pi)``, so ``gamma_band="constant"`` (default)
  multiplies the gamma band by 0.5. Kept option: ``"mask"``, 0.5 x mask (the original code's
  ``gamma(x) * mask * 0.5``, this build's default before). The option is a fixed attribute of the
  model's mask cache, which computes the band factors.
- Branch weights: the original uses a per-pixel sigmoid; here ``branch_attention="global"``
  (default: global average pool of both branches -> Linear(2C, C/4) -> GELU -> Linear(C/4, 2) ->
  softmax) or ``"pixel"`` (the same MLP as 1x1 convs, softmax per pixel), so alpha + beta = 1.
- Drop-path (training only, per sample): each branch of a join is dropped with probability
  ``drop_path_prob``; when both would go, one of them (chosen at random) is kept. A lone branch
  passes with weight 1 (FractalNet's join of one input). The original's Dropout2d on every block
  output is not used.
- Downsampling after every stage but the last: the description gives every stage "a module of
  adaptive pooling" ("pooling adaptativo") to reduce the spatial size, without an output size;
  ``downsample="adaptive"`` (default) is adaptive average pooling to (ceil(h / 2), ceil(w / 2)) of
  the input's size at forward time (:class:`AdaptiveHalving`, no parameters, 0 MACs). Kept
  options: ``"conv"`` (3x3 stride-2 conv, BN, GELU; this build's default before) and ``"avgpool"``
  (2x2 average pooling, ceil mode). Each halves the size (rounding up), never below 1 pixel.
- Global attention: the original attends over the pooled vector (a single token). Here the tokens
  are the pixels of the final feature map, with a residual connection; heads = the largest of
  ``attention_heads`` (8), 4, 2, 1 that divides the channels. The projections are those of an
  ``nn.MultiheadAttention`` but the product is written out (matmul, softmax, matmul), identical to
  its forward, so that MAC counters see every multiply (its fused fast path is one opaque op).
- Head: AdaptiveAvgPool2d -> meta-learner ``f + 0.1 * MLP(f)`` when
  ``enable_continuous_learning`` -> Dropout(0.2), Linear(C, C/2), GELU, Dropout(0.1), Linear.
- Presets: the description names small, medium, large and xlarge and says they vary the fractal
  levels, base channels and pattern resolution, but states no numbers (its only number is the
  constructor's default ``fractal_levels=[2, 3, 4, 5]``, kept). medium (2, 3, 4) x 64 @ 32 px,
  large (2, 3, 4, 5) x 96 @ 64 px and xlarge (3, 4, 5, 6) x 128 @ 128 px are the original code's;
  ``small`` (2, 2, 3) x 16 @ 16 px is this project's: 0.54 M parameters and 18.8 M MACs at 32x32
  (the original's (2, 3) x 32 has about as many parameters but 58 M MACs), cheap enough to train on 2
  CPU cores. large and xlarge are very large (0.25 and 0.87 billion parameters; xlarge takes ~15 s
  and 4 GB just to build on a CPU).
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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.baselines._fractal_blocks import (
    BAND_NAMES,
    DOWNSAMPLES,
    AdaptiveHalving,
    AdaptiveScaleProcessor,
    BranchAttention,
    CerebralDynamicsModule,
    ClassifierHead,
    FractalNeuralBlock,
    FractalStage,
    GlobalAttention,
    MetaLearner,
    _downsample,
    attention_heads_for,
    initialize_weights,
    sample_branch_keep,
)
from fractalbench.baselines._fractal_patterns import (
    GAMMA_BANDS,
    MAX_LATTICE,
    FractalMaskCache,
    FractalPatternGenerator,
    FractalPatternType,
    bilinear_matrix,
    resize_bilinear,
)
from fractalbench.harness.contract import ExtraRow, ModelExtras
from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.registry import ModelCard, register_model

__all__ = [
    "BAND_NAMES", "DOWNSAMPLES", "GAMMA_BANDS", "MAX_LATTICE", "MEASURED", "PAPER", "PRESETS", "AdaptiveHalving",
    "AdaptiveScaleProcessor", "BranchAttention",
    "CerebralDynamicsModule", "ClassifierHead", "ExitHead", "FractalBrainNet", "FractalBrainNetEE",
    "FractalMaskCache", "FractalNeuralBlock", "FractalPatternGenerator", "FractalPatternType", "FractalStage",
    "GlobalAttention", "MetaLearner", "analyze_fractal_patterns", "attention_heads_for", "bilinear_matrix",
    "create_fractal_brain_net", "fractal_stages_of", "initialize_weights", "pattern_extras", "pattern_images",
    "resize_bilinear", "sample_branch_keep",
]

PAPER = ("J. R. F. Junior, FractalBrainNet (LinkedIn Pulse, 2024-08-19), on FractalNet "
         "(Larsson, Maire, Shakhnarovich, ICLR 2017)")


# ----- the network --------------------------------------------------------------------------------

class FractalBrainNet(nn.Module):
    """Stem, fractal stages, global attention, head. ``forward(x)`` returns logits [N, num_classes].

    Stage i has ``base_channels * 2**min(i, 4)`` channels and a block of level ``fractal_levels[i]``.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, fractal_levels: Sequence[int] = (2, 3, 4, 5),
                 base_channels: int = 64, fractal_pattern: FractalPatternType | str = FractalPatternType.MANDELBROT,
                 pattern_resolution: int = 32, pattern_options: Mapping[str, Any] | None = None,
                 drop_path_prob: float = 0.15, enable_continuous_learning: bool = True, stem_stride: int = 2,
                 downsample: str = "adaptive", attention_heads: int = 8, branch_attention: str = "global",
                 dropout: Sequence[float] = (0.2, 0.1), gamma_band: str = "constant") -> None:
        super().__init__()
        levels = [int(level) for level in fractal_levels]
        if not levels or any(level < 1 for level in levels):
            raise ValueError(f"fractal_levels must be a non-empty list of whole numbers >= 1, got {fractal_levels!r}")
        if base_channels < 4:
            raise ValueError(f"base_channels must be >= 4 (four bands of C // 4 channels), got {base_channels}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {', '.join(map(repr, DOWNSAMPLES))}, got {downsample!r}")
        self.pattern_type = FractalPatternType.parse(fractal_pattern)
        self.config = dict(num_classes=num_classes, in_chans=in_chans, fractal_levels=tuple(levels),
                           base_channels=base_channels, fractal_pattern=self.pattern_type.value,
                           pattern_resolution=pattern_resolution, pattern_options=dict(pattern_options or {}),
                           drop_path_prob=drop_path_prob, enable_continuous_learning=enable_continuous_learning,
                           stem_stride=stem_stride, downsample=downsample, attention_heads=attention_heads,
                           branch_attention=branch_attention, dropout=tuple(dropout), gamma_band=gamma_band)
        self.num_classes = num_classes
        self.fractal_levels = levels
        self.enable_continuous_learning = enable_continuous_learning
        pattern = FractalPatternGenerator.generate(self.pattern_type, pattern_resolution, **dict(pattern_options or {}))
        self.mask_cache = FractalMaskCache(pattern, gamma_band)
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

    def extra_results(self, x: Tensor) -> ModelExtras:
        """The contract's optional hook: see :func:`pattern_extras`."""
        return pattern_extras(self, x)


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

    def extra_results(self, x: Tensor) -> ModelExtras:
        """The contract's optional hook: see :func:`pattern_extras` (on the full path)."""
        return pattern_extras(self, x)


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


def pattern_extras(model: nn.Module, x: Tensor) -> ModelExtras:
    """Rows and artifacts for the runner (contract hook ``extra_results``): the generated pattern
    as artifact ``pattern_<name>`` ([H, W] float32 in [0, 1]), ``pattern_complexity`` per stage
    (nats, ``exit`` = stage) and the ``hierarchy_score`` of :func:`analyze_fractal_patterns` on ``x``."""
    analysis = analyze_fractal_patterns(model, x)
    rows = [ExtraRow("pattern_complexity", float(v), "nats", {"exit": level})
            for level, v in enumerate(analysis["pattern_complexity"])]
    hier = analysis["hierarchical_organization"]
    rows.append(ExtraRow("hierarchy_score", float(hier["hierarchy_score"]), "score",
                         {"detail": {"correlation": hier["correlation"]}}))
    artifacts = {f"pattern_{name}": np.asarray(image, dtype=np.float32)
                 for name, image in pattern_images(model).items()}
    return ModelExtras(rows, artifacts)


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


# Measured on this code with the default options (downsample="adaptive", gamma_band="constant";
# tests/baselines/test_fractalbrainnet.py re-measures them): parameters with num_classes=10, in_chans=3;
# MACs at batch 1, eval, 32x32 and 64x64 input (FlopCounterMode / 2).
# Early-exit variants: macs_* is the full path (last exit); macs_32_exit_k the forced path to exit k.
MEASURED: dict[str, dict[str, float]] = {
    "small": {"params": 542_600, "macs_32": 18_766_904, "macs_64": 75_426_872},
    "medium": {"params": 14_868_912, "macs_32": 421_769_568, "macs_64": 1_687_679_328},
    "large": {"params": 250_508_150, "macs_32": 1_792_865_808, "macs_64": 7_154_955_792},
    "xlarge": {"params": 870_668_250, "macs_32": 5_906_908_480, "macs_64": 23_569_384_768},
    "small_ee": {"params": 543_100, "macs_32": 18_766_904, "macs_64": 75_426_872,
                 "macs_32_exit_0": 7_745_832, "macs_32_exit_1": 11_809_912, "macs_32_exit_2": 18_767_384},
    "medium_ee": {"params": 14_870_852, "macs_32": 421_769_568, "macs_64": 1_687_679_328,
                  "macs_32_exit_0": 116_705_952, "macs_32_exit_1": 223_162_464, "macs_32_exit_2": 421_771_488},
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
