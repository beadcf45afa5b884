"""CIFAR-style ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2).

6n+2 layers: a 3x3 conv with 16 filters, then three stages of n basic blocks with 16, 32 and 64
filters (stride 2 at the first block of stages 2 and 3), global average pooling and a linear
classifier. Shortcuts are option A: identity, with the spatial size halved by taking every other
pixel and the new channels zero-padded, so shortcuts add no parameters.

This file is the example to copy when adding a baseline: a model class, one builder per named
variant registered with a model card that carries the published numbers, and its tests in
``tests/baselines/test_resnet.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.harness.registry import ModelCard, recipe_text, register_model

PAPER = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016 (CIFAR-10 ResNets, Table 6)"


class ShortcutA(nn.Module):
    """Option A shortcut: subsample spatially by ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(in_planes, planes, stride) if (stride != 1 or in_planes != planes) else nn.Identity()

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch F(x) alone (gated families run or skip exactly this)."""
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


def run_block_on_rows(block: BasicBlock, h: Tensor, on: Tensor, mode: str = "compact") -> Tensor:
    """A residual block that only the rows ``on`` (bool [N]) execute; the others take its
    parameter-free shortcut. ``compact``: the block runs on the kept rows alone (none: not called);
    ``mask``: the labelled variant, the block on every row, then selected (SkipNet's gates,
    BlockDrop's policy)."""
    if mode == "mask":
        return torch.where(on[:, None, None, None], block(h), block.shortcut(h))
    if bool(on.all()):
        return block(h)
    if bool(on.any()):
        idx = on.nonzero().squeeze(1)
        return block.shortcut(h).index_copy(0, idx, block(h.index_select(0, idx)))
    return block.shortcut(h)  # a skipped block passes its input through its shortcut


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs. ``stem``, ``layer1..3`` and ``head`` are exposed so that
    early-exit and gated families can reuse the backbone."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        self.depth = depth
        self.blocks_per_stage = n = (depth - 2) // 6
        self.widths = widths
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


#: He et al. 2016 sec. 4.2 (CIFAR-10), the recipe behind Table 6.
HE_RECIPE = {"epochs": 164, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
             "weight_decay": 1e-4, "schedule": "step", "milestones": (82, 123), "gamma": 0.1, "precision": "fp32"}
HE_RECIPE_NOTE = (
    "He et al. 2016 sec. 4.2: lr /10 at 32k and 48k iterations, stop at 64k (batch 128: ~82/123/164 epochs "
    "of the 50k training images; the schedule was chosen on a 45k/5k split), plain momentum, He init, BN, "
    "no dropout; training augmentation 4-pixel zero pad + random 32x32 crop + horizontal flip, test on the "
    "single 32x32 view")


def _card(depth: int, params: float, macs: float | None, top1: float) -> ModelCard:
    ref = {"params": params, "top1_cifar10": top1}
    if macs is not None:
        ref["macs"] = macs
    note = HE_RECIPE_NOTE
    if depth == 110:
        note += "; ResNet-110 warms up at lr 0.01 until training error < 80% (~400 iterations), then 0.1"
    return ModelCard(
        family="resnet",
        paper=PAPER,
        input_size=32,
        reference=ref,
        reference_source="params and CIFAR-10 top-1 (100 - test error %): He et al. 2016 Table 6 (ResNet-110: "
        "100 - 6.61, the mean of 5 runs; its best run is 93.57); MACs (conv + FC, option A) as commonly "
        "reported for CIFAR ResNets, not from the paper",
        paper_recipe=recipe_text(HE_RECIPE, note),
    )


@register_model(card=_card(20, 0.27e6, 40.55e6, 91.25))
def resnet20(*, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_chans)


@register_model(card=_card(32, 0.46e6, 68.86e6, 92.49))
def resnet32(*, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(32, num_classes, in_chans)


@register_model(card=_card(44, 0.66e6, 97.16e6, 92.83))
def resnet44(*, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(44, num_classes, in_chans)


@register_model(card=_card(56, 0.85e6, 125.5e6, 93.03))
def resnet56(*, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_chans)


@register_model(card=_card(110, 1.7e6, 252.9e6, 93.39))
def resnet110(*, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(110, num_classes, in_chans)
