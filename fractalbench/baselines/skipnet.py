"""SkipNet (Wang et al., "SkipNet: Learning Dynamic Routing in Convolutional Networks", ECCV 2018).

A CIFAR ResNet-(6n+2) (SkipNet's CIFAR depths: 38, 74, 110, i.e. n = 6, 12, 18) with a gate before
each residual block that decides, per sample, whether the block runs:
``x' = g * block(x) + (1 - g) * x`` with ``g`` in {0, 1} at inference (``g = p > 0.5``, p the
gate's sigmoid output).

Which blocks are gated (``gating``):

- ``"official"`` (default, as the authors' CIFAR code builds it): every residual block but the first
  of stage 1 has a gate, so there are ``G = 3n - 1`` gates (17, 35, 53; the authors' code makes 3n
  gate modules and drops the last one's decision). A skipped block passes its input through its
  shortcut: the identity, or for the first block of stages 2 and 3 (stride 2, 16->32->64 channels)
  the parameter-free option-A shortcut of :mod:`fractalbench.baselines.resnet` (subsample, zero-pad channels).
  The authors use a 1x1-conv projection there; this build keeps the backbone's option-A shortcuts,
  so the network equals :mod:`fractalbench.baselines.resnet`'s ResNet with every gate open.
- ``"no_downsampling"`` (this build's earlier choice): the first block of every stage is ungated,
  ``G = 3 (n - 1)`` gates (15, 33, 51), so about 15 % of the full network's MACs always run.

Gates (``gate_type``), each reading the block's input feature map ``x``:

- ``"rnn"`` (default, the paper's recurrent gate): a per-block projection to a small embedding
  (global average pool + linear C->``embed_dim``, the official 1x1 conv after pooling), one LSTM
  cell shared by all gates (hidden ``hidden_dim`` = 10; its state runs from the first gate to the
  last within one forward) and a shared linear hidden->1 + sigmoid. The LSTM cell is written with
  an explicit ``nn.Linear`` on ``[embedding, h]`` (one bias instead of nn.LSTM's two) so that
  ``FlopCounterMode`` counts it.
- ``"ffgate1"``: FFGate-I, max-pool 2 (ceil mode), 3x3 conv stride 1, BN, ReLU, 3x3 conv stride 2,
  BN, ReLU, global average pool, linear C->1 + sigmoid (one block's own gate).
- ``"ffgate2"``: FFGate-II, 3x3 conv stride 2, BN, ReLU, global average pool, linear C->1.
  (The official code ends the feed-forward gates in a 2-way softmax; one logit + sigmoid is the
  same family.)

Every gate runs on every sample (its cost is part of unit ``base``); a closed gate means the block
does not run for that sample: ``mode="compact"`` gathers the samples whose gate is open, runs the
block on them only and scatters the result back (at batch 1 a closed block is not called at all);
``mode="mask"`` is the labelled variant that runs every block on every sample and selects.

Exits and cost. There is one exit. ``forward(x)`` is the dynamic (compact) forward: gates decide.
``forward_exits(x)`` / ``forced_forward(x, 0)`` are the full network: every gate evaluated and every
block run (all gates forced open), so the per-exit cost row is the upper bound (full ResNet plus
gates) and is independent of the sample; the gated cost and accuracy are the dynamic rows.
Cost units: ``base`` = stem, ungated blocks, all gates and the head (a forward with every gate
forced closed), counted once per sample; ``block_i`` = gated block i (gate index, 0..G-1, in network
order; ``model.gated_block_names`` maps it to ``layerS.B``), counted when sample n's gate i is open.
Cost roles: the gate modules (``gate``: projections, LSTM cell, output layer, or the feed-forward
gates) are gates, the classifier (``backbone.head``) is the exit head, the rest is backbone.

Initialisation: the backbone's (Kaiming normal, as in the official code), except that with
``zero_init_residual=True`` (default) the last BN scale of every gated block starts at 0 (Goyal et
al. 2017; timm's ``zero_init_last``): each gated block starts as the identity, which skipping leaves
unchanged, and an untrained model in eval mode keeps bounded activations (with scale 1 and default
running statistics, eval-mode logits of a random ResNet-38 reach ~1e5, where float32 rounding that
depends on the batch size breaks batch-1 vs batched comparisons). The ungated downsampling blocks
keep scale 1: their zero-padded channels would get no gradient at 0. ``False``: the paper's init.

Training (``loss_terms``), stage chosen by ``model.training_stage``:

- ``"supervised"`` (stage 1, SkipNet+SP): hard gates forward, the sigmoid's gradient backward
  (straight-through); every block is computed and mixed by the gate. Terms: ``cross_entropy``.
- ``"hybrid_rl"`` (stage 2, SkipNet+HRL+SP, started from a stage-1 model): in training mode the
  gates sample ``a ~ Bernoulli(p)`` (deterministic ``p > 0.5`` in eval mode). Gate i of sample n
  gets reward ``(1 - a_i) * alpha / G`` for skipping; the return of gate i is
  ``R_i = -CE_n + sum_{j >= i} (1 - a_j) alpha / G`` (discount 1, the official code's
  ``gamma``); REINFORCE term ``-rl_weight * mean_n sum_i R_i log pi(a_i)``. Terms:
  ``cross_entropy`` (supervised, through the blocks) and ``reinforce``. ``alpha`` sets the
  accuracy/compute trade-off (larger = more skipping; official default 0.1). The official code
  sums the policy gradient over a batch with ``rl_weight`` 0.01 while the CE is a batch mean; here
  both are batch means, so ``rl_weight`` = 0.01 x batch size reproduces it (1.28 at batch 128).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.baselines.resnet import CifarResNet, run_block_on_rows
from fractalbench.harness.contract import CostUnit, DynamicModel, DynamicOutput, Trace, check_exit_index, check_mode
from fractalbench.harness.policies import decision_threshold
from fractalbench.harness.registry import ModelCard, recipe_text, register_model

PAPER = "Wang et al., SkipNet: Learning Dynamic Routing in Convolutional Networks, ECCV 2018"
GATE_TYPES = ("rnn", "ffgate1", "ffgate2")
GATINGS = ("official", "no_downsampling")
OPEN_GATE_BIAS = 2.0  # a gate's output bias after a dense network's weights are loaded (sigmoid(2 - 1) = 0.73)
TRAINING_STAGES = ("supervised", "hybrid_rl")


class LSTMCellLinear(nn.Module):
    """An LSTM cell as one linear map of ``[x, h]`` to the four gates (i, f, g, o), so that its
    multiply-accumulates are visible to FlopCounterMode: (input + hidden) x 4 hidden MACs per step."""

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.linear = nn.Linear(input_dim + hidden_dim, 4 * hidden_dim)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, g, o = self.linear(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class RecurrentGate(nn.Module):
    """SkipNet's recurrent gate: per-block projection (pool + linear to ``embed_dim``), one shared
    LSTM cell and a shared linear hidden->1. ``forward(i, x, state)`` returns gate i's logit [N]."""

    def __init__(self, channels: Sequence[int], embed_dim: int = 10, hidden_dim: int = 10) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.proj = nn.ModuleList(nn.Linear(c, embed_dim) for c in channels)
        self.lstm = LSTMCellLinear(embed_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, 1)

    def init_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        zeros = x.new_zeros(x.shape[0], self.hidden_dim)
        return zeros, zeros

    def forward(self, i: int, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, c = self.lstm(self.proj[i](x.mean(dim=(2, 3))), state)
        return self.out(h).squeeze(1), (h, c)


class FeedForwardGate(nn.Module):
    """FFGate-I (``two_convs=True``: max-pool, conv s1, conv s2) or FFGate-II (one conv s2), then
    global average pooling and a linear C->1 (the gate's logit)."""

    def __init__(self, channels: int, two_convs: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if two_convs:
            layers += [nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(channels, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3))).squeeze(1)


class FeedForwardGates(nn.Module):
    """One feed-forward gate per gated block, with the recurrent gate's calling convention."""

    def __init__(self, channels: Sequence[int], two_convs: bool) -> None:
        super().__init__()
        self.gates = nn.ModuleList(FeedForwardGate(c, two_convs) for c in channels)

    def init_state(self, x: Tensor) -> None:
        return None

    def forward(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self.gates[i](x), state


class SkipNet(DynamicModel):
    """Gated CIFAR ResNet-(6n+2). See the module docstring for gates, cost units and training."""

    dynamic_kind = "gated"
    num_exits = 1
    # MACs by role (fractalbench.harness.contract.cost_roles): the classifier is the exit head, the gates are gates
    cost_roles = {"heads": ("backbone.head",), "gates": ("gate",)}

    def __init__(self, depth: int = 38, num_classes: int = 10, in_chans: int = 3, *, gate_type: str = "rnn",
                 alpha: float = 0.1, rl_weight: float = 1.0, training_stage: str = "supervised",
                 embed_dim: int = 10, hidden_dim: int = 10, zero_init_residual: bool = True,
                 gating: str = "official") -> None:
        super().__init__()
        if gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type {gate_type!r} is not one of {', '.join(GATE_TYPES)}")
        if gating not in GATINGS:
            raise ValueError(f"gating {gating!r} is not one of {', '.join(GATINGS)}")
        self.backbone = CifarResNet(depth, num_classes, in_chans)
        self.depth, self.gate_type, self.gating = depth, gate_type, gating
        self.alpha, self.rl_weight = float(alpha), float(rl_weight)
        self.training_stage = training_stage
        stages = [self.backbone.layer1, self.backbone.layer2, self.backbone.layer3]
        # (block, gate index or None) in network order (see the module docstring for which are gated)
        self._plan: list[tuple[nn.Module, int | None]] = []
        names, channels = [], []
        for s, stage in enumerate(stages):
            for b, block in enumerate(stage):
                if (s == 0 and b == 0) if gating == "official" else b == 0:
                    self._plan.append((block, None))
                else:
                    self._plan.append((block, len(names)))
                    names.append(f"layer{s + 1}.{b}")
                    channels.append(block.conv1.in_channels)
        self.gated_block_names: tuple[str, ...] = tuple(names)
        if zero_init_residual:  # gated identity-shortcut blocks start as the identity (see the docstring)
            for block in self.gated_blocks():
                if isinstance(block.shortcut, nn.Identity):
                    nn.init.zeros_(block.bn2.weight)
        if gate_type == "rnn":
            self.gate: nn.Module = RecurrentGate(channels, embed_dim, hidden_dim)
        else:
            self.gate = FeedForwardGates(channels, two_convs=gate_type == "ffgate1")

    def dense_backbone(self) -> CifarResNet:
        """The gated ResNet itself (a ResNet checkpoint loads into it)."""
        return self.backbone

    def on_backbone_loaded(self) -> None:
        """Start from the dense network that was loaded: every gate's output bias is set to
        :data:`OPEN_GATE_BIAS`, so every gate opens (p >= 0.88 whatever the gate's hidden state) and the
        model computes the trained ResNet; training then learns which blocks to skip. (From random gates
        about half the blocks of the trained network would be skipped at the start, which breaks it.)"""
        outputs = [self.gate.out] if isinstance(self.gate, RecurrentGate) else [g.fc for g in self.gate.gates]
        for layer in outputs:
            nn.init.constant_(layer.bias, OPEN_GATE_BIAS)

    # ----- configuration ----------------------------------------------------------------------

    @property
    def num_gates(self) -> int:
        return len(self.gated_block_names)

    @property
    def training_stage(self) -> str:
        """``"supervised"`` (stage 1) or ``"hybrid_rl"`` (stage 2); selects ``loss_terms``."""
        return self._training_stage

    @training_stage.setter
    def training_stage(self, stage: str) -> None:
        if stage not in TRAINING_STAGES:
            raise ValueError(f"training_stage {stage!r} is not one of {', '.join(TRAINING_STAGES)}")
        self._training_stage = stage

    def gated_blocks(self) -> list[nn.Module]:
        """The gated blocks, gate index order."""
        return [block for block, g in self._plan if g is not None]

    def _forced(self, forced_gates: Any, n: int, device: torch.device) -> Tensor | None:
        if forced_gates is None:
            return None
        bits = torch.as_tensor(forced_gates, dtype=torch.bool, device=device)
        if bits.dim() == 1:
            bits = bits.expand(n, -1)
        if bits.shape != (n, self.num_gates):
            raise ValueError(f"forced_gates needs {self.num_gates} bits (or [N, {self.num_gates}]), "
                             f"got shape {tuple(bits.shape)}")
        return bits

    # ----- inference --------------------------------------------------------------------------

    def _infer(self, x: Tensor, mode: str = "compact", forced_gates: Any = None, threshold: float = 0.5
               ) -> DynamicOutput:
        n = x.shape[0]
        forced = self._forced(forced_gates, n, x.device)
        h = self.backbone.stem(x)
        state = self.gate.init_state(h)
        bits, probs = [], []
        for block, g in self._plan:
            if g is None:
                h = block(h)
                continue
            logit, state = self.gate(g, h, state)
            p = torch.sigmoid(logit)
            on = p > threshold if forced is None else forced[:, g]
            bits.append(on)
            probs.append(p)
            h = run_block_on_rows(block, h, on, mode)
        logits = self.backbone.head(h)
        gates = torch.stack(bits, 1) if bits else torch.zeros(n, 0, dtype=torch.bool, device=x.device)
        counts = {"base": torch.ones(n, device=x.device)}
        for g in range(self.num_gates):
            counts[f"block_{g}"] = torch.ones(n, device=x.device) if mode == "mask" else gates[:, g].float()
        extras = {"gate_probs": torch.stack(probs, 1).detach() if probs else x.new_zeros(n, 0)}
        trace = Trace(torch.zeros(n, dtype=torch.long, device=x.device), counts, gates=gates, extras=extras)
        return DynamicOutput(logits, trace)

    def forward(self, x: Tensor) -> Tensor:
        """Dynamic (compact) logits: the gates decide which blocks run."""
        return self._infer(x).logits

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        """The single exit's forced path: the full network (every gate evaluated, every block run)."""
        return [self.forced_forward(x, 0)]

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:
        check_exit_index(self, exit_index)
        return self._infer(x, forced_gates=[True] * self.num_gates).logits

    def dynamic_forward(self, x: Tensor, policy: Any = None, mode: str = "compact", *,
                        forced_gates: Any = None) -> DynamicOutput:
        """Logits and trace; the learned gates decide. ``policy``: None (a block runs when its gate
        probability is > 0.5) or a ``decision_threshold`` t (> t instead). ``forced_gates`` (G bools,
        or a BoolTensor [N, G]) overrides the decisions; the gates still run."""
        return self._infer(x, check_mode(mode), forced_gates, decision_threshold(policy, 0.5))

    # ----- training ---------------------------------------------------------------------------

    def _train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, gate logits [N, G] and gate actions [N, G] (0/1 floats); every block runs and
        is mixed by its gate (straight-through in stage 1, sampled actions in stage 2)."""
        h = self.backbone.stem(x)
        state = self.gate.init_state(h)
        gate_logits, actions = [], []
        sample = self.training_stage == "hybrid_rl" and self.training
        for block, g in self._plan:
            if g is None:
                h = block(h)
                continue
            logit, state = self.gate(g, h, state)
            p = torch.sigmoid(logit)
            if self.training_stage == "supervised":
                hard = (p > 0.5).float()
                gate = hard + p - p.detach()  # forward: hard bit; backward: sigmoid's gradient
                action = hard
            else:
                action = torch.bernoulli(p.detach()) if sample else (p > 0.5).float()
                gate = action
            gate4 = gate[:, None, None, None]
            h = gate4 * block(h) + (1 - gate4) * block.shortcut(h)
            gate_logits.append(logit)
            actions.append(action)
        logits = self.backbone.head(h)
        n = x.shape[0]
        stack = lambda ts: torch.stack(ts, 1) if ts else x.new_zeros(n, 0)  # noqa: E731
        return logits, stack(gate_logits), stack(actions)

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``cross_entropy`` (both stages) and, in stage ``hybrid_rl``, ``reinforce``."""
        logits, gate_logits, actions = self._train_forward(x)
        ce = F.cross_entropy(logits, y, reduction="none")
        terms = {"cross_entropy": ce.mean()}
        if self.training_stage == "hybrid_rl":
            terms["reinforce"] = reinforce_loss(gate_logits, actions, ce.detach(), self.alpha, self.rl_weight)
        return terms

    # ----- cost -------------------------------------------------------------------------------

    def cost_units(self) -> list[CostUnit]:
        g = self.num_gates
        units = [CostUnit("base", lambda x: self.dynamic_forward(x, forced_gates=[False] * g))]
        only = lambda i: [j == i for j in range(g)]  # noqa: E731
        units += [CostUnit(f"block_{i}", lambda x, i=i: self.dynamic_forward(x, forced_gates=only(i)), baseline="base")
                  for i in range(g)]
        return units


def reinforce_loss(gate_logits: Tensor, actions: Tensor, ce: Tensor, alpha: float, rl_weight: float = 1.0) -> Tensor:
    """SkipNet's REINFORCE surrogate. gate_logits, actions: [N, G]; ce: per-sample loss [N] (no grad).

    Reward of gate i: ``(1 - a_i) * alpha / G``; return ``R_i = -ce + sum_{j >= i} reward_j``;
    loss ``-rl_weight * mean_n sum_i R_i * log pi(a_i)`` with ``log pi(1) = log sigmoid(logit)``.
    """
    g = gate_logits.shape[1]
    if g == 0:
        return gate_logits.new_zeros(())
    rewards = (1 - actions) * (alpha / g)
    returns = rewards.flip(1).cumsum(1).flip(1) - ce[:, None]
    log_pi = actions * F.logsigmoid(gate_logits) + (1 - actions) * F.logsigmoid(-gate_logits)
    return -rl_weight * (log_pi * returns.detach()).sum(1).mean()


def skip_rates(trace: Trace) -> Tensor:
    """Fraction of samples that skipped each gated block (float [G]), from a trace's gate bits."""
    if trace.gates is None:
        raise ValueError("this trace has no gate bits (not from a gated model)")
    return 1.0 - trace.gates.float().mean(0)


#: ucbdrive/skipnet cifar/train_sp.py (stage 1) and cifar/train_rl.py (stage 2) defaults, in epochs of 50k images.
SKIPNET_RECIPE = {"epochs": 164, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                  "weight_decay": 1e-4, "schedule": "step", "milestones": (82, 123), "gamma": 0.1, "precision": "fp32",
                  "stage2.epochs": 26, "stage2.batch_size": 128, "stage2.optimizer": "sgd", "stage2.lr": 1e-4,
                  "stage2.momentum": 0.9, "stage2.nesterov": False, "stage2.weight_decay": 1e-4,
                  "stage2.schedule": "none", "stage2.precision": "fp32"}
SKIPNET_RECIPE_NOTE = (
    "authors' code: stage 1 (SkipNet+SP, train_sp.py) 64k iterations of batch 128, lr 0.1 /10 at 32k and 48k "
    "(He et al.'s schedule; --warm-up: lr 0.01 for the first 400 iterations, needed for n = 18), plain momentum; "
    "stage 2 (SkipNet+HRL+SP, train_rl.py) from the stage-1 weights, 10k iterations (~26 epochs) at lr 1e-4 "
    "(its steps at 40k/60k are never reached), alpha 0.1, rl_weight 0.01 on the batch-summed policy gradient "
    "(= 1.28 here, where it is a batch mean), discount 1")
#: Released CIFAR-10 HRL checkpoints (recurrent gates): ucbdrive/skipnet cifar/README.md, "expected results".
SKIPNET_RELEASED = {38: (92.750, 29.728), 74: (92.770, 47.660), 110: (93.300, 50.474)}
#: The paper's baseline (ungated) ResNets on CIFAR-100, as quoted in ucbdrive/skipnet issue #8.
SKIPNET_BASELINE_C100 = {38: 68.54, 74: 70.64, 110: 71.21}
SKIPNET_SOURCE = (
    "hrl_*: the authors' released CIFAR-10 SkipNet+HRL+SP checkpoint (recurrent gates), ucbdrive/skipnet "
    "cifar/README.md 'expected results': test top-1 and FLOPs reduced vs the full ResNet (the alpha it was trained "
    "with is not stated). baseline_resnet_top1_cifar100: the paper's ungated ResNet on CIFAR-100 as quoted in "
    "ucbdrive/skipnet issue #8 (not checked against the paper). The paper itself gives CIFAR-10/100 results as "
    "accuracy-vs-FLOPs curves (Fig. 4) and the headline 'reduces computation by 30 - 90% while preserving the "
    "accuracy of the original model' (abstract; hrl_flops_reduction_pct_min is its lower end); "
    "no SkipNet CIFAR-100 number is confirmed here. The HRL "
    "numbers are gated operating points (policy 'alpha' rows in this harness), not the all-gates-open last exit, "
    "so no measured value sits beside them")


def _card(depth: int) -> ModelCard:
    n = (depth - 2) // 6
    reference = {"hrl_flops_reduction_pct_min": 30.0}  # the abstract's "30 - 90%" lower end
    if depth in SKIPNET_RELEASED:
        top1, reduced = SKIPNET_RELEASED[depth]
        reference.update({"hrl_top1_cifar10": top1, "hrl_flops_reduction_pct": reduced,
                          "baseline_resnet_top1_cifar100": SKIPNET_BASELINE_C100[depth]})
    return ModelCard(
        family="skipnet",
        paper=PAPER,
        dynamic_kind="gated",
        input_size=32,
        reference=reference,
        reference_source=SKIPNET_SOURCE,
        paper_recipe=recipe_text(SKIPNET_RECIPE, SKIPNET_RECIPE_NOTE),
        notes=f"ResNet-{depth} (n={n}) with option-A shortcuts; every block but the first gated as in the official "
        f"code ({3 * n - 1} gates; a skipped downsampling block is its option-A shortcut, the official code's is a "
        f"1x1 projection; gating='no_downsampling': {3 * (n - 1)} gates). Recurrent gate by default "
        "(gate_type='ffgate1'/'ffgate2' for the feed-forward gates); LSTM written with explicit Linear ops (one bias). "
        "forward_exits/forced_forward = full network with all gates evaluated; dynamic rows = learned gates.",
    )


def _register(depth: int) -> None:
    """Register ``skipnet<depth>``: SkipNet on ResNet-<depth>, with the builder options of :class:`SkipNet`."""

    def build(*, num_classes: int = 10, in_chans: int = 3, gate_type: str = "rnn", alpha: float = 0.1,
              rl_weight: float = 1.0, training_stage: str = "supervised", zero_init_residual: bool = True,
              gating: str = "official") -> SkipNet:
        return SkipNet(depth, num_classes, in_chans, gate_type=gate_type, alpha=alpha, rl_weight=rl_weight,
                       training_stage=training_stage, zero_init_residual=zero_init_residual, gating=gating)

    build.__name__ = build.__qualname__ = f"skipnet{depth}"
    build.__doc__ = f"SkipNet on ResNet-{depth}" + (
        "" if depth in SKIPNET_RELEASED else " (no released SkipNet checkpoint; trained ResNet weights load into it)")
    register_model(card=_card(depth))(build)


for _depth in (38, 56, 74, 110):  # the paper's three CIFAR depths, and 56 for the public ResNet-56 weights
    _register(_depth)
