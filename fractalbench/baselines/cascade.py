"""Cascades of separately trained networks (the survey's "cascading of DNNs": Han et al., Dynamic Neural
Networks: A Survey, 2021, section 2.1; Bolukbasi et al., Adaptive Neural Networks for Efficient
Inference, ICML 2017, whose network selection cascades AlexNet, GoogLeNet and ResNet on ImageNet).

A cascade runs its members in order on the same input: member 0 (the cheapest) first; a sample
whose prediction the exit policy accepts (max softmax probability, entropy or patience, thresholds
fitted on the validation split like every early-exit model's) leaves with member 0's answer, the
others go on to member 1, which starts again from the image, and so on; the last member answers for
whatever reaches it. So exit k's cost is members 0..k together (a sample that needed the big
network also paid for the small one), and a sample that left never enters a later member: in
compact mode the later members run on the remaining rows only (the shared early-exit cascade,
:class:`fractalbench.harness.early_exit.EarlyExitNetwork`, with a stage that passes the image on
and one member per exit).

Members are registered models by name (``members: [resnet20, resnet56]``), built with the cell's
classes and channels. Each member's trained weights load into it with ``into: members.K``: a suite
entry takes one weights source per member, e.g. the checkpoints of two other cells of the run
(``weights: [{source: "cell:resnet20", into: members.0}, {source: "cell:resnet56", into:
members.1}]``), which run first. Their declared input normalisations must agree. ``train: {epochs:
0}`` then measures the cascade as assembled (Bolukbasi et al. train only the selection policy;
here the policy is a confidence threshold fitted on validation); training it trains every member
on its own exit's loss.

Cost roles: none declared. The members are whole networks, so every MAC (each member's own
classifier included) is backbone; the decomposition's heads are empty.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.registry import ModelCard, create_model, register_model

SURVEY = "Han et al., Dynamic Neural Networks: A Survey, IEEE TPAMI 2021 (cascading of DNNs)"
BOLUKBASI = "Bolukbasi et al., Adaptive Neural Networks for Efficient Inference, ICML 2017"


class Cascade(EarlyExitNetwork):
    """Members run in order on the input; exit k is member k's prediction (see the module docstring)."""

    cost_roles: dict[str, tuple[str, ...]] = {}

    def __init__(self, members: Sequence[nn.Module], names: Sequence[str] = ()) -> None:
        if len(members) < 2:
            raise ValueError(f"a cascade needs at least 2 members, got {len(members)}")
        super().__init__([nn.Identity() for _ in members], list(members))
        self.member_names = tuple(names) or tuple(type(m).__name__ for m in members)

    @property
    def members(self) -> nn.ModuleList:
        """The member networks, cheapest first (the same modules as the exits' ``heads``; a property,
        so that ``into: members.K`` names them without a second copy in the state dict)."""
        return self.heads


def _card() -> ModelCard:
    return ModelCard(
        family="cascade", paper=BOLUKBASI, dynamic_kind="early_exit", input_size=32,
        reference={}, reference_source=(
            "Bolukbasi et al. report ImageNet only: network selection over AlexNet, GoogLeNet and ResNet-50 "
            "'with up to a 2.8x speedup ... with minimal (< 1%) loss of top5 accuracy' (abstract); there is no "
            "CIFAR-10 cascade of these ResNets in the literature to compare against"),
        notes=("Members by registered name (default resnet20 then resnet56), each from its own trained weights "
               "(`into: members.K`); a confidence, entropy or patience policy fitted on validation decides who "
               f"goes on. The survey: {SURVEY}."),
        paper_recipe="Bolukbasi et al.: pretrained ImageNet networks as they are; the selection policy learned by "
                     "weighted binary classification, layer by layer (not built: here the policy is a threshold)")


@register_model(card=_card())
def cascade(*, num_classes: int = 10, in_chans: int = 3, members: Sequence[str] = ("resnet20", "resnet56"),
            member_kwargs: Sequence[dict] | None = None) -> Cascade:
    """A cascade of the registered models ``members`` (cheapest first), each built with the cell's
    classes and channels and its ``member_kwargs`` entry."""
    names = list(members)
    extra = list(member_kwargs) if member_kwargs is not None else [{} for _ in names]
    if len(extra) != len(names):
        raise ValueError(f"member_kwargs needs one mapping per member ({len(names)}), got {len(extra)}")
    built = [create_model(name, num_classes=num_classes, in_chans=in_chans, **kw) for name, kw in zip(names, extra)]
    return Cascade(built, names)
