"""BlockDrop (Wu, Nagarajan, Kumar, Rennie, Davis, Grauman and Feris, "BlockDrop: Dynamic Inference
Paths in Residual Networks", CVPR 2018).

A small policy network looks at the input image once and outputs, for every residual block of a
trained CIFAR ResNet-(6n+2), a keep probability ``p_k = sigmoid(logit_k)`` (K = 3n blocks: 9, 15,
27, 54 for ResNet-20/32/56/110). At inference block k runs for a sample when ``p_k > 0.5`` (or
above a ``decision_threshold``); a dropped block passes its input through its shortcut only (the
identity, or the parameter-free option-A shortcut of :mod:`fractalbench.baselines.resnet` for the
first block of stages 2 and 3; the authors' code drops those the same way, through their
parameter-free average-pool + zero-channel shortcut). With every block kept the model computes the
ResNet exactly.

Policy network (as the authors' CIFAR code, ``Policy32``): a CIFAR ResNet-8 (stem, one basic block per
stage, 16/32/64 channels) whose classifier is a linear map 64 -> K, on the full input image (their
ImageNet policy, a ResNet-18-style net, sees the image average-pooled to half size:
``policy_downsample=2`` does that here). Their value head (a linear 64 -> 1) is unused by their loss
and left out. The policy runs once per sample, before the ResNet.

Inference. ``mode="compact"``: for each block, the samples that keep it are gathered
(index_select), the block runs on them only and its output is scattered back into the shortcut of
the batch (``index_copy``); a block that no sample keeps is not called; at batch 1 a dropped block
costs nothing. ``mode="mask"`` is the labelled variant: every block runs on every sample and the
decision selects (same logits). ``forward(x)`` is the dynamic (compact) forward.
``forward_exits(x)`` / ``forced_forward(x, 0)``: the single exit's forced path, the full network
(the policy evaluated, every block kept), so the per-exit cost row is the upper bound.

Cost units: ``policy`` (the policy network; every sample), ``base`` (stem and classifier; every
sample; baseline ``policy``) and ``block_k`` (residual block k in network order, ``block_names``
maps k to ``layerS.B``; counted when sample n keeps it; baseline ``base``). Probes run at batch 1.
Cost roles: the policy network is ``gates``, the ResNet's classifier (``backbone.head``) ``heads``.

Training (``loss_terms``), the stage chosen by ``training_stage``:

- ``"curriculum"`` (the paper's first stage): only the policy network learns; the ResNet runs in
  eval mode and without gradient whatever ``freeze`` says (as the authors' ``cl_training.py``).
  The policy decides only the last ``decided_blocks`` blocks; the first ``K - decided_blocks`` are
  always kept (in training and at inference). :meth:`BlockDrop.on_train_epoch` sets it at epoch t
  (0-based) of T: ``curriculum_step=None`` (default) spreads the curriculum over the stage,
  ``ceil(K (t + 1) / T)`` blocks, so its last epoch decides every block; an integer s decides
  ``min(K, s (t + 1))`` (the authors: one more block per epoch, ``s = 1``, over 5000 epochs).
- ``"joint"`` (the paper's joint fine-tuning, ``finetune.py``): every block decided; the policy by
  REINFORCE and the ResNet by the cross-entropy of the sampled path (every block runs and the
  decision selects while the ResNet is in training mode, as their masked forward, so batch norm
  sees the whole batch; in eval mode, e.g. under ``freeze: backbone``, the compact path).

Policy gradient (both stages). Keep probabilities are bounded, ``p' = alpha p + (1 - alpha)(1 - p)``
(``alpha`` = 0.8 keeps them in [0.2, 0.8], for exploration); actions ``u ~ Bernoulli(p')`` in
training mode (the greedy actions ``p > 0.5`` in eval mode); reward (:func:`blockdrop_reward`)
``R(u) = 1 - (|u|_0 / K)^2`` when the sample is classified correctly on the path u, else
``-gamma`` (``|u|_0`` counts the curriculum's kept blocks too); self-critical baseline: the
advantage is ``R(u) - R(u_greedy)`` with ``u_greedy = p > 0.5`` on the same sample. Terms:
``reinforce = -mean_n sum_k m_k A_n log pi(u_nk)`` (m_k = 1 on the decided blocks: the
curriculum's mask); in ``curriculum`` also ``entropy = -entropy_weight mean_n sum_k m_k (-p'_nk log
p'_nk)`` (the authors' CL exploration term, beta 0.1, the p log p half of the Bernoulli entropy;
theirs covers the always-kept blocks too, which over their 5000 epochs does no harm but in a short
stage drives the not yet decided blocks' probabilities below 0.5 before the policy decides them, so
here it covers the decided blocks only); in ``joint`` also ``cross_entropy``. The authors sum the
fine-tuning policy loss over the batch (their CL loss is a batch mean); here both are batch means.
Under Adam, their optimiser, that changes nothing: in that stage the policy's parameters get
gradient from the policy term alone, and Adam's step does not depend on the gradient's scale.

Starting point. When a trained ResNet's weights are loaded into the dense backbone
(:meth:`BlockDrop.on_backbone_loaded`), the policy's output layer is set to weight 0 and bias
:data:`KEEP_BIAS` (keep probability 0.88 for every block and input), so the model starts as that
ResNet and each block's keep probability starts high when the curriculum hands it to the policy.
The authors start from the policy's random init (keep probabilities around 0.5), which over their
thousands of epochs comes to the same, but which on a short stage drops about half of a trained
network's blocks at once.

``gamma`` (the penalty for a wrong prediction) sets the accuracy/compute trade-off (larger = keeps
more blocks); it is the attribute to sweep (suite ``attribute_sweep`` over ``gamma`` with
``set: {training_stage: joint}``): each value trains from the curriculum stage's weights and gives
one learned operating point. The authors' CL stage uses gamma 1; their fine-tuning 5 (default) and
10 (the released CIFAR-10 ResNet-110 model).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.baselines.resnet import CifarResNet, run_block_on_rows
from fractalbench.harness.contract import CostUnit, DynamicModel, DynamicOutput, Trace, check_exit_index, check_mode
from fractalbench.harness.policies import decision_threshold
from fractalbench.harness.registry import ModelCard, recipe_text, register_model

PAPER = ("Wu, Nagarajan, Kumar, Rennie, Davis, Grauman, Feris: BlockDrop: Dynamic Inference Paths in Residual "
         "Networks, CVPR 2018")
TRAINING_STAGES = ("curriculum", "joint")
POLICY_DEPTH = 8  # the authors' CIFAR policy network: a ResNet with one block per stage
KEEP_BIAS = 2.0  # the policy's output bias after a dense network's weights are loaded (keep probability 0.88)


def blockdrop_reward(logits: Tensor, y: Tensor, keep: Tensor, gamma: float) -> Tensor:
    """BlockDrop's reward per sample (float [N]): ``1 - (used / K)^2`` where the prediction
    ``argmax logits`` equals ``y``, else ``-gamma``; ``keep`` [N, K] are the block decisions."""
    used = keep.float().sum(1) / keep.shape[1]
    correct = logits.argmax(1) == y
    return torch.where(correct, 1.0 - used ** 2, torch.full_like(used, -float(gamma)))


def bounded_probs(probs: Tensor, alpha: float) -> Tensor:
    """``alpha p + (1 - alpha)(1 - p)``: keep probabilities squeezed into [1 - alpha, alpha]."""
    return alpha * probs + (1.0 - alpha) * (1.0 - probs)


def policy_gradient_loss(probs: Tensor, actions: Tensor, advantage: Tensor, decided: Tensor | None = None) -> Tensor:
    """REINFORCE surrogate ``-mean_n sum_k decided_k * A_n * log pi(u_nk)``: ``probs`` [N, K] keep
    probabilities of the sampling distribution (with gradient), ``actions`` [N, K] 0/1 (1 = keep),
    ``advantage`` [N] (no gradient), ``decided`` [K] or [N, K] 0/1 (None: every block)."""
    p = probs.clamp(1e-6, 1 - 1e-6)
    a = actions.float()
    log_pi = a * p.log() + (1 - a) * (1 - p).log()
    if decided is not None:
        log_pi = log_pi * decided.float()
    return -(log_pi * advantage.detach()[:, None]).sum(1).mean()


def curriculum_entropy(probs: Tensor, decided: Tensor | None = None) -> Tensor:
    """The authors' CL exploration term before its weight: ``mean_n sum_k decided_k (-p log p)``
    (probabilities clamped to [1e-15, 1 - 1e-15]; ``decided`` [K] 0/1, None: every block)."""
    p = probs.clamp(1e-15, 1 - 1e-15)
    term = -p * p.log()
    if decided is not None:
        term = term * decided.float()
    return term.sum(1).mean()


class BlockDrop(DynamicModel):
    """A CIFAR ResNet-(6n+2) whose blocks a policy network keeps or drops per sample; see the module
    docstring for the policy, inference, cost units and training."""

    dynamic_kind = "gated"
    num_exits = 1
    # MACs by role (fractalbench.harness.contract.cost_roles): the ResNet's classifier is the exit head,
    # the policy network decides which blocks run (gates)
    cost_roles = {"heads": ("backbone.head",), "gates": ("policy",)}

    def __init__(self, depth: int = 110, num_classes: int = 10, in_chans: int = 3, *, gamma: float = 1.0,
                 alpha: float = 0.8, entropy_weight: float = 0.1, training_stage: str = "curriculum",
                 curriculum_step: int | None = None, policy_depth: int = POLICY_DEPTH,
                 policy_downsample: int = 1) -> None:
        super().__init__()
        if not 0.5 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0.5, 1] (keep probabilities bounded to [1 - alpha, alpha]), "
                             f"got {alpha}")
        if curriculum_step is not None and (not isinstance(curriculum_step, int) or curriculum_step < 1):
            raise ValueError(f"curriculum_step must be None (spread over the stage) or an integer >= 1, "
                             f"got {curriculum_step!r}")
        if not isinstance(policy_downsample, int) or policy_downsample < 1:
            raise ValueError(f"policy_downsample must be an integer >= 1, got {policy_downsample!r}")
        self.backbone = CifarResNet(depth, num_classes, in_chans)
        self.depth = depth
        stages = (self.backbone.layer1, self.backbone.layer2, self.backbone.layer3)
        self._blocks: list[nn.Module] = [block for stage in stages for block in stage]  # not registered twice
        self.block_names: tuple[str, ...] = tuple(f"layer{s + 1}.{b}" for s, stage in enumerate(stages)
                                                  for b in range(len(stage)))
        self.policy = CifarResNet(policy_depth, self.num_blocks, in_chans)
        self.policy.head[-1].reset_parameters()  # torch's default Linear init, as the authors' policy logits
        self.policy_downsample = policy_downsample
        self.gamma, self.alpha, self.entropy_weight = float(gamma), float(alpha), float(entropy_weight)
        self.curriculum_step = curriculum_step
        self.training_stage = training_stage
        # how many of the last blocks the policy decides (the rest are kept): part of the state, so that a
        # model rebuilt from a checkpoint decides as the trained one did
        self.register_buffer("decided_blocks", torch.tensor(self.num_blocks, dtype=torch.long))

    def dense_backbone(self) -> CifarResNet:
        """The ResNet the policy drops blocks of (a trained CIFAR ResNet checkpoint loads into it)."""
        return self.backbone

    def on_backbone_loaded(self) -> None:
        """Start from the trained ResNet that was loaded: the policy's output layer is set to weight 0
        and bias :data:`KEEP_BIAS`, so every block is kept for every input (the model computes the
        ResNet) and the greedy baseline starts on the trained network's own predictions; training then
        learns what to drop."""
        nn.init.zeros_(self.policy.head[-1].weight)
        nn.init.constant_(self.policy.head[-1].bias, KEEP_BIAS)

    # ----- configuration ----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @property
    def training_stage(self) -> str:
        """``"curriculum"`` (policy only, curriculum over the blocks) or ``"joint"`` (policy and ResNet)."""
        return self._training_stage

    @training_stage.setter
    def training_stage(self, stage: str) -> None:
        if stage not in TRAINING_STAGES:
            raise ValueError(f"training_stage {stage!r} is not one of {', '.join(TRAINING_STAGES)}")
        self._training_stage = stage

    def curriculum_blocks(self, epoch: int, epochs: int) -> int:
        """Blocks the policy decides at epoch ``epoch`` (0-based) of a curriculum stage of ``epochs``."""
        k = self.num_blocks
        if self.curriculum_step is None:
            return min(k, max(1, math.ceil(k * (epoch + 1) / max(1, epochs))))
        return min(k, self.curriculum_step * (epoch + 1))

    def on_train_epoch(self, epoch: int, epochs: int) -> None:
        """Before every training epoch: the curriculum's number of decided blocks (stage
        ``curriculum``), or every block (stage ``joint``)."""
        decided = self.curriculum_blocks(epoch, epochs) if self.training_stage == "curriculum" else self.num_blocks
        self.decided_blocks.fill_(decided)

    def _always_kept(self) -> int:
        """The first blocks the curriculum keeps for every sample."""
        return self.num_blocks - int(self.decided_blocks)

    def _forced(self, forced_keep: Any, n: int, device: torch.device) -> Tensor | None:
        if forced_keep is None:
            return None
        bits = torch.as_tensor(forced_keep, dtype=torch.bool, device=device)
        if bits.dim() == 1:
            bits = bits.expand(n, -1)
        if bits.shape != (n, self.num_blocks):
            raise ValueError(f"forced_keep needs {self.num_blocks} bits (or [N, {self.num_blocks}]), "
                             f"got shape {tuple(bits.shape)}")
        return bits

    # ----- the two networks -------------------------------------------------------------------

    def keep_probabilities(self, x: Tensor) -> Tensor:
        """The policy network's keep probability of every block (float [N, K])."""
        if self.policy_downsample > 1:
            x = F.avg_pool2d(x, self.policy_downsample)
        return torch.sigmoid(self.policy(x))

    def _run_blocks(self, x: Tensor, keep: Tensor, mode: str) -> Tensor:
        """Stem, the blocks under ``keep`` [N, K] (compact: only the rows that keep a block run it;
        mask: every block on every row, then select), classifier."""
        h = self.backbone.stem(x)
        for k, block in enumerate(self._blocks):
            h = run_block_on_rows(block, h, keep[:, k], mode)  # a dropped block: its shortcut only
        return self.backbone.head(h)

    # ----- inference --------------------------------------------------------------------------

    def _infer(self, x: Tensor, mode: str = "compact", forced_keep: Any = None, threshold: float = 0.5
               ) -> DynamicOutput:
        n = x.shape[0]
        forced = self._forced(forced_keep, n, x.device)
        probs = self.keep_probabilities(x)
        if forced is None:
            keep = probs > threshold
            keep[:, :self._always_kept()] = True
        else:
            keep = forced
        logits = self._run_blocks(x, keep, mode)
        ones = torch.ones(n, device=x.device)
        counts = {"policy": ones, "base": ones}
        for k in range(self.num_blocks):
            counts[f"block_{k}"] = ones if mode == "mask" else keep[:, k].float()
        shown = probs.detach().clone()
        if forced is None:
            shown[:, :self._always_kept()] = 1.0  # the curriculum keeps these whatever the policy says
        extras = {"gate_probs": shown, "blocks_used": keep.float().sum(1)}
        trace = Trace(torch.zeros(n, dtype=torch.long, device=x.device), counts, gates=keep, extras=extras)
        return DynamicOutput(logits, trace)

    def forward(self, x: Tensor) -> Tensor:
        """Dynamic (compact) logits: the policy decides which blocks run."""
        return self._infer(x).logits

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        """The single exit's forced path: the policy evaluated, every block run."""
        return [self.forced_forward(x, 0)]

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:
        check_exit_index(self, exit_index)
        return self._infer(x, forced_keep=[True] * self.num_blocks).logits

    def dynamic_forward(self, x: Tensor, policy: Any = None, mode: str = "compact", *,
                        forced_keep: Any = None) -> DynamicOutput:
        """Logits and trace; the policy network decides. ``policy``: None (keep block k when its
        probability is > 0.5, the authors' rule) or a ``decision_threshold`` t (> t instead; the
        curriculum's always-kept blocks stay kept). ``forced_keep`` (K bools, or a BoolTensor
        [N, K]) overrides every decision; the policy network still runs."""
        return self._infer(x, check_mode(mode), forced_keep, decision_threshold(policy, 0.5))

    # ----- training ---------------------------------------------------------------------------

    @contextmanager
    def _fixed_backbone(self) -> Iterator[None]:
        """The ResNet in eval mode and without autograd (curriculum stage); its modes restored after."""
        modes = [(m, m.training) for m in self.backbone.modules()]
        self.backbone.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, flag in modes:
                m.training = flag

    def _path_logits(self, x: Tensor, keep: Tensor) -> Tensor:
        """Logits of the path ``keep``: masked while the ResNet trains (batch norm sees every
        sample, as the authors' training forward), compact while it is in eval mode."""
        return self._run_blocks(x, keep, "mask" if self.backbone.training else "compact")

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``reinforce`` and, by stage, ``entropy`` (curriculum) or ``cross_entropy`` (joint); see the
        module docstring."""
        curriculum = self.training_stage == "curriculum"
        first = self._always_kept() if curriculum else 0
        probs = self.keep_probabilities(x)
        bounded = bounded_probs(probs, self.alpha)
        greedy = probs.detach() > 0.5
        sample = torch.bernoulli(bounded.detach()).bool() if self.training else greedy.clone()
        greedy[:, :first] = True
        sample[:, :first] = True
        if curriculum:
            with self._fixed_backbone():
                greedy_logits, sample_logits = self._path_logits(x, greedy), self._path_logits(x, sample)
        else:
            with torch.no_grad():
                greedy_logits = self._path_logits(x, greedy)
            sample_logits = self._path_logits(x, sample)
        advantage = (blockdrop_reward(sample_logits.detach(), y, sample, self.gamma)
                     - blockdrop_reward(greedy_logits, y, greedy, self.gamma))
        decided = torch.arange(self.num_blocks, device=x.device) >= first
        terms = {"reinforce": policy_gradient_loss(bounded, sample, advantage, decided)}
        if curriculum:
            terms["entropy"] = -self.entropy_weight * curriculum_entropy(bounded, decided)
        else:
            terms["cross_entropy"] = F.cross_entropy(sample_logits, y)
        return terms

    # ----- cost -------------------------------------------------------------------------------

    def cost_units(self) -> list[CostUnit]:
        k = self.num_blocks
        only = lambda i: [j == i for j in range(k)]  # noqa: E731
        units = [CostUnit("policy", self.keep_probabilities),
                 CostUnit("base", lambda x: self.dynamic_forward(x, forced_keep=[False] * k), baseline="policy")]
        units += [CostUnit(f"block_{i}", lambda x, i=i: self.dynamic_forward(x, forced_keep=only(i)), baseline="base")
                  for i in range(k)]
        return units


def block_usage(trace: Trace) -> Tensor:
    """Blocks each sample executed (float [N]), from a trace's keep bits (BlockDrop's "block usage")."""
    if trace.gates is None:
        raise ValueError("this trace has no gate bits (not from a gated model)")
    return trace.gates.float().sum(1)


def drop_rates(trace: Trace) -> Tensor:
    """Fraction of samples that dropped each block (float [K]), from a trace's keep bits."""
    if trace.gates is None:
        raise ValueError("this trace has no gate bits (not from a gated model)")
    return 1.0 - trace.gates.float().mean(0)


# ----- published numbers and recipe -------------------------------------------------------------------

#: Tushar-N/blockdrop: cl_training.py (stage 1, README command for R110_C10) and finetune.py (stage 2,
#: README command, penalty -10 for the released CIFAR-10 ResNet-110 model). Epochs of 50k images.
BLOCKDROP_RECIPE = {"epochs": 5000, "batch_size": 2048, "optimizer": "adam", "lr": 1e-3, "betas": (0.9, 0.999),
                    "weight_decay": 0.0, "schedule": "none", "precision": "fp32",
                    "stage2.epochs": 1600, "stage2.batch_size": 256, "stage2.optimizer": "adam", "stage2.lr": 1e-4,
                    "stage2.betas": (0.9, 0.999), "stage2.weight_decay": 0.0, "stage2.schedule": "none",
                    "stage2.precision": "fp32", "stage2.gamma": 10.0}
BLOCKDROP_RECIPE_NOTE = (
    "authors' code (Tushar-N/blockdrop): stage 1 curriculum learning (cl_training.py, README: --lr 1e-3 "
    "--batch_size 2048 --max_epochs 5000) trains the policy only, ResNet fixed in eval mode, penalty (-gamma) -1, "
    "alpha 0.8, entropy bonus beta 0.1, the policy deciding the last epoch+1 blocks (all 54 from epoch 53 on; lr "
    "decay every 10000 epochs: none); stage 2 joint fine-tuning (finetune.py, README: --lr 1e-4 --penalty -10 "
    "--batch_size 256 --max_epochs 1600; its lr step at epoch 1600 only touches the last epoch) trains policy and "
    "ResNet, alpha 0.8, no entropy term; both Adam, weight decay 0, CIFAR augmentation crop + flip; the ResNets "
    "start from the authors' trained CIFAR ResNets (R110: 93.2 %, R32: 92.3 % by their file names)")
#: The authors' README (Tushar-N/blockdrop, "Testing and Profiling"): released models' test output.
BLOCKDROP_RELEASED = {
    "blockdrop_top1_cifar10": 93.6,  # R110_C10, gamma 10: "Accuracy: 0.936"
    "blockdrop_blocks_used_cifar10": 16.933,  # "Block Usage: 16.933 +- 3.717" of 54
    "blockdrop_flops_cifar10": 1.81e8,  # "FLOPs/img: 1.81E+08" (their FLOPs; ~2 x MACs, policy included)
    "blockdrop_top1_imagenet": 76.4,  # R101_ImgNet, gamma 5: "Accuracy: 0.764"
    "blockdrop_blocks_used_imagenet": 24.77,  # "Block Usage: 24.770" of 33
}
BLOCKDROP_CLAIMS = {"imagenet_speedup_pct_mean": 20.0, "imagenet_speedup_pct_max": 36.0}
BLOCKDROP_SOURCE = (
    "blockdrop_*: the authors' README (Tushar-N/blockdrop, 'Testing and Profiling'): test output of the released "
    "fine-tuned models, CIFAR-10 on ResNet-110 (gamma 10: 93.6 % top-1, 16.933 +- 3.717 of 54 blocks, 1.81E+08 "
    "FLOPs per image) and ImageNet on ResNet-101 (gamma 5: 76.4 %, 24.77 of 33 blocks); imagenet_speedup_*: the "
    "abstract ('a speedup of 20% on average, going as high as 36% for some images, while maintaining the same "
    "76.4% top-1 accuracy on ImageNet'). The paper's Table 1 (FirstK/RandomK/DistributedK baselines, CIFAR-100, "
    "ResNet-32) and its FLOPs/speed-up comparison could not be read from here, so none of it is on this card; "
    "the README's CIFAR-10 numbers are the paper's headline ResNet-110 result (93.6 %, ~16.9 blocks). These are "
    "dynamic operating points (policy 'gamma' rows in this harness), not the all-blocks-kept last exit, so no "
    "measured value sits beside them")


def _card(depth: int) -> ModelCard:
    n = (depth - 2) // 6
    reference = dict(BLOCKDROP_CLAIMS)
    if depth == 110:
        reference.update(BLOCKDROP_RELEASED)
    return ModelCard(
        family="blockdrop",
        paper=PAPER,
        dynamic_kind="gated",
        input_size=32,
        reference=reference,
        reference_source=BLOCKDROP_SOURCE if depth == 110 else
        f"no published CIFAR number for ResNet-{depth} (the released CIFAR-10 model is on ResNet-110); "
        + BLOCKDROP_SOURCE,
        paper_recipe=recipe_text(BLOCKDROP_RECIPE, BLOCKDROP_RECIPE_NOTE),
        notes=f"ResNet-{depth} (n={n}, {3 * n} blocks, option-A shortcuts) with a ResNet-8 policy network on the "
        f"full image (linear 64->{3 * n} + sigmoid, no value head); a dropped block is its shortcut, so with every "
        "block kept the model is the ResNet. Inference keeps block k when p_k > 0.5 (decision_threshold moves it); "
        "compact mode runs each block on the samples that keep it only. forward_exits/forced_forward = the full "
        "network plus the policy; dynamic rows = the policy's decisions. Curriculum spread over the first stage's "
        "epochs by default (curriculum_step=1: the authors' one block per epoch).",
    )


def _register(depth: int) -> None:
    """Register ``blockdrop_resnet<depth>``: BlockDrop on ResNet-<depth>, with the options of :class:`BlockDrop`."""

    def build(*, num_classes: int = 10, in_chans: int = 3, gamma: float = 1.0, alpha: float = 0.8,
              entropy_weight: float = 0.1, training_stage: str = "curriculum", curriculum_step: int | None = None,
              policy_downsample: int = 1) -> BlockDrop:
        return BlockDrop(depth, num_classes, in_chans, gamma=gamma, alpha=alpha, entropy_weight=entropy_weight,
                         training_stage=training_stage, curriculum_step=curriculum_step,
                         policy_downsample=policy_downsample)

    build.__name__ = build.__qualname__ = f"blockdrop_resnet{depth}"
    build.__doc__ = f"BlockDrop on ResNet-{depth} ({3 * ((depth - 2) // 6)} blocks; the ResNet's weights load into it)"
    register_model(card=_card(depth))(build)


for _depth in (20, 32, 56, 110):  # the public trained ResNet-20/32/56 weights, and the paper's ResNet-110
    _register(_depth)

