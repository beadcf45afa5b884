"""Shared test fixtures.

Tiny models written directly against ``fractalbench.harness.contract`` (no baseline file needed), so that the
measurement machinery is tested on every dynamic kind. Input: [N, 2, 4, 4]. MACs by hand:

- TwoExitNet: stage0 conv 2->3 (3x3, pad 1) 2*3*9*16 = 864, head0 linear 3->4 = 12;
  stage1 conv 3->3 = 3*3*9*16 = 1296, head1 = 12. Units: "first" = 876 (everyone),
  "second" = 1308 (baseline "first"; only samples that go on). Exits: 876 and 2184.
- GatedNet: stem conv 2->4 = 1152; three gated blocks conv 4->4 = 2304 each; a gate per block
  linear 4->1 = 4; head 4->5 = 20. Units: "base" = 1152 + 3*4 + 20 = 1184, "block_i" = 2304.
- RoutedNet: 16 tokens (pixels) of 2 channels; embed 2->4 = 16*8 = 128; two MoE layers, each a
  router 4->3 (16*12 = 192) and top-1 experts, expert e = (e+1) linears 4->4 (16*(e+1) MACs per
  token); head 4->5 = 20. Units: "base" = 128 + 2*192 + 20 = 532, "expert_l_e" = 16*(e+1) per token.

Every test runs with one intra-op thread (``one_thread_session``, autouse): results do not depend
on the machine's core count, and the 2-core CI machine is not oversubscribed (its tensors are small,
so two threads mostly fight each other; measurement workers set their own threads).

Fixtures: ``tiny_models`` (name -> class) and ``tiny_registry``, which registers them as
``tiny_two_exit``, ``tiny_gated`` and ``tiny_routed`` for one test (and gives a plugin file that
does the same in a measurement worker process).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalbench.harness.contract import CostUnit, DynamicModel, DynamicOutput, Trace, check_exit_index, check_mode
from fractalbench.harness.policies import default_policy


def _pool(h: Tensor) -> Tensor:
    return h.mean(dim=(2, 3))


class TwoExitNet(DynamicModel):
    dynamic_kind = "early_exit"

    def __init__(self, num_classes: int = 4, in_chans: int = 2) -> None:
        super().__init__()
        self.stage0 = nn.Conv2d(in_chans, 3, 3, padding=1, bias=False)
        self.stage1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.head0, self.head1 = nn.Linear(3, num_classes), nn.Linear(3, num_classes)

    num_exits = 2

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_exits(x)[-1]

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        h = F.relu(self.stage0(x))
        out0 = self.head0(_pool(h))
        h = F.relu(self.stage1(h))
        return [out0, self.head1(_pool(h))]

    def forced_forward(self, x: Tensor, exit_index: int, policy=None) -> Tensor:
        check_exit_index(self, exit_index)
        h = F.relu(self.stage0(x))
        out = self.head0(_pool(h))
        if exit_index == 0:
            return out
        (policy or default_policy()).decide(0, out, {})
        return self.head1(_pool(F.relu(self.stage1(h))))

    def dynamic_forward(self, x: Tensor, policy=None, mode: str = "compact") -> DynamicOutput:
        check_mode(mode)
        policy = policy or default_policy()
        if mode == "mask":
            outs = self.forward_exits(x)
            leave, _ = policy.decide(0, outs[0], {})
            n = x.shape[0]
            return DynamicOutput(torch.where(leave[:, None], outs[0], outs[1]),
                                 Trace(leave.logical_not().long(), {"first": torch.ones(n), "second": torch.ones(n)}))
        h = F.relu(self.stage0(x))
        out = self.head0(_pool(h))
        leave, _ = policy.decide(0, out, {})
        stay = ~leave
        if stay.any():
            out = out.clone()
            out[stay] = self.head1(_pool(F.relu(self.stage1(h[stay]))))
        return DynamicOutput(out, Trace(stay.long(), {"first": torch.ones(x.shape[0]), "second": stay.float()}))

    def cost_units(self) -> list[CostUnit]:
        return [CostUnit("first", lambda x: self.forced_forward(x, 0)),
                CostUnit("second", lambda x: self.forced_forward(x, 1), baseline="first")]


class GatedNet(DynamicModel):
    dynamic_kind = "gated"
    num_exits = 1

    def __init__(self, num_classes: int = 5, in_chans: int = 2, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 4, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(blocks))
        self.gates = nn.ModuleList(nn.Linear(4, 1, bias=False) for _ in range(blocks))
        self.head = nn.Linear(4, num_classes)

    def _run(self, x: Tensor, mode: str = "compact", force: list[bool] | None = None) -> DynamicOutput:
        h = self.stem(x)  # no activation: pooled features are centred, so gates split the samples
        n, bits = x.shape[0], []
        for i, (block, gate) in enumerate(zip(self.blocks, self.gates)):
            on = gate(_pool(h)).squeeze(1) > 0
            if force is not None:
                on = torch.full_like(on, force[i])
            if mode == "mask":
                h = h + on[:, None, None, None].float() * block(h)
            elif on.any():
                h = h.clone()
                h[on] = h[on] + block(h[on])
            bits.append(on)
        gates = torch.stack(bits, 1)
        counts = {"base": torch.ones(n)}
        counts.update({f"block_{i}": (torch.ones(n) if mode == "mask" else gates[:, i].float())
                       for i in range(len(self.blocks))})
        return DynamicOutput(self.head(_pool(h)), Trace(torch.zeros(n, dtype=torch.long), counts, gates=gates))

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x).logits

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.forward(x)]

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:
        check_exit_index(self, exit_index)
        return self.forward(x)

    def dynamic_forward(self, x: Tensor, policy=None, mode: str = "compact") -> DynamicOutput:
        return self._run(x, check_mode(mode))

    def cost_units(self) -> list[CostUnit]:
        g = len(self.blocks)
        units = [CostUnit("base", lambda x: self._run(x, force=[False] * g))]
        units += [CostUnit(f"block_{i}", lambda x, i=i: self._run(x, force=[j == i for j in range(g)]), baseline="base")
                  for i in range(g)]
        return units


class RoutedNet(DynamicModel):
    dynamic_kind = "routed"
    num_exits = 1

    def __init__(self, num_classes: int = 5, in_chans: int = 2, layers: int = 2, experts: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(in_chans, 4)
        self.routers = nn.ModuleList(nn.Linear(4, experts) for _ in range(layers))
        self.experts = nn.ModuleList(
            nn.ModuleList(nn.Sequential(*[nn.Linear(4, 4) for _ in range(e + 1)]) for e in range(experts))
            for _ in range(layers))
        self.head = nn.Linear(4, num_classes)

    def _run(self, x: Tensor, mode: str = "compact", probe: tuple[int, int] | None = None) -> DynamicOutput:
        h = self.embed(x.flatten(2).transpose(1, 2))  # [N, T, 4]
        n, t = h.shape[:2]
        choices, counts = [], {"base": torch.ones(n)}
        for layer, (router, experts) in enumerate(zip(self.routers, self.experts)):
            choice = router(h).argmax(-1)  # [N, T]
            if probe is not None:
                if probe[0] == layer:
                    experts[probe[1]](h[:, :1])
                choices.append(choice)
                continue
            out = h.clone()
            for e, expert in enumerate(experts):
                chosen = choice == e
                if mode == "mask":
                    out = torch.where(chosen[..., None], h + expert(h), out)
                elif chosen.any():
                    out[chosen] = h[chosen] + expert(h[chosen])
                counts[f"expert_{layer}_{e}"] = torch.full((n,), float(t)) if mode == "mask" else chosen.sum(1).float()
            h = out
            choices.append(choice)
        logits = self.head(h.mean(1))
        return DynamicOutput(logits, Trace(torch.zeros(n, dtype=torch.long), counts, experts=torch.stack(choices, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x).logits

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.forward(x)]

    def forced_forward(self, x: Tensor, exit_index: int) -> Tensor:
        check_exit_index(self, exit_index)
        return self.forward(x)

    def dynamic_forward(self, x: Tensor, policy=None, mode: str = "compact") -> DynamicOutput:
        return self._run(x, check_mode(mode))

    def cost_units(self) -> list[CostUnit]:
        units = [CostUnit("base", lambda x: self._run(x, probe=(-1, -1)))]
        units += [CostUnit(f"expert_{layer}_{e}", lambda x, layer=layer, e=e: self._run(x, probe=(layer, e)),
                           baseline="base")
                  for layer in range(len(self.experts)) for e in range(len(self.experts[layer]))]
        return units

    def active_parameters(self) -> int:
        """Parameters one token can use: everything but the experts, plus the largest expert per layer."""
        expert_params = sum(p.numel() for p in self.experts.parameters())
        largest = sum(max(sum(p.numel() for p in e.parameters()) for e in layer) for layer in self.experts)
        return sum(p.numel() for p in self.parameters()) - expert_params + largest


TINY_MODELS = {"tiny_two_exit": TwoExitNet, "tiny_gated": GatedNet, "tiny_routed": RoutedNet}


def register_tiny_models() -> None:
    """Register the tiny models (idempotent) so ModelSpec can rebuild them, also in a worker."""
    from fractalbench.harness.registry import ModelCard, list_models, register_model

    known = set(list_models())
    for name, cls in TINY_MODELS.items():
        if name not in known:
            card = ModelCard(family="test", paper="none: test model", dynamic_kind=cls.dynamic_kind, input_size=4)
            register_model(name, card=card)(lambda *, num_classes=5, in_chans=2, cls=cls: cls(num_classes, in_chans))


@pytest.fixture(autouse=True, scope="session")
def one_thread_session():
    """``torch.set_num_threads(1)`` for the whole session; the previous count is restored at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_models():
    """name -> class of the tiny contract models."""
    return dict(TINY_MODELS)


@pytest.fixture
def tiny_registry(tmp_path):
    """The tiny models registered for one test (removed after it); ``.plugin`` is a file that
    registers them in a measurement worker (``LatencySettings(plugins=(...,))``)."""
    from types import SimpleNamespace

    from fractalbench.harness.registry import unregister_model

    plugin = tmp_path / "tiny_models_plugin.py"
    plugin.write_text(f"import runpy\nrunpy.run_path({__file__!r})['register_tiny_models']()\n", encoding="utf-8")
    register_tiny_models()
    yield SimpleNamespace(names=list(TINY_MODELS), plugin=str(plugin))
    for name in TINY_MODELS:
        unregister_model(name)
