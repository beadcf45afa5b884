"""Multi-Scale Dense Networks (Huang, Chen, Li, Wu, van der Maaten and Weinberger, "Multi-Scale Dense
Networks for Resource Efficient Image Classification", ICLR 2018), the CIFAR configuration.

MSDNet keeps feature maps at S scales (CIFAR: 3 scales, 32x32, 16x16 and 8x8 at a 32x32 input) all
through the network. The first layer builds them from the image (a 3x3 convolution at the finest
scale, then a strided 3x3 convolution per coarser scale). Every later layer adds ``growth x f_s``
channels at each scale s it keeps (f = ``growth_factors``, 1-2-4): at the finest kept scale from
that scale's features alone (a "regular" 3x3 convolution), at every coarser one half from the scale
above (a strided 3x3 convolution) and half from the same scale, and concatenates them to its input
(dense connectivity: each layer sees every earlier layer's output at its scale). Each 3x3
convolution has a 1x1 bottleneck in front of it of at most ``bottleneck_factors[s] x`` its output
width. Depth-wise, scales are dropped from the finest as the network goes deeper (the paper's
"max" pruning: the layers are split into S equal spans, the i-th of which keeps S - i scales), and
where a scale is dropped a transition layer (1x1 convolutions) halves the channels
(``reduction``). Classifiers sit on the coarsest scale after each block of layers: two strided
3x3 convolutions of 128 channels, average pooling, a linear layer.

Blocks (exits): ``blocks`` of them; block 0 has ``base`` layers and every later block ``step``
layers (``step_mode="even"``) or ``step x k + 1`` layers for block k (``"lin_grow"``). The paper's
CIFAR-100 anytime network is ``msdnet_cifar_anytime`` (7 blocks, base 4, step 2, even: 16 layers)
and its budgeted-batch network ``msdnet_cifar_budget`` (5 blocks, base 1, step 1, lin_grow:
1 + 2 + 3 + 4 + 5 = 15 layers); both with 16 initial channels, growth 6, growth and bottleneck
factors 1-2-4, transitions halving the channels.

It is an :class:`fractalbench.harness.early_exit.EarlyExitNetwork` whose stages pass a list of
tensors (one per kept scale): real early exit, compaction of every scale, masking and cost units
come from there. Budgeted batch classification (the paper's second setting) is the harness's
budget fit (:mod:`fractalbench.harness.calibration`: exit shares p_k ~ q^k with the thresholds
fitted on validation, the paper's own procedure).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.registry import ModelCard, recipe_text, register_model

PAPER = ("Huang, Chen, Li, Wu, van der Maaten, Weinberger: Multi-Scale Dense Networks for Resource Efficient "
         "Image Classification, ICLR 2018 (MSDNet)")
STEP_MODES = ("even", "lin_grow")
CLASSIFIER_CHANNELS = 128


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def block_layers(blocks: int, base: int, step: int, step_mode: str) -> list[int]:
    """Layers per block: ``base`` then ``step`` (even) or ``step x k + 1`` for block k (lin_grow)."""
    if step_mode not in STEP_MODES:
        raise ValueError(f"step_mode {step_mode!r} is not one of {', '.join(STEP_MODES)}")
    if blocks < 1 or base < 1 or step < 1:
        raise ValueError(f"blocks, base and step must be >= 1, got {blocks}, {base}, {step}")
    return [base] + [step if step_mode == "even" else step * k + 1 for k in range(1, blocks)]


def kept_scales(layer: int, layers: int, scales: int) -> tuple[int, int]:
    """(scales in, scales out) of layer ``layer`` (1-based) of ``layers``: the layers are split into
    ``scales`` spans of ceil(layers / scales), the i-th keeping ``scales - i`` scales (the paper's
    "max" pruning); a layer whose output keeps fewer scales than its input drops the finest."""
    span = math.ceil(layers / scales)
    return scales - (max(0, layer - 2) // span), scales - ((layer - 1) // span)


class Branch(nn.Module):
    """One new feature path at one scale: a 1x1 bottleneck of at most ``bottleneck x c_out`` channels
    (none when the input is narrower), then a 3x3 convolution (stride 2 from the finer scale)."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: float | None) -> None:
        super().__init__()
        inner = c_in if bottleneck is None else min(c_in, int(bottleneck * c_out))
        layers: list[nn.Module] = []
        if bottleneck is not None:
            layers.append(conv_bn_relu(c_in, inner, 1))
        layers.append(conv_bn_relu(inner, c_out, 3, stride))
        self.path = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.path(x)


class ScaleOutput(nn.Module):
    """Layer output at one scale: the input at that scale, then the new channels (from the same scale,
    and half from the finer scale when ``finer`` channels are given), concatenated."""

    def __init__(self, c_same: int, c_finer: int | None, growth: int, bottleneck: tuple[float | None, float | None]):
        super().__init__()
        if c_finer is None:
            self.down = None
            self.same = Branch(c_same, growth, 1, bottleneck[1])
        else:
            self.down = Branch(c_finer, growth // 2, 2, bottleneck[0])
            self.same = Branch(c_same, growth // 2, 1, bottleneck[1])

    def forward(self, same: Tensor, finer: Tensor | None) -> Tensor:
        if self.down is None:
            return torch.cat([same, self.same(same)], dim=1)
        return torch.cat([same, self.down(finer), self.same(same)], dim=1)


class MSDLayer(nn.Module):
    """One MSDNet layer on the scales it keeps: input ``scales_in`` tensors (the coarsest ones),
    output ``scales_out``; with ``scales_out < scales_in`` the finest input feeds only the strided
    path of the next scale and is then dropped."""

    def __init__(self, channels: int, growth: int, scales: int, scales_in: int, scales_out: int,
                 growth_factors: Sequence[int], bottleneck: bool, bottleneck_factors: Sequence[float]) -> None:
        super().__init__()
        self.scales_in, self.scales_out = scales_in, scales_out
        offset = scales - scales_out  # absolute index of the finest output scale
        width = lambda s: channels * growth_factors[s]  # noqa: E731 - input channels at absolute scale s
        factor = (lambda s: bottleneck_factors[s]) if bottleneck else (lambda s: None)  # noqa: E731
        outputs = []
        for s in range(offset, scales):
            finer = s > offset or scales_in > scales_out
            outputs.append(ScaleOutput(width(s), width(s - 1) if finer else None, growth * growth_factors[s],
                                       (factor(s - 1) if finer else None, factor(s))))
        self.outputs = nn.ModuleList(outputs)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        drop = self.scales_in - self.scales_out
        out = []
        for j, module in enumerate(self.outputs):
            i = j + drop  # position of this output's scale in the input list
            out.append(module(xs[i], xs[i - 1] if (j > 0 or drop > 0) else None))
        return out


class Transition(nn.Module):
    """1x1 convolutions that reduce every kept scale's channels (``channels_in x f_s`` to ``channels_out
    x f_s``)."""

    def __init__(self, channels_in: int, channels_out: int, scales: int, scales_kept: int,
                 growth_factors: Sequence[int]) -> None:
        super().__init__()
        offset = scales - scales_kept
        self.convs = nn.ModuleList(conv_bn_relu(channels_in * growth_factors[s], channels_out * growth_factors[s], 1)
                                   for s in range(offset, scales))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class FirstLayer(nn.Module):
    """The image at every scale: a 3x3 convolution at the finest, then a strided 3x3 per coarser scale."""

    def __init__(self, in_chans: int, channels: int, growth_factors: Sequence[int]) -> None:
        super().__init__()
        convs, c_in = [], in_chans
        for s, factor in enumerate(growth_factors):
            convs.append(conv_bn_relu(c_in, channels * factor, 3, 1 if s == 0 else 2))
            c_in = channels * factor
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return out


class Stage(nn.Module):
    """The layers of one block, applied in order to the list of per-scale features."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, xs: Tensor | list[Tensor]) -> list[Tensor]:
        for layer in self.layers:
            xs = layer(xs)
        return xs


class Classifier(nn.Module):
    """An exit on the coarsest scale: two strided 3x3 convolutions of 128 channels, global average
    pooling (the paper's 2x2 average pooling of the 2x2 map left at a 32x32 input), a linear layer."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(channels, CLASSIFIER_CHANNELS, 3, 2),
                                      conv_bn_relu(CLASSIFIER_CHANNELS, CLASSIFIER_CHANNELS, 3, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(CLASSIFIER_CHANNELS, num_classes)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self.linear(self.features(xs[-1]))


class MSDNet(EarlyExitNetwork):
    """MSDNet (module docstring): ``blocks`` exits, each after its block of MSD layers."""

    def __init__(self, num_classes: int = 100, in_chans: int = 3, blocks: int = 7, base: int = 4, step: int = 2,
                 step_mode: str = "even", channels: int = 16, growth: int = 6,
                 growth_factors: Sequence[int] = (1, 2, 4), bottleneck: bool = True,
                 bottleneck_factors: Sequence[float] = (1, 2, 4), reduction: float = 0.5,
                 exit_weights: Sequence[float] | None = None) -> None:
        scales = len(growth_factors)
        if len(bottleneck_factors) != scales:
            raise ValueError(f"bottleneck_factors needs {scales} values (one per scale), got {len(bottleneck_factors)}")
        if not 0 < reduction <= 1:
            raise ValueError(f"reduction must be in (0, 1], got {reduction}")
        per_block = block_layers(blocks, base, step, step_mode)
        total, done, width = sum(per_block), 0, channels
        stages, heads = [], []
        for k, n in enumerate(per_block):
            layers: list[nn.Module] = [FirstLayer(in_chans, channels, growth_factors)] if k == 0 else []
            for _ in range(n):
                done += 1
                scales_in, scales_out = kept_scales(done, total, scales)
                layers.append(MSDLayer(width, growth, scales, scales_in, scales_out, growth_factors, bottleneck,
                                       bottleneck_factors))
                width += growth
                if scales_in > scales_out:
                    reduced = math.floor(reduction * width)
                    layers.append(Transition(width, reduced, scales, scales_out, growth_factors))
                    width = reduced
            stages.append(Stage(layers))
            heads.append(Classifier(width * growth_factors[-1], num_classes))
        super().__init__(stages, heads, exit_weights)
        self.layers_per_block, self.scales = per_block, scales
        self._init_weights()

    def _init_weights(self) -> None:
        """As the authors' code: convolutions N(0, sqrt(2 / (k x k x out))), batch norms 1 and 0,
        linear biases 0 (their weights keep PyTorch's default)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


NOTES = (
    "The CIFAR network of the paper as the authors' released PyTorch code builds it (kalviny/MSDNet-PyTorch, "
    "models/msdnet.py; checked here: the same 3,067,960 / 2,078,924 parameters at 100 classes and the same logits "
    "at every exit with the same weights): 3 scales with growth and bottleneck factors 1-2-4, 16 initial channels, "
    "growth 6, 'max' pruning of scales with transitions halving the channels, classifiers of two strided 3x3 "
    "convolutions of 128 channels on the coarsest scale. One difference: the classifiers pool globally (adaptive "
    "average pooling) where the code pools 2x2, the same at 32x32 inputs (a 2x2 map is left) and defined at smaller "
    "ones (the 8x8 digits). The paper reports its CIFAR results as curves of accuracy against FLOPs (Figures 5 "
    "and 7); the reference holds the released code's parameter counts.")

#: The released code's CIFAR defaults (args.py, main.py): SGD, lr 0.1 divided by 10 at 50 % and 75 % of 300
#: epochs, momentum 0.9, weight decay 1e-4, batch 64; every exit's loss weighted 1.
MSDNET_RECIPE = {"epochs": 300, "batch_size": 64, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                 "weight_decay": 1e-4, "schedule": "step", "milestones": (150, 225), "gamma": 0.1,
                 "nesterov": False, "precision": "fp32"}
MSDNET_RECIPE_NOTE = (
    "kalviny/MSDNet-PyTorch args.py and main.py (CIFAR): 300 epochs, SGD lr 0.1, x0.1 at epochs 150 and 225, "
    "momentum 0.9, weight decay 1e-4, batch 64, the sum of the exit losses; budgeted batch classification "
    "(--use-valid) holds 5,000 training images out to fit the exit thresholds on, as the harness's validation split")


def _card(layers: str, params_c100: float) -> ModelCard:
    return ModelCard(
        family="msdnet", paper=PAPER, dynamic_kind="early_exit", input_size=32,
        reference={"params_cifar100": params_c100},
        reference_source=(f"parameters of the {layers} CIFAR-100 network built by the authors' released code "
                          "(kalviny/MSDNet-PyTorch models/msdnet.py, counted here); the paper gives no table for "
                          "CIFAR"),
        notes=NOTES, paper_recipe=recipe_text(MSDNET_RECIPE, MSDNET_RECIPE_NOTE))


@register_model(card=_card("anytime (7 blocks, base 4, step 2: 16 layers)", 3_067_960))
def msdnet_cifar_anytime(*, num_classes: int = 100, in_chans: int = 3, **kwargs) -> MSDNet:
    """The paper's CIFAR anytime-prediction MSDNet: 7 exits, base 4, step 2 (even); options as MSDNet."""
    options = {"blocks": 7, "base": 4, "step": 2, "step_mode": "even", **kwargs}
    return MSDNet(num_classes, in_chans, **options)


@register_model(card=_card("budgeted-batch (5 blocks, base 1, step 1, lin_grow: 15 layers)", 2_078_924))
def msdnet_cifar_budget(*, num_classes: int = 100, in_chans: int = 3, **kwargs) -> MSDNet:
    """The paper's CIFAR budgeted-batch MSDNet: 5 exits of 1, 2, 3, 4 and 5 layers; options as MSDNet."""
    options = {"blocks": 5, "base": 1, "step": 1, "step_mode": "lin_grow", **kwargs}
    return MSDNet(num_classes, in_chans, **options)
