"""BranchyNet B-ResNet (Teerapittayanon, McDanel and Kung, "BranchyNet: Fast Inference via Early
Exiting from Deep Neural Networks", ICPR 2016).

A CIFAR ResNet (:class:`fractalbench.baselines.resnet.CifarResNet`, option-A shortcuts) with two side branches:

- exit 0 right after the stem (the first conv layer): two conv3x3-BN-ReLU layers with 2w filters
  (w = the stem width, 16), then the classifier;
- exit 1 after the first stage (for ResNet-110 that is layer 37 = 1 + 18 x 2): one residual
  block of width w, then the classifier;
- exit 2: the ResNet itself (stages 2 and 3, global average pooling, FC).

Branch classifiers are global average pooling + FC by default (``branch_head="pool"``, the same
head as the main exit). ``branch_head="flatten"`` builds the released code's heads instead
(kunglab/branchynet ``networks/resnet_cifar10.py``): branch 1 ends in 3x3/2 max pooling, flatten,
FC(n, n/2), FC(n/2, classes); branch 2 in flatten, FC. Those FCs depend on ``input_size`` and
branch 1's alone holds 26M weights at 32x32 (15x the ResNet-110 backbone).

Exit rule: the paper's is the softmax entropy (``fractalbench.harness.policies.EntropyPolicy``, exit when
entropy <= threshold); confidence and patience work too (they only see the logits). Training
minimises the weighted sum of the exit losses (the paper's joint objective) with
``exit_weights``, default (1, 1, 1).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fractalbench.baselines.resnet import BasicBlock, CifarResNet
from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.registry import ModelCard, recipe_text, register_model

PAPER = ("Teerapittayanon, McDanel, Kung: BranchyNet: Fast Inference via Early Exiting from Deep Neural "
         "Networks, ICPR 2016 (B-ResNet)")
BRANCH_HEADS = ("pool", "flatten")
DEFAULT_EXIT_WEIGHTS = (1.0, 1.0, 1.0)


def conv_bn_relu(in_planes: int, planes: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes),
                         nn.ReLU(inplace=True))


def pooled_classifier(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class BranchyResNet(EarlyExitNetwork):
    """B-ResNet-(6n+2): stages (stem, layer1, layer2+layer3) and heads (branch 1, branch 2, main).

    The stages and the main head are the modules of a :class:`CifarResNet`, so ``forward`` equals
    that ResNet's forward with the same weights.
    """

    paper_policy = "entropy"

    def __init__(self, depth: int = 110, num_classes: int = 10, in_chans: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64), branch_head: str = "pool", input_size: int = 32,
                 exit_weights: Sequence[float] = DEFAULT_EXIT_WEIGHTS) -> None:
        if branch_head not in BRANCH_HEADS:
            raise ValueError(f"branch_head {branch_head!r} is not one of {', '.join(BRANCH_HEADS)}")
        backbone = CifarResNet(depth, num_classes, in_chans, widths)
        w = widths[0]
        if branch_head == "pool":
            head0, head1 = pooled_classifier(2 * w, num_classes), pooled_classifier(w, num_classes)
        else:
            side = (input_size - 3) // 2 + 1  # 3x3 max pooling, stride 2, no padding
            n0, n1 = 2 * w * side * side, w * input_size * input_size
            head0 = nn.Sequential(nn.MaxPool2d(3, 2), nn.Flatten(), nn.Linear(n0, n0 // 2),
                                  nn.Linear(n0 // 2, num_classes))
            head1 = nn.Sequential(nn.Flatten(), nn.Linear(n1, num_classes))
        branch0 = nn.Sequential(conv_bn_relu(w, 2 * w), conv_bn_relu(2 * w, 2 * w), head0)
        branch1 = nn.Sequential(BasicBlock(w, w), head1)
        for branch in (branch0, branch1):
            for m in branch.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight)
        stages = [backbone.stem, backbone.layer1, nn.Sequential(backbone.layer2, backbone.layer3)]
        super().__init__(stages, [branch0, branch1, backbone.head], exit_weights)
        self.depth, self.widths, self.branch_head = depth, tuple(widths), branch_head
        self.__dict__["_dense"] = backbone  # not a registered child: its modules are the stages' own

    def dense_backbone(self) -> CifarResNet:
        """The ResNet whose modules the stages and the main head are (a ResNet checkpoint loads into it)."""
        return self.__dict__["_dense"]


NOTES = (
    "Branch placement as in the paper's B-ResNet-110: exit 0 after the first conv layer, exit 1 after the "
    "first stage (layer 37), exit 2 = the ResNet. The released code (kunglab/branchynet) puts one extra "
    "residual block before exit 0 (its stage 1 has 19 blocks) and uses an unpadded first conv (30x30 maps); "
    "here the backbone is exactly He et al.'s CIFAR ResNet so forward == resnetN's forward. Branch layers "
    "follow the released code: exit 0 = two 3x3 convs with 32 filters (released: conv+ReLU after ReLU+LRN; here "
    "conv-BN-ReLU, no LRN), exit 1 = one residual block of width 16. Their classifiers are global average "
    "pooling + FC (branch_head='pool', default) instead of the released flatten FCs (branch_head='flatten': "
    "FC 7200->3600->classes and FC 16384->classes at 32x32, 26M extra weights). Exit loss weights (1, 1, 1): "
    "the paper trains the weighted sum of exit losses without giving the weights for B-ResNet, and the "
    "released code's Branch ignores its weight argument (always 1.0). The paper's exit rule is the softmax "
    "entropy below a threshold (EntropyPolicy); thresholds are calibrated on validation "
    "(fractalbench.harness.calibration). The paper reports accuracy/speed-ups only, no parameter or MAC counts: the "
    "reference holds the backbone's published parameter count (He et al. Table 6)."
)


#: BranchyNet sec. IV and the released code (kunglab/branchynet experiment_resnet_cifar10.py, branchynet/net.py).
BRANCHY_RECIPE = {"epochs": 100, "batch_size": 64, "optimizer": "adam", "lr": 0.001, "betas": (0.99, 0.999),
                  "weight_decay": 0.0, "schedule": "none", "precision": "fp32"}
BRANCHY_RECIPE_NOTE = (
    "BranchyNet sec. IV: Adam, step size 0.001, beta1 0.99, beta2 0.999, the B-ResNet initialised from a trained "
    "ResNet-110; released code: the main network trained alone for 100 epochs, then the whole B-ResNet jointly "
    "for 100 epochs, batch 64, no weight decay with Adam, no augmentation (its optimizers.Adam(alpha=0.001) keeps "
    "chainer's beta1 0.9); the paper's ResNet-110 reaches only 80.70% on the released code's CIFAR-10 copy "
    "(datasets/pcifar10)")
#: B-ResNet-110, BranchyNet Table I (CPU and GPU rows; knee thresholds T = 0.3, 0.2).
B_RESNET110 = {"knee_top1_cifar10": 79.17, "baseline_resnet110_top1_cifar10": 80.70, "cpu_speedup": 1.9,
               "gpu_speedup": 1.9, "knee_exit0_pct": 41.5, "knee_exit1_pct": 13.8, "knee_exit2_pct": 44.7}
B_RESNET110_SOURCE = (
    "BranchyNet (ICPR 2016) Table I, B-ResNet row at the knee thresholds T = (0.3, 0.2): test top-1 79.17% with "
    "41.5/13.8/44.7% of samples at exits 0/1/2; CPU 137.20 -> 73.5 ms (1.9x), GPU 70.9 -> 37.2 ms (1.9x) per "
    "sample; its ResNet-110 baseline 80.70%; backbone params: He et al. 2016 Table 6. The knee accuracy is "
    "an early-exit operating point, not the last exit, so no measured value sits beside it")


def _card(depth: int, backbone_params: float) -> ModelCard:
    ref: dict[str, float] = {"backbone_params": backbone_params, "cpu_speedup": B_RESNET110["cpu_speedup"]}
    source = (f"backbone: ResNet-{depth}, He et al. 2016 Table 6; BranchyNet gives no parameter counts; cpu_speedup: "
              "the method's headline claim, measured on B-ResNet-110 (Table I: 1.9x on the CPU at the knee, 79.17 vs "
              "80.70 %)")
    note = BRANCHY_RECIPE_NOTE
    if depth == 110:
        ref.update(B_RESNET110)
        source = B_RESNET110_SOURCE
    else:
        note = f"the paper's B-ResNet-110 recipe (no ResNet-{depth} results in BranchyNet): {note}"
    return ModelCard(
        family="branchynet",
        paper=PAPER,
        dynamic_kind="early_exit",
        input_size=32,
        reference=ref,
        reference_source=source,
        notes=NOTES,
        paper_recipe=recipe_text(BRANCHY_RECIPE, note),
    )


@register_model(card=_card(110, 1.7e6))
def branchynet_resnet110(*, num_classes: int = 10, in_chans: int = 3, **kwargs) -> BranchyResNet:
    """B-ResNet-110 (the paper's network): options widths, branch_head, input_size, exit_weights."""
    return BranchyResNet(110, num_classes, in_chans, **kwargs)


@register_model(card=_card(56, 0.85e6))
def branchynet_resnet56(*, num_classes: int = 10, in_chans: int = 3, **kwargs) -> BranchyResNet:
    """B-ResNet-56: the same branches on ResNet-56."""
    return BranchyResNet(56, num_classes, in_chans, **kwargs)


@register_model(card=_card(20, 0.27e6))
def branchynet_resnet20(*, num_classes: int = 10, in_chans: int = 3, **kwargs) -> BranchyResNet:
    """B-ResNet-20: the same branches on ResNet-20 (CI-sized)."""
    return BranchyResNet(20, num_classes, in_chans, **kwargs)
