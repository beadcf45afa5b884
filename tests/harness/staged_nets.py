"""A small early-exit network built as stages + heads, and confidence thresholds at the median of its
exits, for the tests of the staged paths (backends, serving)."""
import torch
from torch import nn

from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.policies import ConfidencePolicy


def three_exit_net():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())]
    stages += [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(2)]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)) for _ in range(3)]
    return EarlyExitNetwork(stages, heads).eval()


def median_policy(model, x):
    with torch.no_grad():
        logits = model.forward_exits(x)[:-1]
    return ConfidencePolicy(thresholds=tuple(torch.softmax(t, -1).amax(-1).quantile(0.5).item() for t in logits))
