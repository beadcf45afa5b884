"""Shallow-Deep Networks (Kaya, Hong and Dumitras, "Shallow-Deep Networks: Understanding and
Mitigating Network Overthinking", ICML 2019): internal classifiers (ICs) on any static backbone.

``create_model("sdn:BACKBONE")`` builds BACKBONE (any registered static model, e.g. ``resnet56`` or
``timm:resnet18``), splits it into sequential units, and attaches an IC after the units closest to
15%, 30%, 45%, 60%, 75% and 90% of the backbone's MACs (SDN places ICs by relative computational
cost). The result is a :class:`fractalbench.harness.early_exit.EarlyExitNetwork`: real early exit, compaction,
masking and cost units come from there; the last exit is the backbone's own head, so ``forward``
equals the backbone's forward with the same weights.

Splitting (:func:`split_backbone`):

- :class:`fractalbench.baselines.resnet.CifarResNet`: the stem, then every residual block; head = its head.
- timm models whose ``forward_features`` runs their children in order (ResNet, ResNeXt,
  EfficientNet, ConvNeXt, RegNet, ...): the children before the classifier (``global_pool``,
  ``fc``, ``classifier``, ``head``...), with ``nn.Sequential`` containers opened up to their
  blocks and consecutive leaf layers (conv, norm, activation, pooling) kept together as one unit;
  head = the remaining children. The split is checked on a probe input: running the units then the
  head must reproduce ``forward_features`` and ``forward`` (eval mode), else ValueError.
- vision transformers: this project's ViT-Lite (:mod:`fractalbench.baselines.vit`) and timm's
  ``VisionTransformer`` family: the token embedding (patches, class/register tokens, positions), then
  every encoder block; head = final norm + pooling + classifier (timm's fused attention is counted by
  the harness's formula for the CPU attention kernel). Their ICs are
  :class:`TokenClassifier`: LayerNorm, the class token (or the mean of the patch tokens where the
  model pools so), one linear layer; on ViT-Lite-7/4 the default placement gives an exit after
  every block;
- anything else (already-dynamic models, models with no structure to split) is refused with a
  ValueError that names the model.

ICs (``ic="mixed"``, SDN's): the feature map is reduced to 4x4 by alpha x max-pool + (1 - alpha) x
avg-pool with a learnt scalar alpha, flattened, then one FC layer. ``ic="linear"``: global average
pooling + FC. Exit loss weights (SDN training, Kaya et al. sec. 4.2): IC i's final weight is its
nominal position (0.15 ... 0.9), the final exit's is 1; with ``weight_ramp=True`` (default) the IC
weights rise linearly from 0.01 at the first epoch to their final values at the last (the trainer
calls :meth:`SDN.on_train_epoch` before every epoch); the final exit keeps weight 1 throughout.
Without the ramp the summed IC losses scale the early gradients by ~4.5x, which made SGD at lr 0.05
diverge on ResNet-56.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fractalbench.baselines.resnet import CifarResNet
from fractalbench.baselines.vit import VisionTransformerLite
from fractalbench.harness.contract import is_dynamic
from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.metrics._mac_formulas import EXTRA_FORMULAS
from fractalbench.harness.registry import ModelCard, create_model, model_card, recipe_text, register_prefix

PAPER = ("Kaya, Hong, Dumitras: Shallow-Deep Networks: Understanding and Mitigating Network Overthinking, "
         "ICML 2019")
SDN_FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
IC_KINDS = ("mixed", "linear")
PLACEMENTS = ("macs", "depth")
HEAD_CHILD_NAMES = frozenset({"global_pool", "fc", "classifier", "head", "head_drop", "fc_norm", "pre_logits",
                              "head_dist", "flatten"})


class MixedPoolClassifier(nn.Module):
    """SDN's internal classifier: alpha * maxpool + (1 - alpha) * avgpool to ``pool`` x ``pool``,
    flatten, FC. alpha is one learnt scalar (initialised uniformly in [0, 1), as in SDN)."""

    def __init__(self, channels: int, num_classes: int, pool: int = 4) -> None:
        super().__init__()
        self.pool = pool
        self.alpha = nn.Parameter(torch.rand(1))
        self.max_pool = nn.AdaptiveMaxPool2d(pool)
        self.avg_pool = nn.AdaptiveAvgPool2d(pool)
        self.linear = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.alpha * self.max_pool(x) + (1 - self.alpha) * self.avg_pool(x)
        return self.linear(mixed.flatten(1))


def linear_classifier(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class TokenClassifier(nn.Module):
    """An exit on a transformer's tokens [N, T, D]: LayerNorm, then the class token (``pool="token"``)
    or the mean of the tokens after the ``prefix`` class/register tokens (``pool="avg"``), then one
    linear layer (the exits of ViT early-exit work: SDN-style ICs on ViTs, ZTW's ViT heads)."""

    def __init__(self, dim: int, num_classes: int, pool: str = "token", prefix: int = 1) -> None:
        super().__init__()
        if pool not in ("token", "avg"):
            raise ValueError(f"token pooling {pool!r} is not one of token, avg")
        self.pool, self.prefix = pool, int(prefix)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return self.fc(x[:, 0] if self.pool == "token" else x[:, self.prefix:].mean(dim=1))


class _TimmViTEmbedding(nn.Module):
    """Unit 0 of a timm VisionTransformer: patch embedding, class/register tokens and positions
    (its ``_pos_embed``), patch dropout, pre-norm. Holds the model's own modules and parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.patch_embed, self.pos_drop = model.patch_embed, model.pos_drop
        self.patch_drop, self.norm_pre = model.patch_drop, model.norm_pre
        for name in ("pos_embed", "cls_token", "reg_token"):
            if isinstance(getattr(model, name, None), nn.Parameter):
                self.register_parameter(name, getattr(model, name))
        self.__dict__["_vit"] = model  # not a child: its blocks belong to the other units

    def forward(self, x: Tensor) -> Tensor:
        vit = self.__dict__["_vit"]
        return self.norm_pre(self.patch_drop(vit._pos_embed(self.patch_embed(x))))


class _TimmViTHead(nn.Module):
    """The last unit of a timm VisionTransformer's split: its final norm and its ``forward_head``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.norm, self.fc_norm, self.head_drop, self.head = model.norm, model.fc_norm, model.head_drop, model.head
        if getattr(model, "attn_pool", None) is not None:
            self.attn_pool = model.attn_pool
        self.__dict__["_vit"] = model

    def forward(self, x: Tensor) -> Tensor:
        return self.__dict__["_vit"].forward_head(self.norm(x))


def _is_timm_vit(model: nn.Module) -> bool:
    return (all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "blocks", "forward_head", "norm"))
            and isinstance(model.blocks, nn.Sequential))


def _split_timm_vit(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """A timm VisionTransformer: embedding, every block, head."""
    return [_TimmViTEmbedding(model), *model.blocks], _TimmViTHead(model)


# ----- splitting a backbone into sequential units -------------------------------------------------

def _open_sequentials(module: nn.Module) -> list[nn.Module]:
    if type(module) is nn.Sequential:
        return [m for child in module for m in _open_sequentials(child)]
    return [module]


def _group_leaves(modules: list[nn.Module]) -> list[nn.Module]:
    """Consecutive leaf layers (no children: conv, norm, activation, pooling) become one unit."""
    units: list[nn.Module] = []
    run: list[nn.Module] = []
    for m in modules:
        if next(m.children(), None) is None:
            run.append(m)
            continue
        if run:
            units.append(nn.Sequential(*run))
            run = []
        units.append(m)
    if run:
        units.append(nn.Sequential(*run))
    return units


def _split_timm(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    children = list(model.named_children())
    cut = next((i for i, (name, _) in enumerate(children) if name in HEAD_CHILD_NAMES), None)
    if cut is None or cut == 0:
        raise ValueError("found no classifier children (global_pool/fc/classifier/head) to split at")
    body = [m for _, child in children[:cut] for m in _open_sequentials(child)]
    head_children = [child for _, child in children[cut:]]
    names = [name for name, _ in children[cut:]]
    drop = float(getattr(model, "drop_rate", 0.0) or 0.0)
    if drop and len(names) == 2 and names[0] == "global_pool":
        head_children.insert(1, nn.Dropout(drop))  # timm's forward_head applies F.dropout there
    return _group_leaves(body), nn.Sequential(*head_children)


def split_backbone(model: nn.Module, probe: Tensor | None = None) -> tuple[list[nn.Module], nn.Module]:
    """Sequential units and the head of a static backbone, such that
    ``head(units[-1](...units[0](x)))`` equals ``model(x)``. Raises ValueError when it cannot."""
    name = type(model).__name__
    if is_dynamic(model):
        raise ValueError(f"SDN wraps static backbones; {name} is already a dynamic model")
    if isinstance(model, CifarResNet):
        return [model.stem, *model.layer1, *model.layer2, *model.layer3], model.head
    if isinstance(model, VisionTransformerLite):
        return [model.embed, *model.blocks], model.head
    if _is_timm_vit(model):
        units, head = _split_timm_vit(model)
        if probe is not None:
            _verify_split(model, units, head, probe)
        return units, head
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(f"cannot split {name} into sequential stages: SDN supports CIFAR ResNets and timm models "
                         "whose forward_features runs their children in order (ResNet-style)")
    try:
        units, head = _split_timm(model)
    except ValueError as exc:
        raise ValueError(f"cannot split {name} into sequential stages: {exc}") from None
    if probe is not None:
        _verify_split(model, units, head, probe)
    return units, head


def _verify_split(model: nn.Module, units: list[nn.Module], head: nn.Module, probe: Tensor) -> None:
    name = type(model).__name__
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = probe
            for unit in units:
                h = unit(h)
            features = model.forward_features(probe)
            if isinstance(head, _TimmViTHead):  # the final norm is the head's: compare before it
                ok = torch.allclose(head.norm(h), features, rtol=1e-4, atol=1e-5)
            else:
                ok = torch.allclose(h, features, rtol=1e-4, atol=1e-5)
            ok = ok and torch.allclose(head(h), model(probe), rtol=1e-4, atol=1e-5)
    except Exception as exc:  # noqa: BLE001 - any failure means the children are not a sequential split
        raise ValueError(f"cannot split {name} into sequential stages: running its children in order failed "
                         f"({type(exc).__name__}: {exc})") from None
    finally:
        model.train(was_training)
    if not ok:
        raise ValueError(f"cannot split {name} into sequential stages: running its children in order does not "
                         "reproduce its forward (its forward does more than call them in sequence)")


def _profile_units(units: Sequence[nn.Module], head: nn.Module, probe: Tensor) -> tuple[list[int], list[int]]:
    """MACs of every unit and the head, and the channels after every unit (batch-1 probe, eval mode):
    a feature map's channels [N, C, H, W], a token sequence's dimension D [N, T, D]."""
    macs, channels = [], []
    modules = [*units, head]
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            h = probe
            for unit in modules:
                with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
                    h = unit(h)
                macs.append(counter.get_total_flops() // 2)
                if unit is not head:
                    channels.append(int(h.shape[-1] if h.dim() == 3 else h.shape[1]))
    finally:
        for m, s in zip(modules, states):
            m.train(s)
    return macs, channels


def place_ics(unit_macs: Sequence[int], fractions: Sequence[float], by: str = "macs",
              first: int = 0) -> list[tuple[int, float]]:
    """(unit index, nominal fraction) for each IC: the unit whose cumulative share of the network's
    MACs (``by="macs"``, head included) or of its units (``by="depth"``) is closest to the fraction.
    Never before unit ``first`` (a transformer's class token after the embedding alone is the same for
    every image) nor after the last unit (the backbone's own exit is there); duplicates keep the first
    fraction."""
    if by not in PLACEMENTS:
        raise ValueError(f"IC placement {by!r} is not one of {', '.join(PLACEMENTS)}")
    n_units = len(unit_macs) - 1  # the last entry is the head
    if n_units < 2 + first:
        raise ValueError(f"the backbone has fewer than {2 + first} units: no room for an internal classifier")
    weights = [float(m) for m in unit_macs[:-1]] if by == "macs" else [1.0] * n_units
    total = sum(unit_macs) if by == "macs" else float(n_units)
    cum, acc = [], 0.0
    for w in weights:
        acc += w
        cum.append(acc / total)
    chosen: dict[int, float] = {}
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"IC positions are fractions in (0, 1), got {f}")
        i = min(range(first, n_units - 1), key=lambda j: (abs(cum[j] - f), j))
        chosen.setdefault(i, float(f))
    return sorted(chosen.items())


class SDN(EarlyExitNetwork):
    """A static backbone with internal classifiers; see the module docstring.

    ``ic_units``: index of the unit each IC follows; ``ic_fractions``: the nominal position of each.
    ``tokens``: (pooling, prefix tokens) when the units pass on transformer tokens; the ICs are then
    :class:`TokenClassifier` (``ic`` applies to feature maps only).
    """

    paper_policy = "confidence"

    def __init__(self, units: Sequence[nn.Module], head: nn.Module, num_classes: int, channels: Sequence[int],
                 positions: Sequence[tuple[int, float]], ic: str = "mixed",
                 exit_weights: Sequence[float] | None = None, backbone_name: str = "",
                 weight_ramp: bool = True, backbone: nn.Module | None = None,
                 tokens: tuple[str, int] | None = None) -> None:
        if ic not in IC_KINDS:
            raise ValueError(f"ic {ic!r} is not one of {', '.join(IC_KINDS)}")
        stages, heads, start = [], [], 0
        for unit_index, _ in positions:
            stages.append(nn.Sequential(*units[start:unit_index + 1]))
            c = channels[unit_index]
            if tokens is not None:  # a transformer's tokens: LayerNorm + class token (or mean) + linear
                heads.append(TokenClassifier(c, num_classes, *tokens))
            elif ic == "mixed":
                heads.append(MixedPoolClassifier(c, num_classes))
            else:
                heads.append(linear_classifier(c, num_classes))
            start = unit_index + 1
        stages.append(nn.Sequential(*units[start:]))
        heads.append(head)
        weights = list(exit_weights) if exit_weights is not None else [f for _, f in positions] + [1.0]
        super().__init__(stages, heads, weights)
        self.ic_units = [i for i, _ in positions]
        self.ic_fractions = [f for _, f in positions]
        self.backbone_name = backbone_name
        self.final_exit_weights = list(self.exit_weights)
        self.weight_ramp = bool(weight_ramp)
        self.__dict__["_dense"] = backbone  # not a registered child: its modules are the units' own

    def dense_backbone(self) -> nn.Module | None:
        """The static backbone whose modules the units and the last head are (its checkpoint loads into it)."""
        return self.__dict__.get("_dense")

    def on_train_epoch(self, epoch: int, epochs: int) -> None:
        """SDN's weight schedule: IC weights from 0.01 (first epoch) linearly to their final values
        (last epoch); the last exit's weight stays. Called by the trainer before each epoch."""
        if not self.weight_ramp:
            return
        t = epoch / (epochs - 1) if epochs > 1 else 1.0
        ics = [RAMP_START + (w - RAMP_START) * t for w in self.final_exit_weights[:-1]]
        self.exit_weights = ics + self.final_exit_weights[-1:]


RAMP_START = 0.01


def _token_pooling(backbone: nn.Module) -> tuple[str, int] | None:
    """(pooling, prefix tokens) of a vision transformer's exits, None for a CNN."""
    if isinstance(backbone, VisionTransformerLite):
        return "token", 1
    if _is_timm_vit(backbone):
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        return ("token" if getattr(backbone, "global_pool", "token") == "token" and prefix else "avg"), prefix
    return None


def _image_size(backbone: nn.Module) -> int | None:
    """The input side a vision transformer was built for (its positional embedding's grid)."""
    if isinstance(backbone, VisionTransformerLite):
        return backbone.img_size
    size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    return int(size[0]) if isinstance(size, (tuple, list)) else (int(size) if size else None)


def _probe(backbone: nn.Module, in_chans: int, probe_size: int | None) -> Tensor:
    if probe_size is None:
        probe_size = 32 if isinstance(backbone, CifarResNet) else (_image_size(backbone) or 64)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, in_chans, probe_size, probe_size, generator=gen)


def build_sdn(backbone_name: str, *, num_classes: int = 10, in_chans: int = 3,
              ic_fractions: Sequence[float] = SDN_FRACTIONS, ic_after: Sequence[int] | None = None,
              placement: str = "macs", ic: str = "mixed", exit_weights: Sequence[float] | None = None,
              probe_size: int | None = None, weight_ramp: bool = True, **backbone_kwargs: Any) -> SDN:
    """SDN on a registered backbone. ``ic_after``: explicit unit indices (overrides ``ic_fractions``);
    ``probe_size``: input side used to profile and check the split (default 32 for CIFAR ResNets, else 64)."""
    if backbone_name.startswith("sdn:"):
        raise ValueError(f"sdn:{backbone_name}: SDN cannot wrap another SDN")
    backbone = create_model(backbone_name, num_classes=num_classes, in_chans=in_chans, **backbone_kwargs)
    probe = _probe(backbone, in_chans, probe_size)
    try:
        units, head = split_backbone(backbone, probe)
    except ValueError as exc:
        raise ValueError(f"sdn:{backbone_name}: {exc}") from None
    unit_macs, channels = _profile_units(units, head, probe)
    tokens = _token_pooling(backbone)
    first = 1 if tokens is not None else 0  # unit 0 of a transformer is its embedding: no exit there
    if ic_after is not None:
        bad = [i for i in ic_after if not first <= int(i) < len(units) - 1]
        if bad:
            raise ValueError(f"sdn:{backbone_name}: ic_after {bad} out of range; units are 0..{len(units) - 1}, "
                             f"the last unit already ends in the backbone's head"
                             + (" and unit 0 is the token embedding (its class token is the same for every image)"
                                if first else ""))
        total = float(sum(unit_macs))
        positions = [(int(i), round(sum(unit_macs[:int(i) + 1]) / total, 4))
                     for i in sorted(set(int(i) for i in ic_after))]
    else:
        positions = place_ics(unit_macs, ic_fractions, placement, first)
    return SDN(units, head, num_classes, channels, positions, ic, exit_weights, backbone_name, weight_ramp, backbone,
               tokens=tokens)


NOTES = (
    "ICs after the units closest to 15/30/45/60/75/90% of the backbone's MACs (SDN's placement by relative "
    "cost; placement='depth' uses the unit count instead; duplicates collapse on short backbones). IC = "
    "SDN's feature reduction: alpha*maxpool + (1-alpha)*avgpool to 4x4 (adaptive pooling; SDN uses kernel "
    "size/4, the same for maps >= 4) + FC; maps smaller than 4 are upsampled by the adaptive pooling instead "
    "of flattened. Loss weights: IC i ramps linearly from 0.01 (first epoch) to its nominal fraction "
    "(0.15..0.9, last epoch), final exit = 1 throughout, as in SDN training (weight_ramp=False keeps the final "
    "values from the start). SDN's exit rule is max-softmax confidence "
    "(ConfidencePolicy). The backbone is trained jointly (SDN training) unless the suite says `freeze: backbone` "
    "(IC-only training on a trained backbone: its weights loaded with `weights:`)."
)


def _sdn_factory(rest: str, *, num_classes: int, in_chans: int, **kwargs: Any) -> SDN:
    return build_sdn(rest, num_classes=num_classes, in_chans=in_chans, **kwargs)


#: SDN training of CIFAR ResNets: yigitcankaya/Shallow-Deep-Networks network_architectures.py get_lr_params
#: (train_networks.py, aux_funcs.py get_full_optimizer, data.py).
SDN_RESNET_RECIPE = {"epochs": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                     "nesterov": False, "weight_decay": 1e-4, "schedule": "step", "milestones": (35, 60, 85),
                     "gamma": 0.1, "precision": "fp32"}
SDN_RECIPE_NOTE = (
    "SDN training (the backbone and the ICs from scratch, jointly) as in the authors' code: SGD with plain "
    "momentum, lr 0.1 /10 at epochs 35, 60 and 85 of 100, weight decay 1e-4 for ResNets (5e-4 for VGG and "
    "WRN), batch 128, random crop + horizontal flip, all 50k training images, ImageNet mean/std normalisation "
    "(the paper: 'We train the CNNs for 100 epochs, using the hyper-parameters the original studies describe'); "
    "IC-only training (frozen backbone, Adam 0.001, 25 epochs) is the paper's other mode: `weights:` a trained "
    "backbone and `train: {freeze: backbone}`")
SDN_REFERENCE = {"early_exit_cost_reduction_pct_min": 50.0}
SDN_SOURCE = (
    "SDN abstract (and the authors' README): confidence-based early exits 'reduce the average inference cost by "
    "more than 50% and preserve the accuracy' (a lower bound over its four networks and three datasets, not a "
    "ResNet-56 entry). The paper's per-network CIFAR-10/100 top-1 tables could not be confirmed from here, so no "
    "accuracy is on this card; backbone numbers are on the backbone's own card")


def _sdn_card(rest: str) -> ModelCard:
    if rest.startswith("sdn:"):
        raise ValueError(f"sdn:{rest}: SDN cannot wrap another SDN")
    base = model_card(rest)
    recipe = recipe_text(SDN_RESNET_RECIPE, SDN_RECIPE_NOTE) if base.family == "resnet" else ""
    return ModelCard(family="sdn", paper=f"{PAPER}; backbone: {base.paper}", dynamic_kind="early_exit",
                     input_size=base.input_size, in_chans=base.in_chans, notes=NOTES,
                     reference=dict(SDN_REFERENCE), reference_source=SDN_SOURCE, paper_recipe=recipe)


register_prefix("sdn", _sdn_factory, _sdn_card)
