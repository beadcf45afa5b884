"""Dynamic width on the CIFAR ResNet (:class:`fractalbench.baselines.resnet.CifarResNet`, option-A
shortcuts): Slimmable networks and Feature Boosting and Suppression.

Both start from a trained dense ResNet through the ``dense_backbone()`` hook: each model holds that
ResNet as its registered submodule ``backbone`` (its convolutions are the full-width weights), so a
ResNet checkpoint loads straight into it, nothing is stored twice, and ``freeze: backbone`` trains only
what the family adds (the narrower widths' batch norms; the saliency predictors).

Slimmable ResNet (Yu et al., "Slimmable Neural Networks", ICLR 2019)
--------------------------------------------------------------------
One network that runs at every width multiplier of ``widths`` (default 0.25, 0.5, 0.75, 1.0; the
list must end at 1.0): at width w every layer of C channels uses its first ``int(C w)`` channels
(the stem keeps the 3 input channels, the classifier all its classes), so the sub-network at width w
is exactly ``CifarResNet`` with stage widths (16w, 32w, 64w) whose weights are the first slices of
the full ones; its option-A shortcuts pad the narrow stage the way that narrow ResNet does.
Switchable batch norm: every width has its own BN per layer (width 1.0's are the backbone's); loading
a dense ResNet starts each narrower width's BN from the dense BN's first channels (statistics and
affine). ``width`` (an attribute, one of ``widths``) selects the width that ``forward`` and
``dynamic_forward`` run, so an ``attribute_sweep`` over it measures every width of one network;
``forced_forward(x, 0)`` / ``forward_exits`` run the full width.

- ``mode="compact"`` runs the narrow network: ``F.conv2d`` on the weight slice ``W[:k_out, :k_in]``,
  the width's BN on k channels, the classifier on the first k features. ``mode="mask"`` runs every
  convolution and the classifier at full width and zeroes the channels beyond the width (same logits).
- Decisions: the width is one per call (all samples alike). Policy None: ``width``; a
  ``decision_threshold`` t in [0, 1]: the widest width <= 1 - t (the narrowest when none is), so the
  harness's budget fits choose a width.
- Trace: ``gates`` [N, W] = which channel groups ran (group j: the channels between width j-1 and
  width j, so the row of a sample at width index i has i + 1 leading ones); ``extras['width']`` [N].
- Cost units: ``width_<w>`` for each width, probe = the compact network at that width (batch 1),
  baseline = the next narrower width's unit; a sample at width index i counts the units 0..i once
  (mask mode: all of them), so its MACs are exactly its width's. Cost roles: the classifier is the
  exit head (``head``).
- Training (``loss_terms``), the paper's slimmable training: every width runs on every batch and the
  terms ``cross_entropy_width<w>`` are summed (one optimiser step on the accumulated gradients). A width
  whose parameters are all frozen (width 1.0 under ``freeze: backbone``) is left out.

FBS (Gao et al., "Dynamic Channel Pruning: Feature Boosting and Suppression", ICLR 2019)
---------------------------------------------------------------------------------------
Each residual block's two 3x3 convolutions get a saliency predictor (:class:`SaliencyPredictor`):
``g = relu(W ss(x) + b)`` with ``ss`` the global average of each channel of the conv's input (the
inputs are ReLU outputs, so this is the paper's mean absolute value) and W: C_in -> C_out. The
``k = ceil(density C_out)`` channels of largest saliency are kept (winner-take-all; ties go to the lower
channel index, by a stable sort) and scaled by their saliency (boosting); the others are not computed
(suppression): ``out = relu(pi * BN(conv(x)))``, ``pi = wta_k(g)``. The second conv of a block reads
only the first conv's kept channels (its input-side sparsity, and its predictor reads only those
inputs); the residual's kept channels are added into the (dense) shortcut. The stem and the classifier
are not gated, so every block's input is dense. ``density`` (an attribute in (0, 1]) is the fraction
kept; ``decision_threshold`` t sets density 1 - t (t = 1 keeps nothing: every block is its shortcut).

- ``mode="compact"`` (eval mode): at batch 1 the kept output rows of the weight (``index_select``) and,
  for the second conv, the kept input columns, with BN and saliency folded into that small weight and a
  bias, then one ``F.conv2d``. A batch of N samples (each with its own channels) runs as one grouped
  convolution (``groups=N``) of the per-sample gathered weights, so every sample executes exactly its
  own channels: no channel is computed and masked in compact mode at any batch size. ``mode="mask"``
  (and training) computes every channel and multiplies by the masked saliencies (same decisions and
  logits up to float rounding).
- Trace: ``gates`` [N, sum of gated convs' channels] = kept channels, conv by conv in network order
  (``layer1.0.conv1``, ``layer1.0.conv2``, ...); ``extras['density']`` [N].
- Cost units (exact for any density): ``base`` (stem, shortcuts, head, and every first-conv predictor,
  which reads the dense block input: a forward that keeps no channel); per block ``<block>.conv1``
  (one kept output channel of conv1: C_in x 9 x H W MACs, plus the C_out MACs of conv2's predictor
  reading that channel) counted k1 times, and ``<block>.conv2`` (one (input, output) channel pair of
  conv2: 9 x H W MACs) counted k1 x k2 times; mask mode counts C1 and C1 x C2. Cost roles: the
  predictors (``saliency``) are gates, the classifier (``backbone.head``) is the exit head.
- Training (``loss_terms``): ``cross_entropy`` plus ``saliency_l1`` = ``l1_weight`` x sum over gated
  convs of the batch mean of ||g||_1 (the paper's lasso on the saliencies, lambda = 1e-8), with the
  winner-take-all active at ``density`` (all channels computed, the masked ones multiplied by 0).
  ``freeze: backbone`` trains only the predictors.
- Parametrisation: the saliency multiplies the whole BN output, ``relu(pi * BN(conv))``, so pi takes
  the place of BN's scale; this build keeps BN's own gamma inside (1 at init), so a dense checkpoint
  loads unchanged. (The authors' TensorFlow code, deep-fry/mayo ``gate/parametric.py``, drops gamma and
  adds BN's shift unscaled to the kept channels, ``pi * norm(conv) + beta``; with the shift inside, a
  kept channel of saliency 0 is exactly a suppressed one.) Loading one sets every predictor to W = 0, b = 1: the
  saliencies are all 1, the model at density 1 is exactly the dense ResNet, and below 1 it keeps the
  first k channels until training makes the saliencies input-dependent. A new model's predictors
  start from W ~ N(0, 0.05) truncated at 2 std, b = 1 (the authors' code: truncated normal 0.05,
  bias 1), and with ``zero_init_residual=True`` (default) the last BN scale of every identity-shortcut
  block is 0 (Goyal et al. 2017, as SkipNet here): each such block starts as the identity. Without it
  the boosting compounds with depth: a random ResNet-56 in eval mode overflows to NaN, and training
  ResNet-20 from scratch at SGD lr 0.05 made the predictors' weights blow up (NaN at step 18 on
  digits). ``False``: the backbone's own init.
- Densities: BN statistics and the predictors hold for the density a model was trained at; as in the
  paper, which fine-tunes each density, another density wants its own stage (``attribute_sweep`` with
  ``train``); with ``train: {epochs: 0}`` the other densities are measured on the first stage's BN.
- Batch-1 latency on CPU: ``benchmarks/fbs_latency.py`` (FBS's gathering and top-k cost about 30
  extra tensor ops per block, and PyTorch's im2col convolutions at these widths save far less time
  than MACs).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.baselines.resnet import BasicBlock, CifarResNet
from fractalbench.harness.contract import CostUnit, DynamicModel, DynamicOutput, Trace, check_exit_index, check_mode
from fractalbench.harness.policies import decision_threshold
from fractalbench.harness.registry import ModelCard, recipe_text, register_model

SLIMMABLE_PAPER = "Yu, Yang, Xu, Yang, Huang: Slimmable Neural Networks, ICLR 2019"
FBS_PAPER = ("Gao, Zhao, Dudziak, Mullins, Xu: Dynamic Channel Pruning: Feature Boosting and Suppression, "
             "ICLR 2019")
DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)
FBS_L1_WEIGHT = 1e-8  # the paper's lambda for the lasso on the saliencies
PREDICTOR_INIT_STD = 0.05  # the authors' code (deep-fry/mayo gate/base.py): truncated normal 0.05, bias 1


def channels_at(channels: int, width: float) -> int:
    """Channels a layer of ``channels`` keeps at width multiplier ``width``: ``int(C w)``, at least 1."""
    return max(1, int(channels * width + 1e-9))


def kept_channels(channels: int, density: float) -> int:
    """Channels FBS keeps at ``density`` in [0, 1]: ``ceil(density C)`` (0 at density 0)."""
    return min(channels, max(0, math.ceil(density * channels - 1e-9)))


def _policy_fraction(policy: Any) -> float | None:
    """The ``decision_threshold`` value of ``policy`` (None for no policy), checked to lie in [0, 1]."""
    if policy is None:
        return None
    t = decision_threshold(policy, 0.0)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"decision_threshold {t!r} is outside [0, 1]: dynamic-width models read it as the "
                         f"fraction of width or channels given up")
    return t


def _blocks(backbone: CifarResNet) -> list[tuple[str, BasicBlock]]:
    return [(f"layer{s}.{b}", block) for s, stage in enumerate((backbone.layer1, backbone.layer2, backbone.layer3), 1)
            for b, block in enumerate(stage)]


def _unit_counts(names: Sequence[str], values: Sequence[float], n: int, device: torch.device) -> dict[str, Tensor]:
    """Unit name -> the same count for each of n samples (columns of one tensor)."""
    table = torch.tensor([list(values)], dtype=torch.float32, device=device).expand(n, len(values))
    return dict(zip(names, table.unbind(1)))


# ===== Slimmable ResNet ==============================================================================

class SlimmableHead(nn.Module):
    """Global average pooling and the classifier on the first ``k`` features (all, in mask mode).
    Holds the backbone's ``nn.Linear`` without registering it (its parameters are the backbone's)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.__dict__["linear"] = linear

    def forward(self, h: Tensor, k: int, mask: bool = False) -> Tensor:
        linear = self.__dict__["linear"]
        pooled = F.adaptive_avg_pool2d(h, 1).flatten(1)
        weight = linear.weight if mask else linear.weight[:, :k]
        return F.linear(pooled, weight, linear.bias)


def _check_widths(widths: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(w) for w in widths)
    except (TypeError, ValueError):
        raise ValueError(f"widths must be a list of numbers in (0, 1], got {widths!r}") from None
    if not values or any(not 0.0 < w <= 1.0 for w in values) or list(values) != sorted(set(values)) \
            or values[-1] != 1.0:
        raise ValueError(f"widths must be distinct, increasing, in (0, 1] and end at 1.0 (the full network), "
                         f"got {list(widths)}")
    return values


class SlimmableResNet(DynamicModel):
    """Slimmable CIFAR ResNet-(6n+2). See the module docstring for widths, cost units and training."""

    dynamic_kind = "gated"
    num_exits = 1
    cost_roles = {"heads": ("head",)}

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, *,
                 widths: Sequence[float] = DEFAULT_WIDTHS, width: float = 1.0) -> None:
        super().__init__()
        self.backbone = CifarResNet(depth, num_classes, in_chans)
        self.depth = depth
        self.widths = _check_widths(widths)
        b = self.backbone
        named = _blocks(b)
        self.block_names = tuple(name for name, _ in named)
        self.blocks = [block for _, block in named]
        # the BN layers in network order: the stem's, then bn1 and bn2 of every block
        full_bns = [b.stem[1]] + [bn for block in self.blocks for bn in (block.bn1, block.bn2)]
        self._full_bns = full_bns  # a plain list: these modules are registered in the backbone
        bn_channels = [bn.num_features for bn in full_bns]
        self.layer_channels = {w: [channels_at(c, w) for c in bn_channels] for w in self.widths}
        self.switchable_bn = nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(channels_at(c, w)) for c in bn_channels) for w in self.widths[:-1])
        self.head = SlimmableHead(b.head[2])
        self.width = width

    # ----- configuration ----------------------------------------------------------------------

    @property
    def width(self) -> float:
        """The width multiplier ``forward`` and ``dynamic_forward`` run (one of ``widths``)."""
        return self.widths[self._width_index]

    @width.setter
    def width(self, value: float) -> None:
        self._width_index = self.width_index(value)

    def width_index(self, value: float) -> int:
        """Index of ``value`` in ``widths``; ValueError naming the widths otherwise."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = None
        for j, w in enumerate(self.widths):
            if v is not None and abs(w - v) < 1e-9:
                return j
        raise ValueError(f"width {value!r} is not one of the widths this network was built with: "
                         f"{', '.join(f'{w:g}' for w in self.widths)}")

    def dense_backbone(self) -> CifarResNet:
        """The full-width ResNet (its convolutions are every width's weights; a ResNet checkpoint loads into it)."""
        return self.backbone

    @torch.no_grad()
    def on_backbone_loaded(self) -> None:
        """Every narrower width's BN starts from the dense BN's first channels: statistics and affine."""
        for bns in self.switchable_bn:
            for bn, full in zip(bns, self._full_bns):
                k = bn.num_features
                bn.weight.copy_(full.weight[:k])
                bn.bias.copy_(full.bias[:k])
                bn.running_mean.copy_(full.running_mean[:k])
                bn.running_var.copy_(full.running_var[:k])
                bn.num_batches_tracked.copy_(full.num_batches_tracked)

    def _bn(self, j: int, layer: int) -> nn.BatchNorm2d:
        return self._full_bns[layer] if j == len(self.widths) - 1 else self.switchable_bn[j][layer]

    def _index_for(self, policy: Any) -> int:
        t = _policy_fraction(policy)
        if t is None:
            return self._width_index
        fits = [j for j, w in enumerate(self.widths) if w <= 1.0 - t + 1e-9]
        return fits[-1] if fits else 0

    # ----- the network at one width -----------------------------------------------------------

    def _norm(self, h: Tensor, j: int, layer: int, k: int, mask: bool) -> Tensor:
        bn = self._bn(j, layer)
        if not mask:
            return bn(h)
        return F.pad(bn(h[:, :k]), (0, 0, 0, 0, 0, h.shape[1] - k))  # channels beyond the width: zero

    @staticmethod
    def _conv(x: Tensor, conv: nn.Conv2d, k_out: int, k_in: int | None, mask: bool) -> Tensor:
        weight = conv.weight if mask else conv.weight[:k_out, :k_in]
        return F.conv2d(x, weight, None, conv.stride, conv.padding)

    @staticmethod
    def _shortcut(block: BasicBlock, h: Tensor, k_in: int, k_out: int, mask: bool) -> Tensor:
        if isinstance(block.shortcut, nn.Identity):
            return h
        full = block.conv2.out_channels
        s = block.shortcut.stride
        y = (h[:, :k_in] if mask else h)[:, :, ::s, ::s]
        pad = k_out - k_in  # option A at this width: the narrow ResNet's own zero padding
        y = F.pad(y, (0, 0, 0, 0, pad // 2, pad - pad // 2))
        return F.pad(y, (0, 0, 0, 0, 0, full - k_out)) if mask else y

    def _run(self, x: Tensor, j: int, mask: bool = False) -> Tensor:
        """Logits at width index j: the narrow network (compact) or every channel computed and the
        channels beyond the width zeroed (``mask``)."""
        channels = self.layer_channels[self.widths[j]]
        k = channels[0]
        h = F.relu(self._norm(self._conv(x, self.backbone.stem[0], k, None, mask), j, 0, k, mask))
        for i, block in enumerate(self.blocks):
            k1, k2 = channels[1 + 2 * i], channels[2 + 2 * i]
            o = F.relu(self._norm(self._conv(h, block.conv1, k1, k, mask), j, 1 + 2 * i, k1, mask))
            o = self._norm(self._conv(o, block.conv2, k2, k1, mask), j, 2 + 2 * i, k2, mask)
            h = F.relu(o + self._shortcut(block, h, k, k2, mask))
            k = k2
        return self.head(h, k, mask)

    def _trace(self, j: int, n: int, mask: bool, device: torch.device) -> Trace:
        groups = len(self.widths)
        ran = torch.arange(groups, device=device) <= j
        counts = [1.0 if (mask or g <= j) else 0.0 for g in range(groups)]
        return Trace(torch.zeros(n, dtype=torch.long, device=device), _unit_counts(self.unit_names, counts, n, device),
                     gates=ran.expand(n, groups).clone(),
                     extras={"width": torch.full((n,), self.widths[j], device=device)})

    @property
    def unit_names(self) -> tuple[str, ...]:
        return tuple(f"width_{w:g}" for w in self.widths)

    # ----- contract ---------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Logits at ``width`` (the narrow network)."""
        return self._run(x, self._width_index)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        """The single exit's forced path: the full width."""
        return [self.forced_forward(x, 0)]

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:
        check_exit_index(self, exit_index)
        return self._run(x, len(self.widths) - 1)

    def dynamic_forward(self, x: Tensor, policy: Any = None, mode: str = "compact") -> DynamicOutput:
        """Logits and trace at ``width`` (policy None) or at the width a ``decision_threshold`` t gives
        (the widest width <= 1 - t)."""
        mask = check_mode(mode) == "mask"
        j = self._index_for(policy)
        return DynamicOutput(self._run(x, j, mask), self._trace(j, x.shape[0], mask, x.device))

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``cross_entropy_width<w>`` for every width (the slimmable rule: all widths every step,
        losses summed), leaving out the full width when every backbone parameter is frozen."""
        full_trainable = any(p.requires_grad for p in self.backbone.parameters())
        terms = {}
        for j, w in enumerate(self.widths):
            if j == len(self.widths) - 1 and not full_trainable and terms:
                continue
            terms[f"cross_entropy_width{w:g}"] = F.cross_entropy(self._run(x, j), y)
        return terms

    def cost_units(self) -> list[CostUnit]:
        names = self.unit_names
        return [CostUnit(name, lambda x, j=j: self._run(x, j), baseline=names[j - 1] if j else None)
                for j, name in enumerate(names)]


# ===== FBS ===========================================================================================

class SaliencyPredictor(nn.Linear):
    """FBS's channel saliency predictor: ``g = relu(W ss + b)``, W: C_in -> C_out, on the pooled input
    ``ss`` ([C_in] for one sample, [N, C_in] for a batch). With ``inputs`` (the channels of the input
    that exist: [k] for one sample, [N, k] for a batch), ``ss`` holds only those and only those columns
    of W are used (one sample: ``index_select`` + ``addmv``; a batch: one ``baddbmm``)."""

    def forward(self, pooled: Tensor, inputs: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if pooled.dim() == 1:
            weight = self.weight if inputs is None else self.weight.index_select(1, inputs)
            return torch.addmv(self.bias, weight, pooled).relu_()
        if inputs is None:
            return F.linear(pooled, self.weight, self.bias).relu_()
        columns = self.weight.t()[inputs]  # [N, k, C_out]
        return torch.baddbmm(self.bias, pooled.unsqueeze(1), columns).squeeze(1).relu_()


def winners(g: Tensor, k: int) -> tuple[Tensor | None, Tensor]:
    """The k channels of largest saliency along the last axis of g ([C] or [N, C]; a stable sort: ties
    go to the lower index) and their saliencies, in order of saliency; (None, g) when k = C (all kept)."""
    if k >= g.shape[-1]:
        return None, g
    values, order = torch.sort(g, dim=-1, descending=True, stable=True)
    return order[..., :k], values[..., :k]


def winner_mask(g: Tensor, idx: Tensor | None) -> Tensor:
    """The 0/1 mask [N, C] of the kept channels ``idx`` [N, k] (all ones for None)."""
    if idx is None:
        return torch.ones_like(g)
    return torch.zeros_like(g).scatter_(1, idx, 1.0)


def _scaled(scale: Tensor, shift: Tensor, idx: Tensor | None, pi: Tensor) -> tuple[Tensor, Tensor]:
    """``pi * scale`` and ``pi * shift`` of the kept channels ``idx`` (None: all): [k] for one sample
    ([C] vectors, idx [k], pi [k]), [N, k] for a batch."""
    if idx is None:
        return scale * pi, shift * pi
    if idx.dim() == 1:
        return scale.index_select(0, idx).mul_(pi), shift.index_select(0, idx).mul_(pi)
    return scale[idx].mul_(pi), shift[idx].mul_(pi)


def _gated_conv(x: Tensor, conv: nn.Conv2d, scale: Tensor, shift: Tensor, out_idx: Tensor | None, pi: Tensor,
                in_idx: Tensor | None) -> Tensor:
    """``pi * BN(conv(x))`` computing only the kept output channels ``out_idx`` from the input channels
    ``in_idx`` that x holds (None: all), with BN in eval mode as ``scale z + shift`` folded into the
    gathered weight and a bias. One sample (x [1, k_in, H, W], idx [k], pi [k]): one ``F.conv2d`` of
    the gathered weight; a batch (idx and pi [N, k]): one grouped convolution (``groups=N``) of every
    sample's gathered weight. Returns [N, k_out, H', W']."""
    a, c = _scaled(scale, shift, out_idx, pi)
    w = conv.weight
    if pi.dim() == 1:  # one sample
        if out_idx is not None:
            w = w.index_select(0, out_idx)
        if in_idx is not None:
            w = w.index_select(1, in_idx)
        return F.conv2d(x, w * a.view(-1, 1, 1, 1), c, conv.stride, conv.padding)
    n = x.shape[0]
    if out_idx is None and in_idx is None:  # every channel of every sample: one convolution, then the affine
        return torch.addcmul(c[:, :, None, None], F.conv2d(x, w, None, conv.stride, conv.padding),
                             a[:, :, None, None])
    if in_idx is None:
        w = w[out_idx]  # [N, k_out, C_in, kh, kw]
    elif out_idx is None:
        w = w[:, in_idx].transpose(0, 1)  # [N, C_out, k_in, kh, kw]
    else:
        w = w[out_idx[:, :, None], in_idx[:, None, :]]  # [N, k_out, k_in, kh, kw]
    w = (w * a[:, :, None, None, None]).flatten(0, 1)
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w, c.flatten(), conv.stride, conv.padding, groups=n)
    return y.view(n, -1, *y.shape[2:])


class FBSResNet(DynamicModel):
    """CIFAR ResNet-(6n+2) with FBS on both convolutions of every residual block. See the module docstring."""

    dynamic_kind = "gated"
    num_exits = 1
    cost_roles = {"heads": ("backbone.head",), "gates": ("saliency",)}

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, *, density: float = 1.0,
                 l1_weight: float = FBS_L1_WEIGHT, zero_init_residual: bool = True) -> None:
        super().__init__()
        self.backbone = CifarResNet(depth, num_classes, in_chans)
        self.depth = depth
        named = _blocks(self.backbone)
        if zero_init_residual:  # identity-shortcut blocks start as the identity (module docstring)
            for _, block in named:
                if isinstance(block.shortcut, nn.Identity):
                    nn.init.zeros_(block.bn2.weight)
        self.block_names = tuple(name for name, _ in named)
        self.blocks = [block for _, block in named]
        self.unit_names = ("base", *[f"{name}.{conv}" for name in self.block_names for conv in ("conv1", "conv2")])
        self.saliency = nn.ModuleList(
            SaliencyPredictor(conv.in_channels, conv.out_channels) for block in self.blocks
            for conv in (block.conv1, block.conv2))
        # (block, its two predictors) per block: plain references to registered modules
        self._plan = [(block, self.saliency[2 * i], self.saliency[2 * i + 1]) for i, block in enumerate(self.blocks)]
        with torch.no_grad():
            for p in self.saliency:
                nn.init.trunc_normal_(p.weight, std=PREDICTOR_INIT_STD, a=-2 * PREDICTOR_INIT_STD,
                                      b=2 * PREDICTOR_INIT_STD)
                nn.init.ones_(p.bias)
        self.gated_channels = tuple(c for block in self.blocks for c in (block.conv1.out_channels,
                                                                          block.conv2.out_channels))
        self._gated_bns = [bn for block in self.blocks for bn in (block.bn1, block.bn2)]  # registered in backbone
        self.l1_weight = float(l1_weight)
        self.density = density

    # ----- configuration ----------------------------------------------------------------------

    @property
    def density(self) -> float:
        """Fraction of every gated conv's output channels kept, in (0, 1]."""
        return self._density

    @density.setter
    def density(self, value: float) -> None:
        try:
            d = float(value)
        except (TypeError, ValueError):
            d = float("nan")
        if not 0.0 < d <= 1.0:
            raise ValueError(f"density {value!r} must be in (0, 1]: the fraction of channels FBS keeps")
        self._density = d

    def dense_backbone(self) -> CifarResNet:
        """The ResNet whose convolutions FBS gates (a ResNet checkpoint loads into it)."""
        return self.backbone

    @torch.no_grad()
    def on_backbone_loaded(self) -> None:
        """Start from the dense network: every predictor W = 0, b = 1, so every saliency is 1 and the
        model at density 1 computes exactly the loaded ResNet (module docstring)."""
        for p in self.saliency:
            nn.init.zeros_(p.weight)
            nn.init.ones_(p.bias)

    def keep_counts(self, density: float) -> tuple[tuple[int, int], ...]:
        """(k1, k2) of every block at ``density`` (from the architecture alone: kept between calls)."""
        cache = self.__dict__.setdefault("_keep_cache", {})
        if density not in cache:
            cache[density] = tuple((kept_channels(b.conv1.out_channels, density),
                                    kept_channels(b.conv2.out_channels, density)) for b in self.blocks)
        return cache[density]

    def _density_for(self, policy: Any) -> float:
        t = _policy_fraction(policy)
        return self._density if t is None else 1.0 - t

    # ----- the gated blocks -------------------------------------------------------------------

    def _bn_folds(self) -> list[tuple[Tensor, Tensor]]:
        """Every gated conv's BN in eval mode as ``scale z + shift`` ([C] each), computed for all of
        them at once (one vector of every channel, split into views)."""
        bns = self._gated_bns
        buffers = [bn._buffers for bn in bns]  # direct reads: a module's __getattr__ costs more than the math
        params = [bn._parameters for bn in bns]
        var = torch.cat([b["running_var"] for b in buffers])
        eps = bns[0].eps if all(bn.eps == bns[0].eps for bn in bns) else torch.cat(
            [torch.full_like(b["running_var"], bn.eps) for b, bn in zip(buffers, bns)])
        scale = torch.cat([p["weight"] for p in params]) * torch.rsqrt(var + eps)
        shift = torch.cat([p["bias"] for p in params]) - torch.cat([b["running_mean"] for b in buffers]) * scale
        return list(zip(scale.split(self.gated_channels), shift.split(self.gated_channels)))

    def _compact_block(self, i: int, x: Tensor, k1: int, k2: int, folds: Sequence[tuple[Tensor, Tensor]]
                       ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """One block computing only the kept channels (eval mode). Returns the output and the kept
        channels of conv1 and conv2 ([k] for one sample, [N, k] for a batch; None = all)."""
        block, p1, p2 = self._plan[i]
        (s1, t1), (s2, t2) = folds[2 * i], folds[2 * i + 1]
        n = x.shape[0]
        one = n == 1  # one sample: 1-D pooled inputs, saliencies and channel lists; plain convolutions
        axes = (0, 2, 3) if one else (2, 3)
        idx1, pi1 = winners(p1(x.mean(axes)), k1)
        if k1 > 0:
            h = _gated_conv(x, block.conv1, s1, t1, idx1, pi1, None).relu_()
            g2 = p2(h.mean(axes), idx1)
        else:
            h = None
            empty = (0,) if one else (n, 0)
            g2 = p2(x.new_zeros(empty), x.new_zeros(empty, dtype=torch.long))
        idx2, pi2 = winners(g2, k2)
        out = block.shortcut(x)
        if k2 == 0:
            return F.relu(out), idx1, idx2
        if h is None:  # conv2 reads no channel: its output is 0, the kept channels hold pi * BN(0)
            _, c = _scaled(s2, t2, idx2, pi2)
            r = c.view(n, k2, 1, 1).expand(n, k2, *out.shape[2:])
        else:
            r = _gated_conv(h, block.conv2, s2, t2, idx2, pi2, idx1)
        if idx2 is None:
            return F.relu_(out + r), idx1, idx2
        if one:
            return F.relu_(out.index_add(1, idx2, r)), idx1, idx2
        return F.relu_(out.scatter_add(1, idx2[:, :, None, None].expand_as(r), r)), idx1, idx2

    def _masked_block(self, i: int, x: Tensor, k1: int, k2: int
                      ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor]:
        """One block computing every channel, the suppressed ones multiplied by 0 (training and mask
        mode; BN in the module's own mode). Returns the output, the kept channels and both saliencies."""
        block, p1, p2 = self.blocks[i], self.saliency[2 * i], self.saliency[2 * i + 1]
        g1 = p1(x.mean((2, 3)))
        idx1, _ = winners(g1, k1)
        pi1 = g1 * winner_mask(g1, idx1)
        h = F.relu(block.bn1(block.conv1(x)) * pi1[:, :, None, None])
        g2 = p2(h.mean((2, 3)))
        idx2, _ = winners(g2, k2)
        pi2 = g2 * winner_mask(g2, idx2)
        r = block.bn2(block.conv2(h)) * pi2[:, :, None, None]
        return F.relu(r + block.shortcut(x)), idx1, idx2, g1, g2

    def _run(self, x: Tensor, keep: Sequence[tuple[int, int]], mask: bool = False
             ) -> tuple[Tensor, list[Tensor | None], list[Tensor]]:
        """Logits, the kept channels of every gated conv and (mask path) the saliencies. The compact
        path needs eval mode; in training mode every path computes all channels (BN batch statistics)."""
        b = self.backbone
        h = b.stem(x)
        kept: list[Tensor | None] = []
        saliencies: list[Tensor] = []
        mask = mask or self.training
        folds = None if mask else self._bn_folds()
        for i, (k1, k2) in enumerate(keep):
            if mask:
                h, idx1, idx2, g1, g2 = self._masked_block(i, h, k1, k2)
                saliencies += [g1, g2]
            else:
                h, idx1, idx2 = self._compact_block(i, h, k1, k2, folds)
            kept += [idx1, idx2]
        return b.head(h), kept, saliencies

    def _layout(self, keep: Sequence[tuple[int, int]], mask: bool, device: torch.device
                ) -> tuple[Tensor, dict[int, Tensor], Tensor]:
        """For one keep configuration: the offset of every kept-channel column in the gate bits
        [sum k], ``arange(C)`` per channel count (the lists of convs that keep every channel) and the
        unit counts [U] (mask mode: every channel). They follow from the architecture and ``keep``
        alone, so they are kept between calls (a plain dict, not model state)."""
        key = (tuple(keep), mask, str(device))
        cache = self.__dict__.setdefault("_layout_cache", {})
        if key not in cache:
            offsets, offset, counts = [], 0, [1.0]
            for block, (k1, k2) in zip(self.blocks, keep):
                c1, c2 = block.conv1.out_channels, block.conv2.out_channels
                offsets += [offset] * k1 + [offset + c1] * k2
                offset += c1 + c2
                counts += [float(c1), float(c1 * c2)] if mask else [float(k1), float(k1 * k2)]
            aranges = {c: torch.arange(c, device=device) for c in set(self.gated_channels)}
            cache[key] = (torch.tensor(offsets, dtype=torch.long, device=device), aranges,
                          torch.tensor(counts, device=device))
        return cache[key]

    def _gates(self, kept: Sequence[Tensor | None], keep: Sequence[tuple[int, int]], n: int,
               device: torch.device) -> Tensor:
        """Kept-channel bits [N, sum C] of every gated conv, in network order (kept: [k] or [N, k]
        channel lists, None = all)."""
        total = sum(self.gated_channels)
        if all(idx is None for idx in kept):
            return torch.ones(n, total, dtype=torch.bool, device=device)
        offsets, aranges, _ = self._layout(keep, False, device)
        if n == 1:
            flat = torch.cat([aranges[c] if idx is None else idx if idx.dim() == 1 else idx.view(-1)
                              for idx, c in zip(kept, self.gated_channels)]) + offsets
            return torch.zeros(total, dtype=torch.bool, device=device).index_fill_(0, flat, True).view(1, total)
        flat = torch.cat([aranges[c].expand(n, c) if idx is None else idx
                          for idx, c in zip(kept, self.gated_channels)], 1) + offsets
        return torch.zeros(n, total, dtype=torch.bool, device=device).scatter_(1, flat, True)

    def _trace(self, kept: Sequence[Tensor | None], keep: Sequence[tuple[int, int]], density: float, n: int,
               mask: bool, device: torch.device) -> Trace:
        counts = self._layout(keep, mask, device)[2].repeat(n, 1)  # a fresh tensor: the layout's stays as it is
        return Trace(torch.zeros(n, dtype=torch.long, device=device), dict(zip(self.unit_names, counts.unbind(1))),
                     gates=self._gates(kept, keep, n, device),
                     extras={"density": torch.full((n,), density, device=device)})

    # ----- contract ---------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Logits at ``density`` (compact in eval mode)."""
        return self._run(x, self.keep_counts(self._density))[0]

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        """The single exit's forced path: every channel kept (the predictors still run and boost)."""
        return [self.forced_forward(x, 0)]

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:
        check_exit_index(self, exit_index)
        return self._run(x, self.keep_counts(1.0))[0]

    def dynamic_forward(self, x: Tensor, policy: Any = None, mode: str = "compact") -> DynamicOutput:
        """Logits and trace at ``density`` (policy None) or at density 1 - t (a ``decision_threshold`` t)."""
        mask = check_mode(mode) == "mask"
        density = self._density_for(policy)
        keep = self.keep_counts(density)
        logits, kept, _ = self._run(x, keep, mask)
        return DynamicOutput(logits, self._trace(kept, keep, density, x.shape[0], mask or self.training, x.device))

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``cross_entropy`` and ``saliency_l1`` (``l1_weight`` x sum over gated convs of mean_n ||g||_1),
        the winner-take-all at ``density``, every channel computed."""
        logits, _, saliencies = self._run(x, self.keep_counts(self._density), mask=True)
        l1 = sum(g.sum(1).mean() for g in saliencies)
        return {"cross_entropy": F.cross_entropy(logits, y), "saliency_l1": self.l1_weight * l1}

    def cost_units(self) -> list[CostUnit]:
        blocks = len(self.blocks)

        def probe(i: int | None = None, k: tuple[int, int] = (0, 0)) -> Any:
            keep = [k if j == i else (0, 0) for j in range(blocks)]
            return lambda x: self._run(x, keep)

        units = [CostUnit("base", probe())]
        for i, name in enumerate(self.block_names):  # names as in unit_names
            units += [CostUnit(f"{name}.conv1", probe(i, (1, 0)), baseline="base"),
                      CostUnit(f"{name}.conv2", probe(i, (1, 1)), baseline=f"{name}.conv1")]
        return units


# ===== cards and registration ========================================================================

#: The authors' released ImageNet models, JiahuiYu/slimmable_networks MODEL_ZOO.md (commit f0b8dac):
#: width -> (top-1 error %, the zoo's "MFLOPs", which count multiply-adds: MobileNet v1 1.0x is 569M).
S_RESNET50 = {1.0: (24.0, 4100.0), 0.75: (25.1, 2300.0), 0.5: (27.9, 1100.0), 0.25: (35.0, 278.0)}
S_MOBILENET_V1 = {1.0: (28.5, 569.0), 0.75: (30.5, 325.0), 0.5: (35.2, 150.0), 0.25: (46.9, 41.0)}
SLIMMABLE_SOURCE = (
    "ImageNet top-1 error (%) and millions of multiply-adds of the released S-ResNet-50 and S-MobileNet v1 "
    "(switches 0.25, 0.5, 0.75, 1.0), as listed in the authors' MODEL_ZOO.md (JiahuiYu/slimmable_networks, "
    "commit f0b8dac; its 'MFLOPs' column counts multiply-adds); the paper reports these slimmable models beside "
    "individually trained ones in its ImageNet classification table (Table 3; the values here were checked "
    "against the model zoo, not the PDF). The paper has no CIFAR results, so no measured value sits beside them")
SLIMMABLE_RECIPE = {"epochs": 100, "batch_size": 256, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                    "nesterov": True, "weight_decay": 1e-4, "schedule": "step", "milestones": (30, 60, 90),
                    "gamma": 0.1}
SLIMMABLE_NOTE = (
    "authors' apps/s_resnet50_train_val.yml (ImageNet, S-ResNet-50 from scratch, widths 0.25-1.0): every step "
    "runs all widths and sums their losses before one update (slimmable training), switchable BN; no CIFAR "
    "recipe in the paper")

#: deep-fry/mayo docs/fbs.md (the authors' code, commit 7211a11): M-CifarNet on CIFAR-10, dense and FBS d = 0.5.
FBS_REFERENCE = {"mcifarnet_dense_top1_pct": 91.37, "mcifarnet_dense_macs": 174e6,
                 "mcifarnet_fbs_d0.5_top1_pct": 90.54, "mcifarnet_fbs_d0.5_top5_pct": 99.75,
                 "mcifarnet_fbs_d0.5_macs": 57e6, "vgg16_imagenet_macs_saving_x": 5.0,
                 "resnet18_imagenet_macs_saving_x": 2.0, "imagenet_top5_loss_max_pct": 0.6}
FBS_SOURCE = (
    "M-CifarNet (8 conv layers) on CIFAR-10: dense 91.37 % top-1 at 174M MACs; FBS at density 0.5: 90.54 % top-1, "
    "99.75 % top-5 at 57M MACs ('a 3x reduction in MACs'), from the authors' code documentation (deep-fry/mayo "
    "docs/fbs.md, commit 7211a11). ImageNet: 'FBS can respectively provide 5x and 2x savings in compute on VGG-16 "
    "and ResNet-18, both with less than 0.6% top-5 accuracy loss' (abstract). The paper's own result tables "
    "(CIFAR-10 M-CifarNet, ImageNet VGG-16/ResNet-18 comparisons) could not be read here; these are not "
    "ResNet-56 numbers, so no measured value sits beside them")
FBS_NOTE = (
    "from a pretrained network: the authors' docs/fbs.md fine-tunes it with FBS at density 1.0, then lowers the "
    "density step by step, fine-tuning at each; loss = cross-entropy + lambda sum_l ||g_l||_1 with lambda = 1e-8 "
    "(paper)")


def _slimmable_card(depth: int) -> ModelCard:
    reference: dict[str, float] = {}
    for name, table in (("s_resnet50", S_RESNET50), ("s_mobilenet_v1", S_MOBILENET_V1)):
        for w, (err, mmacs) in table.items():
            reference[f"{name}_imagenet_top1_err_pct_w{w:.2f}"] = err
            reference[f"{name}_imagenet_mmacs_w{w:.2f}"] = mmacs
    return ModelCard(
        family="slimmable", paper=SLIMMABLE_PAPER, dynamic_kind="gated", input_size=32, reference=reference,
        reference_source=SLIMMABLE_SOURCE, paper_recipe=recipe_text(SLIMMABLE_RECIPE, SLIMMABLE_NOTE),
        notes=f"ResNet-{depth} (option A) at widths 0.25/0.5/0.75/1.0 (option `widths`) with switchable BN; the "
        "narrow networks are CifarResNets of stage widths (16w, 32w, 64w) on the first weight slices; `width` selects "
        "the operating point (attribute_sweep), decision_threshold t the widest width <= 1 - t. Width 1.0's BNs are "
        "the backbone's; loading a dense ResNet copies its sliced BNs into every narrower width. Trained with the "
        "slimmable rule (all widths each step); the paper's networks are ImageNet MobileNets/ResNet-50.")


def _fbs_card(depth: int) -> ModelCard:
    return ModelCard(
        family="fbs", paper=FBS_PAPER, dynamic_kind="gated", input_size=32, reference=dict(FBS_REFERENCE),
        reference_source=FBS_SOURCE, paper_recipe=recipe_text({}, FBS_NOTE),
        notes=f"ResNet-{depth} (option A) with FBS on both 3x3 convs of every residual block (stem and classifier "
        "dense, so every block input is dense; the authors' ResNet-18 config also gates the first conv and the "
        "projection shortcuts, which option A does not have). Saliency = relu(W avgpool(x) + b), top-ceil(dC) "
        "channels kept and scaled; BN keeps its own gamma inside (pi * BN(conv)); identity blocks start as the "
        "identity (zero_init_residual). `density` selects the operating point (attribute_sweep; each density "
        "wants its own fine-tuning stage, as in the paper), decision_threshold t sets density 1 - t. Compact mode "
        "computes only the kept channels at every batch size (grouped convolution of per-sample weights).")


def _register(depth: int) -> None:
    def slimmable(*, num_classes: int = 10, in_chans: int = 3, widths: Sequence[float] = DEFAULT_WIDTHS,
                  width: float = 1.0) -> SlimmableResNet:
        return SlimmableResNet(depth, num_classes, in_chans, widths=widths, width=width)

    def fbs(*, num_classes: int = 10, in_chans: int = 3, density: float = 1.0,
            l1_weight: float = FBS_L1_WEIGHT, zero_init_residual: bool = True) -> FBSResNet:
        return FBSResNet(depth, num_classes, in_chans, density=density, l1_weight=l1_weight,
                         zero_init_residual=zero_init_residual)

    for build, name, doc, card in ((slimmable, f"slimmable_resnet{depth}", f"Slimmable ResNet-{depth}",
                                    _slimmable_card(depth)),
                                   (fbs, f"fbs_resnet{depth}", f"FBS on ResNet-{depth}", _fbs_card(depth))):
        build.__name__ = build.__qualname__ = name
        build.__doc__ = doc
        register_model(card=card)(build)


for _depth in (20, 56):
    _register(_depth)
