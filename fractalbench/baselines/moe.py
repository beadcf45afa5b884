"""Mixture-of-Experts image classifiers on a CIFAR ResNet backbone.

Routers:

- ``"noisy_topk"``: sparsely-gated noisy top-k gating (Shazeer et al., "Outrageously Large Neural
  Networks: The Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017). ``H = z W_g + eps *
  softplus(z W_noise)`` (noise, ``eps ~ N(0, 1)``, only in training mode; the std has
  ``noise_epsilon`` added, as in tensor2tensor), keep the top k of H and take the softmax over
  those k: the gate values. Auxiliary losses: ``importance = w_importance * CV(Importance)^2`` with
  Importance_e = sum over tokens of gate value e, and ``load = w_load * CV(Load)^2`` with the smooth
  estimator Load_e = sum over tokens of ``Phi((clean_e - kth_excluding(H, k, e)) / std_e)`` in
  training (in eval mode, without noise: the number of tokens with a nonzero gate). CV^2 =
  population variance / mean^2 (``cv_squared``).
- ``"switch"``: Switch-Transformer top-1 routing (Fedus et al., "Switch Transformers", JMLR 2022).
  The softmax is taken over all experts first, the expert is the argmax, and its output is scaled
  by its probability (a softmax after selecting one expert would be constantly 1 and leave the
  router without gradient). Auxiliary loss ``load_balancing = w_balance * E * sum_e f_e P_e``: f_e
  the fraction of tokens whose argmax is e (before capacity), P_e the mean router probability.
- ``"expert_choice"``: expert-choice routing (Zhou et al., "Mixture-of-Experts with Expert Choice
  Routing", NeurIPS 2022). Token-to-expert scores ``S = softmax(z W_g)`` over the experts; then each
  *expert* picks the top ``k_e = ceil(capacity_factor * n / E)`` tokens of its routing group by its
  score column (n tokens in the group; the paper's capacity factor c = 2 by default: on average a
  token is processed by c experts), and its output is scaled by that score. A token may be taken by
  several experts or by none (it then passes through the residual: a dropped token). Load is
  balanced by construction, so there is no auxiliary loss; the paper's optional limit on experts
  per token (an entropy-regularised linear program) is not built. The routing group (``group``) is
  ``"batch"`` (the paper's: all tokens of the batch compete, so a sample's route depends on the
  other samples in its batch; the model declares ``batch_dependent``) or ``"sample"`` (each sample's
  T tokens alone: batch-independent, k_e = ceil(c T / E) per sample).

Layers and tokens. Experts are token-wise feed-forward layers (two 1x1 convolutions, written as
``Linear(C, r C) -> ReLU -> Linear(r C, C)``) routed per spatial position: the tokens of a sample
are the H x W positions of its feature map. An MoE layer is pre-norm residual:
``h_t + sum_s w_{t,s} expert_{e_{t,s}}(LN(h_t))``. ``moe_layers`` MoE layers follow the last
``moe_layers`` blocks of stage 3 of a CIFAR ResNet (64 channels, all at the same resolution, so
every layer has the same T tokens: 64 at 32x32, 16 at 16x16).

Capacity (``capacity_factor``, None = unlimited) is per sample: each expert takes at most
``ceil(capacity_factor * k * T / E)`` of one sample's T tokens, so a sample's routing never
depends on the other samples in its batch (batch-1 and batched decisions agree). Assignments are
admitted in priority order: all first choices in raster order, then the second choices, ...;
those past capacity are dropped (that token/choice adds nothing; the token passes through the
residual; the kept choices are not renormalised).

Dispatch. ``mode="compact"``: for each expert, gather the (sample, token) pairs routed to it, run
it on those only, scale, scatter-add back; unchosen experts never run. ``mode="mask"``: the
labelled variant, every expert on every token, combined with the routing weights.

Trace. ``experts``: LongTensor [N, L, T*k], expert of layer l for (token t, choice s) at index
``t*k + s`` (-1 = dropped); for top-1 that is [N, L, T]. Expert choice: [N, L, T*E], index
``t*E + e`` is e when expert e took token t, else -2 (an empty slot, not a drop); a token that no
expert took has -1 in its first slot (dropped), so -1 counts dropped tokens and dropped choices.
``unit_counts``: ``base`` = 1 and
``layer{l}_expert{e}`` = how many of sample n's tokens expert e of layer l processed (T for every
expert in mask mode). Cost units: ``base`` = a forward in which every layer routes but no expert
runs (stem, backbone, norms, routers, head: the router belongs to base; the noise projection is
not run at inference); ``layer{l}_expert{e}`` = base plus expert e of layer l on one token, so
its MACs are per token: 2 r C^2. Cost roles: the router (and noise) projections of every MoE
layer are routers, the classifier (``backbone.head``) is the exit head, the rest (experts
included) is backbone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.baselines.resnet import CifarResNet
from fractalbench.harness.contract import CostUnit, DynamicModel, DynamicOutput, Trace, check_exit_index, check_mode
from fractalbench.harness.policies import decision_threshold
from fractalbench.harness.registry import ModelCard, register_model

ROUTERS = ("noisy_topk", "switch", "expert_choice")
GROUPS = ("batch", "sample")
"""Expert choice's routing group: the tokens of the whole batch, or of each sample alone."""
EMPTY_SLOT = -2
"""Expert choice's trace value for an expert that did not take a token (not a dropped token: -1)."""
ROUTER_INITS = ("zero", "fedus", "torch")
"""How router (and noise) projections start: ``zero`` (Shazeer et al.: W_g = W_noise = 0, so routing
starts uniform and only the noise spreads tokens), ``fedus`` (Switch Transformers: truncated normal,
std sqrt(0.1 / fan_in)), ``torch`` (nn.Linear's default uniform init, this build's earlier choice,
which routes unevenly from the first step)."""
SHAZEER = "Shazeer et al., Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer, ICLR 2017"
FEDUS = "Fedus et al., Switch Transformers: Scaling to Trillion Parameter Models, JMLR 2022"
ZHOU = "Zhou et al., Mixture-of-Experts with Expert Choice Routing, NeurIPS 2022"


# ----- balancing losses (pure functions, tested by hand) -------------------------------------------

def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation: population variance / (mean^2 + eps) (tensor2tensor)."""
    x = x.float()
    mean = x.mean()
    return ((x - mean) ** 2).mean() / (mean ** 2 + eps)


def importance(gates: Tensor) -> Tensor:
    """Importance_e = sum over tokens of the gate value of expert e. gates: dense [tokens, E]."""
    return gates.sum(0)


def smooth_load(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Shazeer's differentiable load estimate [E]: sum over tokens of P(e in top-k), where
    ``P = Phi((clean_e - kth_excluding(noisy, k, e)) / std_e)``. All inputs: [tokens, E]; needs E > k.

    kth_excluding(noisy, k, e) is the k-th largest noisy logit among the other experts: the
    (k+1)-th largest overall if e is in the top k, else the k-th largest."""
    top = noisy.topk(k + 1, dim=-1).values
    threshold_if_in, threshold_if_out = top[:, k:k + 1], top[:, k - 1:k]
    is_in = noisy > threshold_if_in
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
    prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(0)


def switch_balancing_loss(probs: Tensor, choice: Tensor) -> Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``. probs: softmax over all experts [tokens, E];
    choice: argmax expert per token [tokens] (before capacity). 1.0 when perfectly balanced."""
    e = probs.shape[-1]
    f = F.one_hot(choice, e).float().mean(0)
    return e * (f * probs.mean(0)).sum()


# ----- the MoE layer ---------------------------------------------------------------------------------

@dataclass
class Routing:
    """One layer's routing of a batch. Token axes are [N, T]; ``assign`` [N, T, k] (-1 dropped)."""

    assign: Tensor
    weights: Tensor
    clean_logits: Tensor
    noisy_logits: Tensor
    noise_std: Tensor | None
    probs: Tensor | None  # switch: softmax over all experts


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class Expert(nn.Module):
    """Token-wise feed-forward expert (two 1x1 convs): Linear(C, rC) -> ReLU (or GELU, a transformer's
    MLP) -> Linear(rC, C)."""

    def __init__(self, channels: int, expansion: float, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"expert activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.fc1 = nn.Linear(channels, int(expansion * channels))
        self.fc2 = nn.Linear(int(expansion * channels), channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class MoELayer(nn.Module):
    """Pre-norm residual MoE over the spatial tokens of a feature map [N, C, H, W] (``forward``) or over
    a transformer's tokens [N, T, C] (``forward_tokens``; ``norm=False`` where the stream arrives
    normalised, as in ViT-Lite's encoder layer)."""

    def __init__(self, channels: int, num_experts: int, k: int, router: str = "noisy_topk", expansion: float = 4,
                 capacity_factor: float | None = None, noise_epsilon: float = 1e-2, group: str = "batch",
                 norm: bool = True, activation: str = "relu") -> None:
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router {router!r} is not one of {', '.join(ROUTERS)}")
        if group not in GROUPS:
            raise ValueError(f"routing group {group!r} is not one of {', '.join(GROUPS)}")
        if router == "expert_choice":
            if capacity_factor is None or not 0 < capacity_factor <= num_experts:
                raise ValueError("expert choice needs a capacity factor in (0, num_experts] (the average number of "
                                 f"experts per token; the paper's default is 2), got {capacity_factor}")
            k = num_experts  # a token has one slot per expert (see the trace layout)
        elif router == "switch" and k != 1:
            raise ValueError(f"the switch router routes each token to 1 expert, got k={k}")
        if not 1 <= k <= num_experts or (router == "noisy_topk" and k >= num_experts):
            raise ValueError(f"need 1 <= k < num_experts for noisy top-k (k <= num_experts for switch), got k={k}, "
                             f"num_experts={num_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.num_experts, self.k, self.router_type = num_experts, k, router
        self.capacity_factor, self.noise_epsilon, self.group = capacity_factor, noise_epsilon, group
        self.norm = nn.LayerNorm(channels) if norm else nn.Identity()
        self.router = nn.Linear(channels, num_experts, bias=False)
        self.noise = nn.Linear(channels, num_experts, bias=False) if router == "noisy_topk" else None
        self.experts = nn.ModuleList(Expert(channels, expansion, activation) for _ in range(num_experts))

    def init_router(self, how: str) -> None:
        """Initialise the router and noise projections (see :data:`ROUTER_INITS`)."""
        if how not in ROUTER_INITS:
            raise ValueError(f"router_init {how!r} is not one of {', '.join(ROUTER_INITS)}")
        for linear in (self.router, self.noise):
            if linear is None or how == "torch":
                continue
            if how == "zero":
                nn.init.zeros_(linear.weight)
            else:
                std = math.sqrt(0.1 / linear.in_features)
                nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)

    def capacity(self, tokens: int) -> int | None:
        """Per-sample capacity of each expert: ceil(capacity_factor * k * T / E) (None: unlimited).
        Expert choice: the tokens each expert takes from a group of ``tokens``,
        min(tokens, ceil(capacity_factor * tokens / E))."""
        if self.capacity_factor is None:
            return None
        if self.router_type == "expert_choice":
            return min(tokens, max(1, math.ceil(self.capacity_factor * tokens / self.num_experts)))
        return max(1, math.ceil(self.capacity_factor * self.k * tokens / self.num_experts))

    @property
    def batch_dependent(self) -> bool:
        """Whether a sample's routing depends on the other samples of its batch."""
        return self.router_type == "expert_choice" and self.group == "batch"

    def _expert_choice(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Expert choice on scores [N, T, E] (softmax over experts): every expert takes the top
        ``capacity`` tokens of its group by its score. Returns assign [N, T, E] (e where expert e took
        the token, else EMPTY_SLOT; -1 in slot 0 of a token no expert took) and weights [N, T, E]
        (the score where taken, else 0). Ties go to the earlier token (raster order, then sample)."""
        n, t, e = scores.shape
        groups = scores.reshape(1, n * t, e) if self.group == "batch" else scores
        cap = self.capacity(groups.shape[1])
        # stable descending order: equal scores keep raster order, so the choice never depends on sort internals
        order = torch.sort(groups.transpose(1, 2), dim=-1, descending=True, stable=True).indices[..., :cap]
        taken = torch.zeros_like(groups.transpose(1, 2), dtype=torch.bool).scatter(-1, order, True)
        taken = taken.transpose(1, 2).reshape(n, t, e)
        experts = torch.arange(e, device=scores.device).expand(n, t, e)
        assign = torch.where(taken, experts, torch.full_like(experts, EMPTY_SLOT))
        assign[..., 0] = torch.where(taken.any(-1), assign[..., 0], torch.full_like(assign[..., 0], -1))
        return assign, torch.where(taken, scores, torch.zeros_like(scores))

    def route(self, z: Tensor, noisy: bool) -> Routing:
        """Routing of tokens z [N, T, C]; ``noisy`` adds Shazeer's noise (training)."""
        clean = self.router(z)
        noise_std = None
        if self.router_type == "expert_choice":
            probs = clean.softmax(-1)
            assign, weights = self._expert_choice(probs)
            return Routing(assign, weights, clean, clean, None, probs)
        if self.router_type == "switch":
            probs = clean.softmax(-1)
            weights, choice = probs.max(-1, keepdim=True)
            logits = clean
        else:
            probs = None
            logits = clean
            if noisy:
                noise_std = F.softplus(self.noise(z)) + self.noise_epsilon
                logits = clean + torch.randn_like(clean) * noise_std
            top_vals, choice = logits.topk(self.k, dim=-1)
            weights = top_vals.softmax(-1)
        assign = self._apply_capacity(choice)
        return Routing(assign, weights, clean, logits, noise_std, probs)

    def _apply_capacity(self, choice: Tensor) -> Tensor:
        cap = self.capacity(choice.shape[1])
        if cap is None:
            return choice
        n, t, k = choice.shape
        one_hot = F.one_hot(choice, self.num_experts)  # [N, T, k, E]
        order = one_hot.transpose(1, 2).reshape(n, k * t, self.num_experts)  # choice-major, then raster
        position = ((order.cumsum(1) - 1) * order).sum(-1)  # rank of each assignment at its expert
        keep = (position < cap).reshape(n, k, t).transpose(1, 2)
        return torch.where(keep, choice, torch.full_like(choice, -1))

    def forward(self, h: Tensor, mode: str = "compact", probe: int | None = None, noisy: bool | None = None,
                min_weight: float = 0.0) -> tuple[Tensor, Routing]:
        """Returns the new feature map and the routing (:meth:`forward_tokens` on its H x W positions)."""
        n, c, hh, ww = h.shape
        out, routing = self.forward_tokens(h.flatten(2).transpose(1, 2), mode, probe, noisy, min_weight)
        return out.transpose(1, 2).reshape(n, c, hh, ww), routing

    def forward_tokens(self, tokens: Tensor, mode: str = "compact", probe: int | None = None,
                       noisy: bool | None = None, min_weight: float = 0.0) -> tuple[Tensor, Routing]:
        """Tokens [N, T, C] -> the new tokens and the routing. ``probe``: cost probing; route, run no
        expert (-1) or expert ``probe`` on one token, and return ``tokens`` unchanged. ``min_weight``:
        (token, choice) pairs whose routing weight is below it are dropped like capacity drops."""
        n, t, c = tokens.shape
        z = self.norm(tokens)
        routing = self.route(z, self.training if noisy is None else noisy)
        if min_weight > 0:
            routing.assign = torch.where((routing.weights < min_weight) & (routing.assign >= 0), -1, routing.assign)
        if probe is not None:
            if probe >= 0:
                self.experts[probe](z.reshape(-1, c)[:1])
            return tokens, routing
        flat_z = z.reshape(-1, c)
        assign = routing.assign.reshape(n * t, -1)
        weights = routing.weights.reshape(n * t, -1)
        out = tokens.reshape(-1, c)
        for e, expert in enumerate(self.experts):
            chosen = assign == e  # [N*T, k]
            if mode == "mask":
                out = out + expert(flat_z) * (weights * chosen).sum(1, keepdim=True)
                continue
            tok, slot = chosen.nonzero(as_tuple=True)
            if tok.numel():
                # under autocast the expert may return bf16 where the stream is fp32 (after a LayerNorm)
                out = out.index_add(0, tok, (expert(flat_z[tok]) * weights[tok, slot, None]).to(out.dtype))
        return out.reshape(n, t, c), routing


# ----- the classifier --------------------------------------------------------------------------------

class MoENetwork(DynamicModel):
    """What every MoE classifier shares: its MoE layers (``self.moe``), routing settings, trace, cost
    units, balancing losses and active parameters. A subclass builds its network, calls
    :meth:`_setup_moe` and runs it in ``_run(x, mode, probe, min_weight) -> (logits, routings)``."""

    dynamic_kind = "routed"
    num_exits = 1

    def _setup_moe(self, layers: list[MoELayer], router: str, num_experts: int, capacity_factor: float | None,
                   group: str, router_init: str | None, importance_weight: float, load_weight: float,
                   balance_weight: float, head: str) -> None:
        self.moe = nn.ModuleList(layers)
        self.router_init = router_init or ("zero" if router == "noisy_topk" else "fedus")
        for layer in self.moe:
            layer.init_router(self.router_init)
        self.router_type, self.num_experts, self.k = router, num_experts, self.moe[0].k
        self.capacity_factor, self.group = capacity_factor, group
        # expert choice over the batch's tokens: a sample's route depends on its batch
        # (fractalbench.harness.contract.batch_dependent)
        self.batch_dependent = self.moe[0].batch_dependent
        # MACs by role (fractalbench.harness.contract.cost_roles); the switch router has no noise projection
        self.cost_roles = {"heads": (head,),
                           "routers": ("moe.*.router",) + (("moe.*.noise",) if router == "noisy_topk" else ())}
        self.importance_weight, self.load_weight, self.balance_weight = importance_weight, load_weight, balance_weight

    def _run(self, x: Tensor, mode: str = "compact", probe: tuple[int, int] | None = None, min_weight: float = 0.0
             ) -> tuple[Tensor, list[Routing]]:
        raise NotImplementedError

    def _trace(self, x: Tensor, routings: list[Routing], mode: str) -> Trace:
        n = x.shape[0]
        counts = {"base": torch.ones(n, device=x.device)}
        for layer, r in enumerate(routings):
            tokens = r.assign.shape[1]
            for e in range(self.num_experts):
                counts[f"layer{layer}_expert{e}"] = (torch.full((n,), float(tokens), device=x.device) if mode == "mask"
                                                 else (r.assign == e).flatten(1).sum(1).float())
        experts = torch.stack([r.assign.flatten(1) for r in routings], 1)
        return Trace(torch.zeros(n, dtype=torch.long, device=x.device), counts, experts=experts)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x)[0]

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.forward(x)]

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:
        """The only exit: the routed forward (each token runs its chosen experts)."""
        check_exit_index(self, exit_index)
        return self.forward(x)

    def dynamic_forward(self, x: Tensor, policy: Any = None, mode: str = "compact") -> DynamicOutput:
        """Logits and trace; the routers decide. ``policy``: None (every chosen expert runs) or a
        ``decision_threshold`` t: a chosen expert runs on a token only when its weight is >= t."""
        logits, routings = self._run(x, check_mode(mode), min_weight=decision_threshold(policy, 0.0))
        return DynamicOutput(logits, self._trace(x, routings, mode))

    def loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``cross_entropy`` plus ``importance`` and ``load`` (noisy top-k) or ``load_balancing``
        (switch), each summed over the MoE layers, over all tokens of the batch."""
        logits, routings = self._run(x)
        terms = {"cross_entropy": F.cross_entropy(logits, y)}
        e = self.num_experts
        if self.router_type == "expert_choice":  # balanced by construction: no auxiliary loss
            return terms
        if self.router_type == "switch":
            losses = [switch_balancing_loss(r.probs.reshape(-1, e), r.clean_logits.reshape(-1, e).argmax(-1))
                      for r in routings]
            terms["load_balancing"] = self.balance_weight * sum(losses)
            return terms
        imp, load = [], []
        for r in routings:
            flat = r.noisy_logits.reshape(-1, e)
            top_vals, top_idx = flat.topk(self.k, dim=-1)
            dense = torch.zeros_like(flat).scatter(1, top_idx, top_vals.softmax(-1))  # gate values, pre-capacity
            imp.append(cv_squared(importance(dense)))
            if r.noise_std is not None:
                std = r.noise_std.reshape(-1, e)
                load.append(cv_squared(smooth_load(r.clean_logits.reshape(-1, e), flat, std, self.k)))
            else:
                load.append(cv_squared((dense > 0).float().sum(0)))
        terms["importance"] = self.importance_weight * sum(imp)
        terms["load"] = self.load_weight * sum(load)
        return terms

    def cost_units(self) -> list[CostUnit]:
        units = [CostUnit("base", lambda x: self._run(x, probe=(-1, -1)))]
        units += [CostUnit(f"layer{layer}_expert{e}", lambda x, layer=layer, e=e: self._run(x, probe=(layer, e)),
                           baseline="base")
                  for layer in range(len(self.moe)) for e in range(self.num_experts)]
        return units

    def expert_compute(self, trace: Trace, table: Any, batch_size: int) -> list[dict[str, Any]]:
        """Useful against padded expert compute per MoE layer (the sparse accounting MoE-CAP asks for),
        from a trace of :meth:`dynamic_forward` and the cost table (per-token expert MACs are the
        ``layer{l}_expert{e}`` units). Per layer: ``useful`` [N] float64, the MACs of the (token,
        expert) pairs routed, what the compact dispatch runs; ``padded`` [N], what a static-shape
        dispatch (every expert a buffer of fixed size, GShard/Switch style) runs for the same routes:
        ``capacity x sum_e MACs_e`` per sample where the capacity is per sample; expert choice over the
        batch: capacity(B x T) per dispatch group of B samples (the evaluation batches, consecutive
        samples of the trace, the last one smaller), shared by its samples; no capacity: every expert's
        buffer the busiest expert's load in the batch. ``dropped``: (token, choice) assignments no
        expert ran (capacity or decision threshold; expert choice: tokens no expert took) out of
        ``routable`` (N T k; expert choice N T)."""
        if trace.experts is None:
            raise ValueError("this trace has no expert assignments (not from a routed model)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        experts = trace.experts.detach().cpu().long()
        n, e = experts.shape[0], self.num_experts
        groups = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
        out = []
        for index, layer in enumerate(self.moe):
            assign = experts[:, index]  # [N, S]
            tokens = assign.shape[1] // layer.k  # expert choice: k = E slots per token
            macs = torch.tensor([float(table[f"layer{index}_expert{j}"]) for j in range(e)], dtype=torch.float64)
            counts = (assign[:, :, None] == torch.arange(e)).sum(1).double()  # [N, E]
            useful, padded = counts @ macs, torch.zeros(n, dtype=torch.float64)
            batch_groups = layer.capacity_factor is None or layer.batch_dependent
            for start, stop in groups if batch_groups else [(0, n)]:
                size = stop - start
                if layer.capacity_factor is None:
                    slots = float(counts[start:stop].sum(0).max()) / size  # the busiest expert's load, shared
                elif layer.batch_dependent:
                    slots = layer.capacity(size * tokens) / size
                else:
                    slots = float(layer.capacity(tokens))
                padded[start:stop] = slots * float(macs.sum())
            routable = n * tokens * (1 if layer.router_type == "expert_choice" else layer.k)
            out.append({"layer": index, "useful": useful, "padded": padded, "dropped": int((assign == -1).sum()),
                        "routable": routable, "tokens": tokens,
                        "capacity": None if layer.capacity_factor is None else (
                            layer.capacity(batch_size * tokens) if layer.batch_dependent else layer.capacity(tokens)),
                        "dispatch": f"per batch of {batch_size}" if batch_groups else "per sample"})
        return out

    def active_parameters(self) -> int:
        """Parameters on one token's inference path: every parameter outside the expert banks
        except the routers' training-only noise projections, plus k experts per MoE layer.
        (A sample's different tokens may use different experts; this is the per-token count, the
        usual MoE definition.) Expert choice: a token meets capacity_factor experts on average (at
        full capacity the experts take capacity_factor x tokens assignments), so capacity_factor
        experts per layer, rounded to whole parameters. A parameter shared by a dense layer and an
        expert (an upcycled ViT's expert 0) counts once, as the expert's."""
        expert_params = {id(p) for layer in self.moe for p in layer.experts.parameters()}
        total = sum(p.numel() for p in self.parameters() if id(p) not in expert_params)
        for layer in self.moe:
            if layer.noise is not None:
                total -= layer.noise.weight.numel()
            sizes = sorted((sum(p.numel() for p in ex.parameters()) for ex in layer.experts), reverse=True)
            if layer.router_type == "expert_choice":
                total += round(float(layer.capacity_factor) * sum(sizes) / len(sizes))
            else:
                total += sum(sizes[:layer.k])
        return total


class MoEResNet(MoENetwork):
    """CIFAR ResNet-(6n+2) with ``moe_layers`` MoE layers after the last blocks of stage 3."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, *, router: str = "noisy_topk",
                 num_experts: int = 4, k: int = 2, expansion: int = 4, moe_layers: int = 2,
                 capacity_factor: float | None = None, importance_weight: float = 0.1, load_weight: float = 0.1,
                 balance_weight: float = 0.01, noise_epsilon: float = 1e-2, router_init: str | None = None,
                 group: str = "batch") -> None:
        super().__init__()
        self.backbone = CifarResNet(depth, num_classes, in_chans)
        stage3 = len(self.backbone.layer3)
        if not 1 <= moe_layers <= stage3:
            raise ValueError(f"moe_layers must be in 1..{stage3} (blocks of stage 3), got {moe_layers}")
        width = self.backbone.widths[-1]
        self.moe_after = tuple(range(stage3 - moe_layers, stage3))  # block indices in stage 3
        layers = [MoELayer(width, num_experts, k, router, expansion, capacity_factor, noise_epsilon, group)
                  for _ in range(moe_layers)]
        self._setup_moe(layers, router, num_experts, capacity_factor, group, router_init, importance_weight,
                        load_weight, balance_weight, head="backbone.head")

    def dense_backbone(self) -> CifarResNet:
        """The ResNet the MoE layers are inserted into (a ResNet checkpoint loads into it)."""
        return self.backbone

    def on_backbone_loaded(self) -> None:
        """Sparse upcycling (Komatsuzaki et al., ICLR 2023) from a dense ResNet: every expert's output
        layer starts at zero, so each MoE layer adds nothing and the model computes exactly the dense
        network's function (the dense network's feed-forward at each MoE position is the identity
        residual, copied into every expert as the zero map); the routers keep their initialisation,
        and the experts' first layers their random ones, which break the experts' symmetry."""
        for layer in self.moe:
            for expert in layer.experts:
                nn.init.zeros_(expert.fc2.weight)
                nn.init.zeros_(expert.fc2.bias)

    def _run(self, x: Tensor, mode: str = "compact", probe: tuple[int, int] | None = None, min_weight: float = 0.0
             ) -> tuple[Tensor, list[Routing]]:
        b = self.backbone
        h = b.layer2(b.layer1(b.stem(x)))
        routings: list[Routing] = []
        for j, block in enumerate(b.layer3):
            h = block(h)
            if j in self.moe_after:
                layer = len(routings)
                p = None if probe is None else (probe[1] if probe[0] == layer else -1)
                h, routing = self.moe[layer](h, mode, p, min_weight=min_weight)
                routings.append(routing)
        return b.head(h), routings


class MoEViT(MoENetwork):
    """ViT-Lite (:mod:`fractalbench.baselines.vit`) whose MLP in every ``moe_every``-th encoder layer
    (layers ``moe_every - 1``, ``2 moe_every - 1``, ..., the Switch / V-MoE placement) is a mixture of
    MLP experts routed per token: the class token and every patch token choose (or are chosen by)
    their experts. ViT-Lite's layer ``x = LN(x + Attention(LN(x))); x = x + MLP(x)`` becomes
    ``x = LN(x + Attention(LN(x))); x = x + sum_s w_s Expert_s(x)``: no extra norm (the stream is
    normalised already), GELU experts of the MLP's size. Expert 0 of every MoE layer *is* that
    layer's dense MLP (the same modules), so a dense ViT-Lite checkpoint loads into
    :meth:`dense_backbone` and :meth:`on_backbone_loaded` upcycles it (Komatsuzaki et al.: every
    expert a copy of the dense MLP); no dense parameter is left unused."""

    def __init__(self, depth: int = 7, dim: int = 256, heads: int = 4, mlp_ratio: float = 2.0, patch: int = 4,
                 img_size: int = 32, num_classes: int = 10, in_chans: int = 3, *, router: str = "switch",
                 num_experts: int = 4, k: int = 1, moe_every: int = 2, capacity_factor: float | None = 1.25,
                 importance_weight: float = 0.1, load_weight: float = 0.1, balance_weight: float = 0.01,
                 noise_epsilon: float = 1e-2, router_init: str | None = None, group: str = "batch") -> None:
        super().__init__()
        from fractalbench.baselines.vit import VisionTransformerLite

        self.backbone = VisionTransformerLite(depth, dim, heads, mlp_ratio, patch, img_size, num_classes, in_chans)
        if not 1 <= moe_every <= depth:
            raise ValueError(f"moe_every must be in 1..{depth} (encoder layers), got {moe_every}")
        self.moe_at = tuple(j for j in range(depth) if j % moe_every == moe_every - 1)
        layers = []
        for j in self.moe_at:
            layer = MoELayer(dim, num_experts, k, router, mlp_ratio, capacity_factor, noise_epsilon, group,
                             norm=False, activation="gelu")
            block = self.backbone.blocks[j]
            layer.experts[0].fc1, layer.experts[0].fc2 = block.linear1, block.linear2  # expert 0 is the dense MLP
            layers.append(layer)
        self._setup_moe(layers, router, num_experts, capacity_factor, group, router_init, importance_weight,
                        load_weight, balance_weight, head="backbone.head")

    def dense_backbone(self) -> nn.Module:
        """The dense ViT-Lite (its MLPs at the MoE layers are expert 0 of each)."""
        return self.backbone

    def on_backbone_loaded(self) -> None:
        """Sparse upcycling (Komatsuzaki et al., ICLR 2023): every expert starts as a copy of the dense
        MLP it replaces (expert 0 is that MLP); the routers keep their initialisation. With top-1
        routing scaled by its probability the upcycled layer starts at about 1/E of the dense MLP's
        output, as in the paper's Switch-style layers, and fine-tuning restores it."""
        with torch.no_grad():
            for layer in self.moe:
                dense = layer.experts[0]
                for expert in list(layer.experts)[1:]:
                    expert.load_state_dict(dense.state_dict())

    def _run(self, x: Tensor, mode: str = "compact", probe: tuple[int, int] | None = None, min_weight: float = 0.0
             ) -> tuple[Tensor, list[Routing]]:
        v = self.backbone
        h = v.embed(x)
        routings: list[Routing] = []
        for j, block in enumerate(v.blocks):
            if j not in self.moe_at:
                h = block(h)
                continue
            h = block.norm1(h + block.drop_path(block.self_attn(block.pre_norm(h))))
            layer = len(routings)
            p = None if probe is None else (probe[1] if probe[0] == layer else -1)
            out, routing = self.moe[layer].forward_tokens(h, mode, p, min_weight=min_weight)
            h = h + block.drop_path(out - h)
            routings.append(routing)
        return v.head(h), routings


def expert_histogram(trace: Trace, num_experts: int) -> tuple[Tensor, Tensor]:
    """Expert load from a trace: counts [L, E] of assignments per expert and dropped [L]."""
    if trace.experts is None:
        raise ValueError("this trace has no expert assignments (not from a routed model)")
    ex = trace.experts.transpose(0, 1).reshape(trace.experts.shape[1], -1)  # [L, N*T]
    counts = torch.stack([torch.bincount(row[row >= 0], minlength=num_experts) for row in ex])
    return counts, (ex == -1).sum(1)


def _card(paper: str, notes: str) -> ModelCard:
    return ModelCard(family="moe", paper=paper, dynamic_kind="routed", input_size=32, reference={},
                     reference_source="no published CIFAR numbers for this build (the papers are language models)",
                     notes=notes, paper_recipe="none: the papers train language models and give no CIFAR recipe; "
                     "a suite states its own")


@register_model(card=_card(SHAZEER, "ResNet-20 + 2 token-wise MoE FFN layers (4 experts, expansion 4) after the last "
                                    "two blocks of stage 3; noisy top-2 gating, no capacity limit; importance and load "
                                    "losses (w=0.1); router and noise projections start at zero as in the paper "
                                    "(router_init='torch': nn.Linear's default)."))
def moe_resnet20_top2(*, num_classes: int = 10, in_chans: int = 3, num_experts: int = 4, k: int = 2, expansion: int = 4,
                      moe_layers: int = 2, capacity_factor: float | None = None, importance_weight: float = 0.1,
                      load_weight: float = 0.1, router_init: str = "zero") -> MoEResNet:
    return MoEResNet(20, num_classes, in_chans, router="noisy_topk", num_experts=num_experts, k=k, expansion=expansion,
                     moe_layers=moe_layers, capacity_factor=capacity_factor, importance_weight=importance_weight,
                     load_weight=load_weight, router_init=router_init)


@register_model(card=_card(FEDUS, "ResNet-20 + 2 token-wise MoE FFN layers (4 experts, expansion 4) after the last two "
                                  "blocks of stage 3; Switch top-1 routing, capacity factor 1.25 per sample's tokens; "
                                  "load-balancing loss (w=0.01); router starts from a truncated normal with std "
                                  "sqrt(0.1 / fan_in) as in the paper (router_init='torch': nn.Linear's default)."))
def switch_resnet20(*, num_classes: int = 10, in_chans: int = 3, num_experts: int = 4, expansion: int = 4,
                    moe_layers: int = 2, capacity_factor: float | None = 1.25,
                    balance_weight: float = 0.01, router_init: str = "fedus") -> MoEResNet:
    return MoEResNet(20, num_classes, in_chans, router="switch", num_experts=num_experts, k=1, expansion=expansion,
                     moe_layers=moe_layers, capacity_factor=capacity_factor, balance_weight=balance_weight,
                     router_init=router_init)


@register_model(card=_card(ZHOU, "ResNet-20 + 2 token-wise MoE FFN layers (4 experts, expansion 4) after the last "
                                 "two blocks of stage 3; expert-choice routing with capacity factor 2 (the paper's "
                                 "EC-CF2: each expert takes ceil(2 x tokens / 4) of the tokens of the batch, so a "
                                 "sample's route depends on its batch; group='sample' routes within each sample); no "
                                 "auxiliary loss; router from a truncated normal (std sqrt(0.1 / fan_in)). The paper "
                                 "(language models, 8B/64E) reports more than 2x faster training convergence than "
                                 "Switch top-1 and GShard top-2 gating; it has no image-classification numbers."))
def expert_choice_resnet20(*, num_classes: int = 10, in_chans: int = 3, num_experts: int = 4, expansion: int = 4,
                           moe_layers: int = 2, capacity_factor: float = 2.0, group: str = "batch",
                           router_init: str = "fedus") -> MoEResNet:
    return MoEResNet(20, num_classes, in_chans, router="expert_choice", num_experts=num_experts, k=1,
                     expansion=expansion, moe_layers=moe_layers, capacity_factor=capacity_factor,
                     router_init=router_init, group=group)


VIT_MOE_NOTES = (
    "ViT-Lite-{size} with the MLP of every second encoder layer ({layers}) replaced by {what}, routed per token "
    "(the class token and the 64 patch tokens); 4 GELU experts of the MLP's size, expert 0 sharing the dense "
    "MLP's weights (a dense ViT-Lite checkpoint upcycles: every expert starts as its copy)")


def _vit_moe_card(paper: str, notes: str, input_size: int = 32) -> ModelCard:
    return ModelCard(family="moe", paper=f"{paper}; backbone: ViT-Lite (Hassani et al. 2021)", dynamic_kind="routed",
                     input_size=input_size, reference={},
                     reference_source="no published numbers for this build (V-MoE, Riquelme et al. 2021, routes "
                     "ImageNet-scale ViTs)", notes=notes,
                     paper_recipe="none published for CIFAR; a suite states its own")


@register_model(card=_vit_moe_card(FEDUS, VIT_MOE_NOTES.format(
    size="7/4", layers="1, 3, 5", what="a Switch layer (top-1, capacity factor 1.25 per image's tokens, "
    "load-balancing loss w=0.01)")))
def switch_vit_lite_7_4(*, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, num_experts: int = 4,
                        capacity_factor: float | None = 1.25, balance_weight: float = 0.01) -> MoEViT:
    return MoEViT(7, 256, 4, 2.0, 4, img_size, num_classes, in_chans, router="switch", num_experts=num_experts,
                  capacity_factor=capacity_factor, balance_weight=balance_weight)


@register_model(card=_vit_moe_card(ZHOU, VIT_MOE_NOTES.format(size="7/4", layers="1, 3, 5", what="an expert-choice "
                                   "layer (capacity factor 2: each expert takes ceil(2 x tokens / 4) of its group's "
                                   "tokens; group 'batch', or 'sample' for each image alone)")))
def expert_choice_vit_lite_7_4(*, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, num_experts: int = 4,
                               capacity_factor: float = 2.0, group: str = "batch") -> MoEViT:
    return MoEViT(7, 256, 4, 2.0, 4, img_size, num_classes, in_chans, router="expert_choice", num_experts=num_experts,
                  capacity_factor=capacity_factor, group=group)


@register_model(card=_vit_moe_card(FEDUS, VIT_MOE_NOTES.format(size="2/4 at 16x16", layers="1", what="a Switch layer")
                                   .replace("64 patch tokens", "16 patch tokens"), input_size=16))
def switch_vit_lite_2_4(*, num_classes: int = 10, in_chans: int = 3, img_size: int = 16, num_experts: int = 4,
                        capacity_factor: float | None = 1.25) -> MoEViT:
    return MoEViT(2, 128, 2, 1.0, 4, img_size, num_classes, in_chans, router="switch", num_experts=num_experts,
                  capacity_factor=capacity_factor)


@register_model(card=_vit_moe_card(ZHOU, VIT_MOE_NOTES.format(size="2/4 at 16x16", layers="1", what="an expert-choice "
                                   "layer").replace("64 patch tokens", "16 patch tokens"), input_size=16))
def expert_choice_vit_lite_2_4(*, num_classes: int = 10, in_chans: int = 3, img_size: int = 16, num_experts: int = 4,
                               capacity_factor: float = 2.0, group: str = "batch") -> MoEViT:
    return MoEViT(2, 128, 2, 1.0, 4, img_size, num_classes, in_chans, router="expert_choice", num_experts=num_experts,
                  capacity_factor=capacity_factor, group=group)
