"""Adaptive token halting (A-ViT: Yin et al., "A-ViT: Adaptive Tokens for Efficient Vision
Transformer", CVPR 2022) on ViT-Lite (:mod:`fractalbench.baselines.vit`).

After every encoder layer l each token t still in flight gets a halting score
``h_t^l = sigmoid(gate_scale * x_t^l[0] - gate_center)`` from the first dimension of its embedding (no
new parameters; A-ViT's gate_scale 10, gate_center 30 by default) and accumulates it; the token halts
at the first layer where its cumulative score reaches the threshold ``1 - eps`` (eps = 0.01), and at
the last layer in any case. A halted token leaves: later layers neither update it nor let other
tokens attend to it. When the class token halts, its image is finished: nothing that runs later can
change its answer, so the whole sample stops there. The class token's output is A-ViT's mean field
over its layers, ``sum_l w_l x_cls^l`` with ``w_l = h^l`` before its halting layer N and the remainder
``1 - sum_{l<N} h^l`` at N, then LayerNorm and the classifier.

Training (A-ViT): cross-entropy plus the ponder loss ``ponder_weight x mean over tokens of (N_t + r_t)``
(N_t the token's halting layer, counted from 1, r_t its remainder) and the distributional prior
``prior_weight x KL(halting distribution || Gaussian)``: each token's halting mass per layer (its score
before it halts, its remainder where it halts) averaged over the tokens, against a Gaussian over the
layers 1..L centred at ``target_depth`` (std 1). Tokens of a sample whose class token halted end there
(their depth is that layer). The training forward
computes every token at every layer and masks the halted ones (``mode="mask"``); inference
(``mode="compact"``) computes only the tokens in flight: at each layer the samples are grouped by how
many tokens they have left, each group's tokens gathered into one batch (no padding), run, and
scattered back.

Cost units per layer l (a layer's MACs on n tokens are ``n L + n^2 P``, L per token in the projections
and the MLP, P per query-key pair in the two attention products): ``layer{l}_token`` (the layer on one
token: L + P; counted n per sample) and ``layer{l}_pairs`` (the layer on two tokens minus twice on one:
2 P, one unordered pair; counted n (n - 1) / 2), measured against ``layer{l}_single_twice`` (the layer on
one token, twice; counted 0, a reference for the probe only). ``base``: the embedding and the head.

The decision is the model's gate: ``decision_threshold`` t replaces ``1 - eps`` (the gates are "token t
is computed at layer l"; raising t keeps tokens longer), so budgets are fitted on validation like a
gated model's. The trace's ``gates`` [N, L x T] holds those bits, ``extras["token_depth"]`` [N, T] the
layer each token halted at (1..L), ``extras["gate_probs"]`` the cumulative scores compared with the
threshold.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fractalbench.baselines.vit import PAPER as VIT_PAPER
from fractalbench.baselines.vit import EncoderLayer, VisionTransformerLite
from fractalbench.harness.contract import CostUnit, DynamicModel, DynamicOutput, Trace, check_exit_index, check_mode
from fractalbench.harness.policies import decision_threshold
from fractalbench.harness.registry import ModelCard, register_model

PAPER = "Yin et al., A-ViT: Adaptive Tokens for Efficient Vision Transformer, CVPR 2022"
FAR = 10.0  # gate_probs of slots with no decision: far from any threshold in [0, 1]


def masked_layer(block: EncoderLayer, x: Tensor, active: Tensor) -> Tensor:
    """``block`` on tokens x [N, T, D] where only ``active`` [N, T] tokens take part: the others are
    no keys and keep their state. Equal to the block on the active tokens alone."""
    att = block.self_attn
    n, t, d = x.shape
    q, k, v = att.qkv(block.pre_norm(x)).reshape(n, t, 3, att.heads, d // att.heads).permute(2, 0, 3, 1, 4)
    scores = torch.matmul(q, k.transpose(-2, -1)).mul(att.scale)
    scores = scores.masked_fill(~active[:, None, None, :], float("-inf"))
    weights = att.attn_drop(torch.nan_to_num(scores.softmax(-1)))  # a sample with no key left: zeros
    y = att.proj_drop(att.proj(torch.matmul(weights, v).transpose(1, 2).reshape(n, t, d)))
    h = block.norm1(x + block.drop_path(y))
    h = h + block.drop_path(block.dropout2(block.linear2(block.dropout1(F.gelu(block.linear1(h))))))
    return torch.where(active[..., None], h, x)


def gathered_layer(block: EncoderLayer, x: Tensor, active: Tensor) -> Tensor:
    """``block`` on the ``active`` tokens only: the samples grouped by how many tokens they have left,
    each group's tokens gathered into one batch (no padding), run and written back."""
    x = x.clone()
    counts = active.sum(1)
    for size in counts.unique().tolist():
        if size == 0:
            continue
        rows = (counts == size).nonzero(as_tuple=True)[0]
        cols = active[rows].nonzero(as_tuple=True)[1].reshape(len(rows), size)  # in token order
        x[rows[:, None], cols] = block(x[rows[:, None], cols])
    return x


class HaltingViT(DynamicModel):
    """ViT-Lite with A-ViT's token halting; see the module docstring."""

    dynamic_kind = "gated"
    num_exits = 1

    def __init__(self, depth: int = 7, dim: int = 256, heads: int = 4, mlp_ratio: float = 2.0, patch: int = 4,
                 img_size: int = 32, num_classes: int = 10, in_chans: int = 3, *, eps: float = 0.01,
                 gate_scale: float = 10.0, gate_center: float = 30.0, ponder_weight: float = 5e-4,
                 prior_weight: float = 0.1, target_depth: float | None = None) -> None:
        super().__init__()
        self.backbone = VisionTransformerLite(depth, dim, heads, mlp_ratio, patch, img_size, num_classes, in_chans)
        self.depth, self.tokens = depth, (img_size // patch) ** 2 + 1
        self.eps, self.gate_scale, self.gate_center = eps, gate_scale, gate_center
        self.ponder_weight, self.prior_weight = ponder_weight, prior_weight
        self.target_depth = float(depth - 1 if target_depth is None else target_depth)
        self.cost_roles = {"heads": ("backbone.head",)}

    def dense_backbone(self) -> VisionTransformerLite:
        """The ViT-Lite itself (A-ViT adds no parameters: its checkpoint loads here)."""
        return self.backbone

    def halting(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.gate_scale * x[..., 0] - self.gate_center)

    # ----- the two paths ---------------------------------------------------------------------------------

    def _masked(self, x: Tensor, threshold: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Every token at every layer, the halted ones masked (training; ``mode="mask"``)."""
        return self._run(x, threshold, masked_layer)

    def _compact(self, x: Tensor, threshold: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Only the tokens in flight: per layer, the samples grouped by tokens left, gathered, run."""
        return self._run(x, threshold, gathered_layer)

    def _run(self, x: Tensor, threshold: float, run_layer: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The halting bookkeeping around ``run_layer(block, h, active)`` (masked or gathered)."""
        v = self.backbone
        h = v.embed(x)
        n, t = h.shape[:2]
        active = torch.ones(n, t, dtype=torch.bool, device=h.device)
        cumulative = h.new_zeros(n, t)
        depth = torch.full((n, t), self.depth, dtype=torch.long, device=h.device)
        remainder = h.new_zeros(n, t)
        out = torch.zeros_like(h[:, 0])
        gates, probs, masses = [], [], []
        for layer, block in enumerate(v.blocks):
            gates.append(active.clone())
            h = run_layer(block, h, active)
            score = self.halting(h)
            new = cumulative + score * active
            halt = active & ((new >= threshold) | (layer == self.depth - 1))
            probs.append(torch.where(active, new, torch.full_like(new, FAR)))
            # the class token's mean field: h^l while it runs on, the remainder where it halts
            weight = torch.where(halt[:, 0], 1 - cumulative[:, 0], score[:, 0] * active[:, 0])
            out = out + weight[:, None] * h[:, 0]
            remainder = torch.where(halt, 1 - cumulative, remainder)
            masses.append(torch.where(halt, 1 - cumulative, score * active))  # each token's halting mass here
            depth = torch.where(halt, torch.full_like(depth, layer + 1), depth)
            cumulative = torch.where(active & ~halt, new, cumulative)
            ended = active & ~halt & ~(active & ~halt)[:, :1]  # tokens of a sample whose class token halted
            remainder = torch.where(ended, 1 - cumulative, remainder)
            depth = torch.where(ended, torch.full_like(depth, layer + 1), depth)
            active = active & ~halt
            active = active & active[:, :1]  # a finished class token ends its sample
        logits = v.head.fc(v.head.norm(out))
        return logits, {"gates": torch.stack(gates, 1), "depth": depth, "remainder": remainder,
                        "probs": torch.stack(probs, 1), "mass": torch.stack(masses, 1)}

    def _trace(self, info: dict[str, Tensor], mode: str) -> Trace:
        gates = info["gates"]  # [N, L, T]
        n = gates.shape[0]
        counts = {"base": torch.ones(n, device=gates.device)}
        tokens = gates.sum(2).float() if mode == "compact" else torch.full(gates.shape[:2], float(self.tokens),
                                                                           device=gates.device)
        for layer in range(self.depth):
            k = tokens[:, layer]
            counts[f"layer{layer}_token"] = k
            counts[f"layer{layer}_pairs"] = k * (k - 1) / 2
            counts[f"layer{layer}_single_twice"] = torch.zeros_like(k)
        return Trace(torch.zeros(n, dtype=torch.long, device=gates.device), counts, gates=gates.flatten(1),
                     extras={"token_depth": info["depth"].float(), "gate_probs": info["probs"].flatten(1)})

    # ----- the contract ------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        run = self._masked if self.training else self._compact
        return run(x, 1 - self.eps)[0]

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.forward(x)]

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:
        """The only exit: the halting forward (each token runs its own depth)."""
        check_exit_index(self, exit_index)
        return self.forward(x)

    def dynamic_forward(self, x: Tensor, policy: Any = None, mode: str = "compact") -> DynamicOutput:
        """Logits and trace; ``policy``: None (halt at 1 - eps) or a ``decision_threshold`` t."""
        mode = check_mode(mode)
        threshold = decision_threshold(policy, 1 - self.eps)
        logits, info = (self._compact if mode == "compact" else self._masked)(x, threshold)
        return DynamicOutput(logits, self._trace(info, mode))

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``cross_entropy``, A-ViT's ``ponder`` (mean over tokens of N_t + r_t) and ``distribution``
        (KL of the per-layer mean halting mass against a Gaussian prior over the layers)."""
        logits, info = self._masked(x, 1 - self.eps)
        ponder = (info["depth"].float() + info["remainder"]).mean()
        halting = info["mass"].clamp(min=0).mean((0, 2)) + 1e-8  # [L]: mean halting mass per layer
        halting = halting / halting.sum()
        layers = torch.arange(1, self.depth + 1, dtype=halting.dtype, device=halting.device)
        prior = torch.exp(-0.5 * (layers - self.target_depth) ** 2)
        prior = prior / prior.sum()
        kl = (halting * (halting.log() - prior.log())).sum()
        return {"cross_entropy": F.cross_entropy(logits, y), "ponder": self.ponder_weight * ponder,
                "distribution": self.prior_weight * kl}

    def cost_units(self) -> list[CostUnit]:
        v = self.backbone

        def base(x: Tensor) -> Tensor:
            h = v.embed(x)
            return v.head(h)

        def layer_on(layer: int, positions: list[list[int]]) -> Any:
            def probe(x: Tensor) -> Tensor:
                h = v.embed(x)
                for tokens in positions:
                    v.blocks[layer](h[:, tokens])
                return v.head(h)
            return probe

        units = [CostUnit("base", base)]
        for layer in range(self.depth):
            units += [CostUnit(f"layer{layer}_token", layer_on(layer, [[0]]), baseline="base"),
                      CostUnit(f"layer{layer}_single_twice", layer_on(layer, [[0], [1]]), baseline="base"),
                      CostUnit(f"layer{layer}_pairs", layer_on(layer, [[0, 1]]), baseline=f"layer{layer}_single_twice")]
        return units


def _card(notes: str, input_size: int = 32) -> ModelCard:
    return ModelCard(family="token_halting", paper=f"{PAPER}; backbone: {VIT_PAPER}", dynamic_kind="gated",
                     input_size=input_size, reference={},
                     reference_source="A-ViT reports ImageNet (DeiT-T: 71.0 % at 0.8 GFLOPs against 72.2 % at 1.3, "
                     "its Table 1); no CIFAR numbers", notes=notes,
                     paper_recipe="A-ViT fine-tunes a trained DeiT for 100 epochs with the ponder (5e-4) and "
                     "distributional-prior (0.1) losses; a suite states its own")


@register_model(card=_card("A-ViT's halting on ViT-Lite-7/4 (65 tokens, 7 layers): gate_scale 10, gate_center 30, "
                           "eps 0.01, prior centred at layer 6 of 7; a dense ViT-Lite checkpoint loads as it is"))
def haltvit_lite_7_4(*, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, eps: float = 0.01,
                     gate_scale: float = 10.0, gate_center: float = 30.0, target_depth: float | None = None
                     ) -> HaltingViT:
    return HaltingViT(7, 256, 4, 2.0, 4, img_size, num_classes, in_chans, eps=eps, gate_scale=gate_scale,
                      gate_center=gate_center, target_depth=target_depth)


@register_model(card=_card("A-ViT's halting on ViT-Lite-2/4 at 16x16 (17 tokens, 2 layers), for the digits; "
                           "gate_center 3 (the ViT's embeddings start near 0 here, so A-ViT's 30 never halts)",
                           input_size=16))
def haltvit_lite_2_4(*, num_classes: int = 10, in_chans: int = 3, img_size: int = 16, eps: float = 0.01,
                     gate_scale: float = 10.0, gate_center: float = 3.0, target_depth: float | None = 1.0
                     ) -> HaltingViT:
    return HaltingViT(2, 128, 2, 1.0, 4, img_size, num_classes, in_chans, eps=eps, gate_scale=gate_scale,
                      gate_center=gate_center, target_depth=target_depth)


