"""FractalBrainNet's building blocks: the cerebral band processing modulated by the fractal mask,
the recursive fractal block with its branch attention and drop-path, the multi-scale processor,
stages, global attention over pixels, the meta-learner and classifier head, and the weight init.

Re-exported by :mod:`fractalbench.baselines.fractalbrainnet`, whose docstring gives the design and the choices
made where the description is vague.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.baselines._fractal_patterns import FractalMaskCache

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


DOWNSAMPLES = ("adaptive", "conv", "avgpool")


class AdaptiveHalving(nn.Module):
    """Adaptive average pooling to (ceil(h / 2), ceil(w / 2)) of the input's size (never below 1 pixel)."""

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        return F.adaptive_avg_pool2d(x, (max(1, (h + 1) // 2), max(1, (w + 1) // 2)))


def _downsample(kind: str, channels: int) -> nn.Module:
    """``"adaptive"`` (the description: :class:`AdaptiveHalving`, no parameters), ``"conv"`` (3x3
    stride-2 conv, BN, GELU) or ``"avgpool"`` (2x2 average pooling, ceil mode)."""
    if kind == "adaptive":
        return AdaptiveHalving()
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.GELU())
    if kind == "avgpool":
        return nn.AvgPool2d(2, ceil_mode=True)
    raise ValueError(f"downsample must be one of {', '.join(map(repr, DOWNSAMPLES))}, got {kind!r}")


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
