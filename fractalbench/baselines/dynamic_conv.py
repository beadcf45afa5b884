"""Dynamic convolution: CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for
Efficient Inference", NeurIPS 2019) on a CIFAR ResNet, with DY-Conv's router as an option (Chen et al.,
"Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020).

Layer. A CondConv layer holds K expert kernels ``W_1 .. W_K`` (one parameter of shape
[K, out, in, kh, kw]) and a routing function of its own input x. Sample n is convolved with its own
kernel ``sum_k r_k(x_n) W_k``: the kernels are mixed per sample, then ONE convolution runs per
sample. The paper's equivalent "mixture of experts" form ``sum_k r_k (W_k * x)`` needs K convolutions.

Routers (``router``):

- ``"condconv"`` (default, the paper's): ``r(x) = sigmoid(GAP(x) R + b)``, one fully connected layer
  per CondConv layer (the official TensorFlow code's ``Dense(num_experts, activation=sigmoid)``, with
  a bias, Glorot-uniform weights, zero bias). The weights are independent, they need not sum to 1.
  (The official EfficientNet-CondConv computes one routing per block and shares it between the
  block's CondConv layers; here every layer routes on its own input, the layer of the paper's sec. 2.)
- ``"dyconv"``: ``pi(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / tau)``, FC1 reduces the channels by
  ``reduction`` (4); the weights sum to 1. The temperature ``tau`` (a buffer, saved with the weights)
  falls linearly from ``temperature_start`` (30) at the first epoch to 1 at epoch
  ``min(temperature_epochs, epochs) - 1`` (DY-Conv: 30 -> 1 over the first 10 epochs) and stays 1,
  the value inference uses (``on_train_epoch``). DY-Conv's per-expert biases are not built (the
  CIFAR ResNet's convolutions have none).

Network. ``condconv_resnet20`` / ``condconv_resnet56``: the CIFAR ResNet of
:mod:`fractalbench.baselines.resnet` with both 3x3 convolutions of every residual block replaced by
CondConv layers (18 / 54 layers); the stem convolution and the classifier stay dense, the batch
norms and option-A shortcuts are the ResNet's. K = 4 experts by default (the official
EfficientNet-CondConv checkpoints have 4 and 8; the paper's headline uses 8): ``num_experts``.
``widths``: the ResNet's stage widths (16, 32, 64; narrower for tiny suites, then dense weights of the
same widths load).

Computation (``mode="compact"``). Mixing: ``r [N, K] @ W [K, P]`` (one matrix product, P = out x in
x kh x kw), so K x P multiply-adds per sample and layer. Convolution: the grouped-convolution trick,
one ``F.conv2d`` with ``groups=N`` of the batch reshaped to [1, N*C, H, W] with the N mixed kernels
stacked to [N*out, C, kh, kw]: N x the MACs of one ordinary convolution, each sample convolved with
its own kernel and nothing else.

Decisions (``decision_threshold`` policy t, default 0 = the paper's CondConv): expert k enters
sample n's kernel only when its routing weight is at least t; a sample whose experts all fall below t
has a zero kernel, so its convolution is not run at all (its output is zero). Compact mode mixes
each expert into the samples that keep it only (one ``[n_k, 1] @ [1, P]`` product per expert,
n_k x P MACs) and convolves only the samples with a kernel. No weight is renormalised. Sigmoid and
softmax weights lie in [0, 1], so t in [0, 1] spans everything (t = 0) to nothing (t > every weight).

``mode="mask"`` is the labelled compute-everything variant, the paper's mixture-of-experts form
``sum_k r_k (W_k * x)``: every expert kernel is convolved with every sample (one ordinary
``F.conv2d`` with the K kernels stacked as K x out output channels: K convolutions per sample and
layer), then the K outputs are mixed by the sample's routing weights (a dropped expert weighs 0) with
one batched matrix product ``[N, 1, K] @ [N, K, out H' W']``: K x out x H' x W' multiply-adds per
sample, the mixing moved from the kernels to the outputs. Same logits as compact mode (convolution
is linear in the kernel); K times the convolution MACs.

Cost units (:meth:`CondConvResNet.cost_units`, probes at batch 1, layers numbered 0..L-1 in
network order): ``base`` = a forward in which every CondConv layer runs its router and outputs
zeros (stem, routers, batch norms, head); ``layer{l}_aggregate`` (baseline ``base``) = one expert
kernel weighted into one sample's kernel: P_l MACs; ``layer{l}_conv`` (baseline ``base``) = one
sample convolved with one kernel: P_l x H_out x W_out MACs, the single-kernel cost;
``layer{l}_mix`` (baseline ``base``) = one expert's output weighted into one sample's output:
out_l x H_out x W_out MACs (mask mode only). Trace (compact): ``layer{l}_aggregate`` = the number of
experts sample n keeps (K at t = 0), ``layer{l}_conv`` = 1 if it keeps any, else 0,
``layer{l}_mix`` = 0; mask mode: 0, K and K. Per sample at t = 0 the executed MACs are
``base + sum_l (K P_l + P_l H_l W_l)``. ``experts``: [N, L, K], k where expert k entered sample n's
kernel in layer l, -1 where it was dropped; ``extras["routing_weights"]``: [N, L, K].
Cost roles: every layer's router is ``routers``, the classifier (``head``) the exit head; the
mixing and the convolutions are backbone.

Dynamic kind: ``routed``. What varies per sample are parameters, not the compute graph: at the
paper's setting every sample runs the same ops of the same size. "routed" is the kind whose
machinery fits: the router decides per sample (the learned router is the model's operating point),
the trace carries expert assignments (expert histograms work), ``decision_threshold`` budgets are
the pruning above (the only per-sample cost knob: a suite's budgets then compare how much mixing and
which convolutions a threshold saves), and mode="mask" is the K-convolution form. "gated" would need
gate bits, "static" would hide the routing and reject the budgets, "early_exit" has no exits here.
One exit: forward(), forward_exits()[0] and forced_forward(x, 0) are all the routed network at t = 0.

Trained weights (sparse upcycling, Komatsuzaki et al., ICLR 2023). ``dense_backbone()`` is a plain
:class:`~fractalbench.baselines.resnet.CifarResNet` kept outside the module tree (not a registered
submodule: ``state_dict()`` holds no parameter twice) whose stem, batch norms, shortcuts and
classifier ARE this model's modules; only its block convolutions are its own. A ResNet checkpoint
loads into it (:mod:`fractalbench.harness.weights`) and :meth:`CondConvResNet.on_backbone_loaded`
turns each dense kernel W into the experts so that the model starts as exactly the dense network:

- ``"dyconv"``: every expert := W (sparse upcycling copies the dense weights into every expert); the
  softmax weights sum to 1, so the mixed kernel is W for any routing and the router keeps its
  random initialisation, which breaks the experts' symmetry.
- ``"condconv"``: with sigmoid routing a copy would give ``(sum_k r_k(x)) W``, a different network
  for every input. So the router's layer is zeroed (r_k = sigmoid(0) = 1/2 for every input) and
  expert k := ``(2 / K) W + n_k`` with ``n_k`` zero-mean over the experts (``upcycle_noise`` x std(W)
  x (z_k - mean_k z), z normal): the mixed kernel is ``sum_k (1/2)(2W/K + n_k) = W`` (up to float
  rounding). Identical experts under identical weights would get identical gradients forever; the
  n_k make ``dL/dr_k = <dL/dW_mixed, W_k>`` differ between experts, so the routing and then the
  experts diverge as training goes on.

Parameters: every expert of every layer, so ``params`` is K times the block convolutions plus the
routers plus the rest. ``active_parameters()`` (``params_active``: the parameters one sample uses):
all of them, because at the model's own routing (t = 0) every expert is read and weighted into every
sample's kernel (no expert is skipped, unlike a top-k mixture of experts); it says that CondConv
saves MACs, not parameter traffic. :meth:`CondConvResNet.mixed_network_parameters` is the size of
the network one sample is then convolved with (each layer counted at its mixed kernel's P_l).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.baselines.resnet import BasicBlock, CifarResNet
from fractalbench.harness.contract import (
    CostUnit,
    DynamicModel,
    DynamicOutput,
    ExtraRow,
    ModelExtras,
    Trace,
    check_exit_index,
    check_mode,
)
from fractalbench.harness.policies import decision_threshold
from fractalbench.harness.registry import ModelCard, register_model

ROUTERS = ("condconv", "dyconv")
PROBES = ("router", "aggregate", "conv", "mix")
"""What a CondConv layer runs in a cost probe: its router only (output zeros), the router and one
expert weighted into one sample's kernel (output zeros), or the router and one convolution with one
kernel."""
CONDCONV = "Yang et al., CondConv: Conditionally Parameterized Convolutions for Efficient Inference, NeurIPS 2019"
DYCONV = "Chen et al., Dynamic Convolution: Attention over Convolution Kernels, CVPR 2020"


# ----- routers ---------------------------------------------------------------------------------------

class CondConvRouter(nn.Module):
    """CondConv's routing function: ``sigmoid(GAP(x) R + b)`` -> [N, K], each weight in (0, 1)."""

    def __init__(self, in_channels: int, num_experts: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_experts)
        nn.init.xavier_uniform_(self.fc.weight)  # tf.layers.Dense's default (Glorot uniform, zero bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc(x.mean((2, 3))))

    def make_constant(self) -> float:
        """Zero the layer, so every input gets routing weight sigmoid(0) = 1/2 for every expert; returns 1/2."""
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        return 0.5


class DyConvRouter(nn.Module):
    """DY-Conv's kernel attention: ``softmax(FC2(ReLU(FC1(GAP(x)))) / temperature)`` -> [N, K], summing to 1."""

    def __init__(self, in_channels: int, num_experts: int, reduction: int = 4) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"the DY-Conv router's reduction must be a positive integer, got {reduction}")
        hidden = max(1, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.fc2(F.relu(self.fc1(x.mean((2, 3))))) / self.temperature, dim=-1)


# ----- the layer -------------------------------------------------------------------------------------

def per_sample_conv(x: Tensor, kernels: Tensor, stride: int, padding: int) -> Tensor:
    """Sample n of ``x`` [N, C, H, W] convolved with ``kernels[n]`` [out, C, kh, kw] (``kernels``:
    [N, out, C, kh, kw]): one grouped convolution (groups = N) of the batch as [1, N*C, H, W] with the
    kernels as [N*out, C, kh, kw]; its MACs are N x those of one ordinary convolution."""
    n, c, h, w = x.shape
    out_channels = kernels.shape[1]
    y = F.conv2d(x.reshape(1, n * c, h, w), kernels.reshape(n * out_channels, *kernels.shape[2:]), None, stride,
                 padding, groups=n)
    return y.reshape(n, out_channels, y.shape[-2], y.shape[-1])


class CondConv2d(nn.Module):
    """A convolution whose kernel is mixed per sample from ``num_experts`` experts (module docstring).

    ``forward(x, threshold, mode, probe)`` returns the output, the routing weights [N, K] and which
    experts entered each sample's kernel [N, K] (bool)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, *,
                 num_experts: int = 4, router: str = "condconv", reduction: int = 4) -> None:
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router {router!r} is not one of {', '.join(ROUTERS)}")
        if not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(f"num_experts must be an integer >= 2, got {num_experts!r} (one expert is a dense "
                             "convolution scaled by its routing weight, not a mixture)")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.num_experts = stride, padding, num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, kernel_size, kernel_size))
        for k in range(num_experts):  # each expert as the dense layer would be (fan-in of one kernel)
            nn.init.kaiming_normal_(self.weight[k])
        self.router = (CondConvRouter(in_channels, num_experts) if router == "condconv"
                       else DyConvRouter(in_channels, num_experts, reduction))

    @classmethod
    def like(cls, conv: nn.Conv2d, **options: Any) -> CondConv2d:
        """A CondConv layer with the shape, stride and padding of the bias-free square ``conv``."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                   **options)

    @property
    def kernel_numel(self) -> int:
        """P = out x in x kh x kw: one kernel's parameters (and the MACs of mixing one expert into it)."""
        return self.out_channels * self.in_channels * self.kernel_size ** 2

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return ((h + 2 * self.padding - self.kernel_size) // self.stride + 1,
                (w + 2 * self.padding - self.kernel_size) // self.stride + 1)

    def forward(self, x: Tensor, threshold: float = 0.0, mode: str = "compact", probe: str | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        r = self.router(x)
        kept = r >= threshold
        if probe is not None:
            return self._probe(x, r, probe), r, kept
        if mode == "mask":
            return self._everything(x, r, kept), r, kept
        return self._compact(x, r, kept, every_expert=threshold <= 0.0), r, kept

    def _zeros(self, x: Tensor, n: int) -> Tensor:
        return x.new_zeros(n, self.out_channels, *self.output_size(x.shape[-2], x.shape[-1]))

    def _compact(self, x: Tensor, r: Tensor, kept: Tensor, every_expert: bool) -> Tensor:
        n, experts = x.shape[0], self.weight.flatten(1)  # [K, P]
        shape = self.weight.shape[1:]
        if every_expert:  # t <= 0: weights are >= 0, every expert enters every kernel (no host sync)
            return per_sample_conv(x, (r @ experts).view(n, *shape), self.stride, self.padding)
        mixed = None
        for k in range(self.num_experts):
            rows = kept[:, k].nonzero().flatten()
            if rows.numel():
                part = r[rows, k:k + 1] @ experts[k:k + 1]  # n_k x P MACs
                mixed = (part.new_zeros(n, experts.shape[1]) if mixed is None else mixed).index_add(0, rows, part)
        active = kept.any(1).nonzero().flatten()
        if mixed is None:  # no sample kept any expert: every kernel is zero, no convolution runs
            return self._zeros(x, n)
        y = per_sample_conv(x[active], mixed[active].view(-1, *shape), self.stride, self.padding)
        return y.new_zeros(n, *y.shape[1:]).index_copy(0, active, y)

    def _everything(self, x: Tensor, r: Tensor, kept: Tensor) -> Tensor:
        n, k = r.shape
        kernels = self.weight.flatten(0, 1)  # [K*out, C, kh, kw]: every expert, the same for every sample
        y = F.conv2d(x, kernels, None, self.stride, self.padding)  # [N, K*out, H', W']: K convolutions a sample
        mixed = torch.bmm((r * kept).unsqueeze(1), y.reshape(n, k, -1))  # [N, 1, out H' W']: K x out H' W' MACs
        return mixed.view(n, self.out_channels, *y.shape[-2:])

    def _probe(self, x: Tensor, r: Tensor, what: str) -> Tensor:
        if what not in PROBES:
            raise ValueError(f"probe {what!r} is not one of {', '.join(PROBES)}")
        n = x.shape[0]
        if what == "aggregate":
            r[:, :1] @ self.weight.flatten(1)[:1]  # one expert into each sample's kernel: P MACs a sample
        if what == "conv":
            return per_sample_conv(x, self.weight[:1].expand(n, *self.weight.shape[1:]), self.stride, self.padding)
        zeros = self._zeros(x, n)
        if what == "mix":  # one expert's output into each sample's output: out H' W' MACs a sample
            torch.bmm(r[:, None, :1], zeros.reshape(n, 1, -1))
        return zeros

    @torch.no_grad()
    def upcycle(self, dense_weight: Tensor, noise: float) -> None:
        """Experts from a dense kernel W [out, in, kh, kw] so that the mixed kernel is W for every input
        (module docstring: copies for the softmax router; router zeroed and 2W/K plus zero-sum noise for the
        sigmoid router)."""
        if tuple(dense_weight.shape) != tuple(self.weight.shape[1:]):
            raise ValueError(f"dense kernel of shape {list(dense_weight.shape)} does not fit experts of shape "
                             f"{list(self.weight.shape[1:])}")
        w = dense_weight.to(self.weight)
        if isinstance(self.router, DyConvRouter):
            self.weight.copy_(w.expand_as(self.weight))
            return
        weight = self.router.make_constant()
        z = torch.randn_like(self.weight)
        z -= z.mean(0, keepdim=True)
        self.weight.copy_(w / (weight * self.num_experts) + noise * w.std() * z)


# ----- the network -----------------------------------------------------------------------------------

class CondConvBlock(nn.Module):
    """A ResNet basic block whose two 3x3 convolutions are CondConv layers; its batch norms and
    shortcut are the dense block's modules. ``call(conv, x)`` runs one CondConv layer."""

    def __init__(self, dense: BasicBlock, **options: Any) -> None:
        super().__init__()
        self.conv1 = CondConv2d.like(dense.conv1, **options)
        self.bn1 = dense.bn1
        self.conv2 = CondConv2d.like(dense.conv2, **options)
        self.bn2 = dense.bn2
        self.shortcut = dense.shortcut

    def forward(self, x: Tensor, call: Callable[[CondConv2d, Tensor], Tensor]) -> Tensor:
        out = F.relu(self.bn1(call(self.conv1, x)))
        out = self.bn2(call(self.conv2, out))
        return F.relu(out + self.shortcut(x))


class CondConvResNet(DynamicModel):
    """CIFAR ResNet-(6n+2) with CondConv layers in its residual blocks (module docstring)."""

    dynamic_kind = "routed"
    num_exits = 1
    ddp_find_unused_parameters = False  # every expert and router gets a gradient in every training step
    mask_replaces = {"layer*_aggregate": "layer*_mix"}  # mask mode mixes the K outputs, not the kernels

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, *, num_experts: int = 4,
                 router: str = "condconv", reduction: int = 4, upcycle_noise: float = 0.01,
                 temperature_start: float = 30.0, temperature_epochs: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if upcycle_noise < 0:
            raise ValueError(f"upcycle_noise must be >= 0, got {upcycle_noise}")
        if temperature_start < 1 or temperature_epochs < 1:
            raise ValueError(f"temperature_start must be >= 1 and temperature_epochs >= 1, got {temperature_start} "
                             f"and {temperature_epochs}")
        dense = CifarResNet(depth, num_classes, in_chans, tuple(widths))
        options = {"num_experts": num_experts, "router": router, "reduction": reduction}
        self.stem = dense.stem
        self.layer1, self.layer2, self.layer3 = (nn.ModuleList(CondConvBlock(b, **options) for b in stage)
                                                 for stage in (dense.layer1, dense.layer2, dense.layer3))
        self.head = dense.head
        object.__setattr__(self, "_dense", dense)  # not a submodule: its shared modules are ours, its convs only its
        self.depth, self.num_experts, self.router_type = depth, num_experts, router
        self.upcycle_noise = upcycle_noise
        self.temperature_start, self.temperature_epochs = temperature_start, temperature_epochs
        self.cost_roles = {"heads": ("head",), "routers": ("layer*.conv*.router",)}

    # ----- structure ----------------------------------------------------------------------------

    def blocks(self) -> list[CondConvBlock]:
        return [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage]

    def conv_layers(self) -> list[CondConv2d]:
        """The CondConv layers in network order (layer index l of the cost units and traces)."""
        return [conv for b in self.blocks() for conv in (b.conv1, b.conv2)]

    @property
    def num_layers(self) -> int:
        return 2 * len(self.blocks())

    # ----- trained weights ----------------------------------------------------------------------

    def dense_backbone(self) -> CifarResNet:
        """The dense ResNet a checkpoint loads into: this model's stem, batch norms, shortcuts and head,
        and dense block convolutions of its own (not part of this model's state)."""
        return self._dense

    def on_backbone_loaded(self) -> None:
        """Every CondConv layer's experts from its dense kernel (sparse upcycling; module docstring)."""
        dense_convs = [conv for stage in (self._dense.layer1, self._dense.layer2, self._dense.layer3)
                       for block in stage for conv in (block.conv1, block.conv2)]
        for layer, dense in zip(self.conv_layers(), dense_convs, strict=True):
            layer.upcycle(dense.weight, self.upcycle_noise)

    # ----- forward passes -----------------------------------------------------------------------

    def _run(self, x: Tensor, threshold: float = 0.0, mode: str = "compact", probe: tuple[int, str] | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, routing weights [N, L, K] and kept experts [N, L, K]. ``probe`` (layer, what): layer
        ``layer`` runs probe ``what``, every other layer its router only (layer -1: none)."""
        weights: list[Tensor] = []
        kept: list[Tensor] = []

        def call(conv: CondConv2d, h: Tensor) -> Tensor:
            index = len(weights)
            what = None if probe is None else (probe[1] if probe[0] == index else "router")
            out, r, k = conv(h, threshold, mode, what)
            weights.append(r)
            kept.append(k)
            return out

        h = self.stem(x)
        for block in self.blocks():
            h = block(h, call)
        return self.head(h), torch.stack(weights, 1), torch.stack(kept, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x)[0]

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.forward(x)]

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:
        """The only exit: the routed network, every expert in every kernel (threshold 0)."""
        check_exit_index(self, exit_index)
        return self.forward(x)

    def dynamic_forward(self, x: Tensor, policy: Any = None, mode: str = "compact") -> DynamicOutput:
        """Logits and trace. ``policy``: None (the paper's CondConv: every expert enters every kernel)
        or a ``decision_threshold`` t: an expert enters a sample's kernel when its weight is >= t."""
        threshold = decision_threshold(policy, 0.0)
        logits, weights, kept = self._run(x, threshold, check_mode(mode))
        return DynamicOutput(logits, self._trace(weights, kept, mode))

    def _trace(self, weights: Tensor, kept: Tensor, mode: str) -> Trace:
        n, layers, k = kept.shape
        device = kept.device
        counts = {"base": torch.ones(n, device=device)}
        for layer in range(layers):
            if mode == "mask":  # K convolutions, their outputs mixed; no kernel is mixed
                counts[f"layer{layer}_aggregate"] = torch.zeros(n, device=device)
                counts[f"layer{layer}_conv"] = torch.full((n,), float(k), device=device)
                counts[f"layer{layer}_mix"] = torch.full((n,), float(k), device=device)
            else:
                counts[f"layer{layer}_aggregate"] = kept[:, layer].sum(1).float()
                counts[f"layer{layer}_conv"] = kept[:, layer].any(1).float()
                counts[f"layer{layer}_mix"] = torch.zeros(n, device=device)
        experts = torch.where(kept, torch.arange(k, device=device), torch.full_like(kept, -1, dtype=torch.long))
        return Trace(torch.zeros(n, dtype=torch.long, device=device), counts, experts=experts,
                     extras={"routing_weights": weights.detach()})

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``cross_entropy`` only (neither paper adds a routing loss)."""
        return {"cross_entropy": F.cross_entropy(self.forward(x), y)}

    def on_train_epoch(self, epoch: int, epochs: int) -> None:
        """DY-Conv's temperature for this epoch (module docstring); nothing for the sigmoid router."""
        span = min(self.temperature_epochs, epochs)
        progress = 1.0 if span <= 1 else min(1.0, epoch / (span - 1))
        temperature = self.temperature_start + (1.0 - self.temperature_start) * progress
        for layer in self.conv_layers():
            if isinstance(layer.router, DyConvRouter):
                layer.router.temperature.fill_(temperature)

    # ----- cost and parameters ------------------------------------------------------------------

    def cost_units(self) -> list[CostUnit]:
        units = [CostUnit("base", lambda x: self._run(x, probe=(-1, "router")))]
        for layer in range(self.num_layers):
            for what in ("aggregate", "conv", "mix"):
                units.append(CostUnit(f"layer{layer}_{what}",
                                      lambda x, layer=layer, what=what: self._run(x, probe=(layer, what)),
                                      baseline="base"))
        return units

    def active_parameters(self) -> int:
        """Every parameter: at the model's own routing every expert is weighted into every sample's
        kernel (module docstring)."""
        return sum(p.numel() for p in self.parameters())

    def mixed_network_parameters(self) -> int:
        """Parameters of the network one sample is convolved with: every CondConv layer at its mixed
        kernel's size P_l (not K P_l), plus the routers and every other parameter."""
        total = sum(p.numel() for p in self.parameters())
        return total - sum((layer.num_experts - 1) * layer.kernel_numel for layer in self.conv_layers())

    # ----- results ------------------------------------------------------------------------------

    def extra_results(self, x: Tensor) -> ModelExtras:
        """Routing weights on ``x`` at the model's own routing: per layer and expert a ``routing_weight``
        row, the expert's share of the layer's routing weight (sum over images of r_k / sum over images
        and experts; 1/K each when routing is uniform), with the mean weight and its percentiles over
        the images in ``detail``; the weights [N, L, K] as artifact ``routing_weights``."""
        weights = self._run(x)[1].detach().float().cpu()
        n = weights.shape[0]
        rows = []
        for layer in range(weights.shape[1]):
            mass = weights[:, layer].sum(0)
            total = float(mass.sum())
            for e in range(weights.shape[2]):
                column = weights[:, layer, e]
                p10, p50, p90 = torch.quantile(column, torch.tensor([0.1, 0.5, 0.9])).tolist()
                detail = {"layer": layer, "expert": e, "mean_weight": float(column.mean()), "p10": p10, "p50": p50,
                          "p90": p90, "min": float(column.min()), "max": float(column.max()),
                          "router": self.router_type,
                          "definition": "share of the layer's routing weight over the images (sum_n r_nk / "
                                        "sum_n sum_j r_nj); every expert enters every image's kernel, weighted"}
                rows.append(ExtraRow("routing_weight", float(mass[e]) / total if total else 0.0, "fraction",
                                     {"n": n, "detail": detail}))
        return ModelExtras(rows, {"routing_weights": weights.numpy()})


# ----- registration ----------------------------------------------------------------------------------

#: Published numbers (ImageNet, 224x224; the paper has no CIFAR experiments). From the official
#: EfficientNet-CondConv README (tensorflow/tpu models/official/efficientnet/condconv/README.md,
#: "Using pretrained EfficientNet-CondConv checkpoints" table); the 8-expert row is also the abstract's.
CONDCONV_REFERENCE = {
    "imagenet_top1_efficientnet_b0": 77.3, "imagenet_madds_efficientnet_b0": 391e6,
    "imagenet_params_efficientnet_b0": 5.3e6,
    "imagenet_top1_efficientnet_condconv_b0_4experts": 77.8, "imagenet_madds_efficientnet_condconv_b0_4experts": 402e6,
    "imagenet_params_efficientnet_condconv_b0_4experts": 13.3e6,
    "imagenet_top1_efficientnet_condconv_b0_8experts": 78.3, "imagenet_madds_efficientnet_condconv_b0_8experts": 413e6,
    "imagenet_params_efficientnet_condconv_b0_8experts": 24.0e6,
}
CONDCONV_SOURCE = (
    "no published CIFAR number (the paper's experiments are ImageNet and COCO). imagenet_*: top-1 %, multiply-adds "
    "and parameters of EfficientNet-B0 and EfficientNet-CondConv-B0 with 4 and 8 experts at 224x224, as printed in "
    "the official README's checkpoint table (tensorflow/tpu, models/official/efficientnet/condconv/README.md); the "
    "8-expert numbers (78.3 %, 413M multiply-adds) are also the paper's abstract. The paper's Table 1 (ImageNet "
    "baselines with CondConv: MobileNetV1/V2, MnasNet-A1, ResNet-50, EfficientNet-B0) could not be read here and "
    "is not quoted")
CONDCONV_RECIPE = (
    "none for CIFAR: the paper trains ImageNet models with their own TPU recipes (EfficientNet-CondConv: the "
    "EfficientNet recipe, official code); a suite states its own")


def _card(depth: int) -> ModelCard:
    layers = 2 * 3 * ((depth - 2) // 6)
    return ModelCard(
        family="dynamic_conv", paper=CONDCONV, dynamic_kind="routed", input_size=32,
        reference=dict(CONDCONV_REFERENCE), reference_source=CONDCONV_SOURCE, paper_recipe=CONDCONV_RECIPE,
        notes=(f"ResNet-{depth} (option-A shortcuts) with its {layers} residual-block 3x3 convolutions as CondConv "
               "layers, K=4 experts (num_experts), stem and classifier dense; per-layer sigmoid router GAP -> FC -> "
               "sigmoid (the official EfficientNet-CondConv shares one router per block); router='dyconv' gives "
               f"DY-Conv's softmax attention with temperature 30 -> 1 ({DYCONV}). Per-sample kernels by one grouped "
               "convolution (groups = batch); mode='mask' = K convolutions per sample. Dense ResNet weights load by "
               "sparse upcycling that keeps the dense function exactly (router zeroed, experts 2W/K + zero-sum "
               "noise). decision_threshold t drops experts whose weight is < t (not in the paper)."))


@register_model(card=_card(20))
def condconv_resnet20(*, num_classes: int = 10, in_chans: int = 3, num_experts: int = 4, router: str = "condconv",
                      reduction: int = 4, upcycle_noise: float = 0.01, temperature_start: float = 30.0,
                      temperature_epochs: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> CondConvResNet:
    """CondConv ResNet-20 (18 CondConv layers)."""
    return CondConvResNet(20, num_classes, in_chans, num_experts=num_experts, router=router, reduction=reduction,
                          upcycle_noise=upcycle_noise, temperature_start=temperature_start,
                          temperature_epochs=temperature_epochs, widths=widths)


@register_model(card=_card(56))
def condconv_resnet56(*, num_classes: int = 10, in_chans: int = 3, num_experts: int = 4, router: str = "condconv",
                      reduction: int = 4, upcycle_noise: float = 0.01, temperature_start: float = 30.0,
                      temperature_epochs: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> CondConvResNet:
    """CondConv ResNet-56 (54 CondConv layers)."""
    return CondConvResNet(56, num_classes, in_chans, num_experts=num_experts, router=router, reduction=reduction,
                          upcycle_noise=upcycle_noise, temperature_start=temperature_start,
                          temperature_epochs=temperature_epochs, widths=widths)
