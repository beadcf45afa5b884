"""Helpers shared by the tests (imported as ``model_helpers``; tests/ is on the path through its
conftest): MACs counted without the harness, cost tables by hand, BatchNorm warm-up and thresholds
that split a batch over the exits."""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fractalbench.harness.policies import ConfidencePolicy, EntropyPolicy, softmax_entropy


def counted_macs(fn, *args, **kwargs) -> int:
    """MACs that FlopCounterMode sees while ``fn`` runs (FLOPs / 2, 2 FLOPs per MAC), without the harness."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() // 2


def unit_table(model, x1) -> dict[str, int]:
    """MACs per cost unit: probe MACs minus its baseline's probe MACs (at batch 1)."""
    units = model.cost_units()
    probes = {u.name: counted_macs(u.probe, x1) for u in units}
    return {u.name: probes[u.name] - (probes[u.baseline] if u.baseline else 0) for u in units}


def warm_batchnorm(model, x):
    """Running statistics = the batch statistics of ``x`` on the exits' paths (``forward_exits``), so
    random-init logits are not degenerate; returns the model in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model.forward_exits(x)
    return model.eval()


def middle(scores):
    """A threshold halfway between the two middle scores: half the samples on each side, none on it."""
    s = scores.sort().values
    return ((s[(len(s) - 1) // 2] + s[len(s) // 2 if len(s) % 2 == 0 else len(s) // 2 + 1]) / 2).item()


def median_policy(model, x, name="confidence"):
    """A confidence (or, with ``name="entropy"``, entropy) policy whose thresholds lie between the
    middle scores of every exit but the last: samples leave at every exit."""
    with torch.no_grad():
        exits = model.forward_exits(x)
    if name == "entropy":
        return EntropyPolicy(thresholds=tuple(middle(softmax_entropy(e)) for e in exits[:-1]))
    return ConfidencePolicy(thresholds=tuple(middle(torch.softmax(e, -1).amax(-1)) for e in exits[:-1]))
