"""SkipNet: parameter and MAC counts by hand, real skipping (hooks and FlopCounterMode), batch-1 vs
batched decisions, the cost table vs a per-sample counted oracle, and both training stages."""
import math

import pytest
import torch
from model_helpers import counted_macs, unit_table
from torch.utils.flop_counter import FlopCounterMode

from fractalbench.baselines.skipnet import SkipNet, reinforce_loss, skip_rates
from fractalbench.harness import contract
from fractalbench.harness.policies import DecisionThreshold, make_policy
from fractalbench.harness.registry import create_model, list_models, model_card


def legacy(name: str, **options):
    """The build with the first block of every stage ungated (``gating="no_downsampling"``), which the
    hand-computed counts below describe (15, 33, 51 gates); the authors' gating has its own test."""
    return create_model(name, **{"gating": "no_downsampling", **options})

# ----- helpers ---------------------------------------------------------------------------------------


def calibrate_gates(model, x) -> None:
    """Shift the gates' output biases so that their decisions split the batch (non-trivial tests).
    Feed-forward gates: each gate's threshold between the two middle samples, one gate after
    another. Recurrent gate (one output bias shared by all gates): sharpen the projections, then
    split the first gate, whose logits depend on the input only."""
    with torch.no_grad():
        if model.gate_type == "rnn":
            for proj in model.gate.proj:
                proj.weight *= 30
            gates = [model.gate.out]
            column = lambda probs, g: probs[:, 0]  # noqa: E731
        else:
            gates = [gate.fc for gate in model.gate.gates]
            column = lambda probs, g: probs[:, g]  # noqa: E731
        for g, fc in enumerate(gates):
            p = column(model.dynamic_forward(x).trace.extras["gate_probs"], g).double()
            logits = (p / (1 - p)).log().sort().values
            mid = len(logits) // 2
            fc.bias -= float(logits[mid - 1] + logits[mid]) / 2


def small(gate_type="rnn", depth=20, seed=0, **kw) -> SkipNet:
    """A small SkipNet with the paper's init (blocks not the identity, so skipping changes outputs), gated as
    the hand counts below assume (``no_downsampling``) unless ``gating`` says otherwise."""
    torch.manual_seed(seed)
    kw = {"gating": "no_downsampling", **kw}
    return SkipNet(depth, num_classes=10, in_chans=3, gate_type=gate_type, zero_init_residual=False, **kw).eval()


# ----- registration, parameters and MACs by hand -----------------------------------------------------

# ResNet-(6n+2), option A: 97,216 n - 21,926 parameters (ResNet-20: 269,722; ResNet-110: 1,727,962).
# Recurrent gate: per gated block a projection C*10+10 (C = 16, 32, 64: 170 + 330 + 650 = 1,150 per
# stage triplet), one LSTM cell (10+10)*40+40 = 840 and the output linear 10+1 = 11.
# FFGate-II per gate: conv 9C^2 + BN 2C + linear C+1 (16: 2,353; 32: 9,313; 64: 37,057 -> 48,723 a triplet);
# FFGate-I adds a conv and BN (16: 2,336; 32: 9,280; 64: 36,992 -> 48,608 a triplet).
def resnet_params(n):
    return 97_216 * n - 21_926


EXACT_PARAMS = {
    ("skipnet38", "rnn"): resnet_params(6) + 5 * 1_150 + 851,  # 567,971
    ("skipnet74", "rnn"): resnet_params(12) + 11 * 1_150 + 851,  # 1,158,167
    ("skipnet110", "rnn"): resnet_params(18) + 17 * 1_150 + 851,  # 1,748,363
    ("skipnet38", "ffgate2"): resnet_params(6) + 5 * 48_723,  # 804,985
    ("skipnet38", "ffgate1"): resnet_params(6) + 5 * (48_723 + 48_608),  # 1,048,025
}


@pytest.mark.parametrize("name,gate_type", sorted(EXACT_PARAMS))
def test_parameter_counts_by_hand(name, gate_type):
    model = legacy(name, num_classes=10, gate_type=gate_type)
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[(name, gate_type)]
    assert EXACT_PARAMS[("skipnet38", "rnn")] == 567_971 and EXACT_PARAMS[("skipnet110", "rnn")] == 1_748_363


def test_official_gating_gates_every_block_but_the_first_and_skips_through_the_shortcut():
    """The authors' CIFAR code: 3n - 1 gated blocks; a skipped downsampling block is its shortcut."""
    for name, gates in [("skipnet38", 17), ("skipnet74", 35), ("skipnet110", 53)]:
        assert create_model(name).num_gates == gates
    model = create_model("skipnet38", num_classes=10, zero_init_residual=False).eval()
    assert model.gated_block_names[:7] == ("layer1.1", "layer1.2", "layer1.3", "layer1.4", "layer1.5", "layer2.0",
                                           "layer2.1")
    # every gate closed: stem, layer1.0, the two option-A shortcuts (no MACs), the head
    b = model.backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = b.layer1[0](b.stem(x))
        h = b.layer3[0].shortcut(b.layer2[0].shortcut(h))
        closed = model.dynamic_forward(x, forced_gates=[False] * 17).logits
        assert torch.allclose(closed, b.head(h), atol=1e-5)
        assert torch.allclose(model.dynamic_forward(x, forced_gates=[True] * 17).logits, b(x), atol=1e-4)
    legacy = create_model("skipnet38", num_classes=10, gating="no_downsampling")
    # two more gates (recurrent: a C->10 embedding each, C = 16 and 32 channels at the downsampling blocks)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in legacy.parameters()) == 170 + 330
    with pytest.raises(ValueError, match="gating 'every' is not one of official, no_downsampling"):
        create_model("skipnet38", gating="every")


def test_registered_names_cards_and_gate_counts():
    assert {"skipnet38", "skipnet74", "skipnet110"} <= set(list_models("skipnet*"))
    for name, gates in [("skipnet38", 15), ("skipnet74", 33), ("skipnet110", 51)]:  # the first block of each stage
        card = model_card(name)
        assert card.dynamic_kind == "gated" and card.family == "skipnet"
        model = legacy(name, num_classes=10)
        assert model.num_gates == gates and model.depth == int(name[len("skipnet"):])
        assert model.gated_block_names[0] == "layer1.1" and "layer2.0" not in model.gated_block_names
    with pytest.raises(ValueError, match="gate_type"):
        legacy("skipnet38", gate_type="lstm")
    with pytest.raises(ValueError, match="training_stage"):
        legacy("skipnet38", training_stage="rl")


def test_zero_init_residual_only_on_gated_blocks():
    model = legacy("skipnet38", num_classes=10).eval()
    assert all(b.bn2.weight.abs().sum() == 0 for b in model.gated_blocks())
    assert all(getattr(model.backbone, f"layer{s}")[0].bn2.weight.eq(1).all() for s in (1, 2, 3))
    with torch.no_grad():  # gated blocks start as the identity: skipping them changes nothing
        x = torch.randn(2, 3, 16, 16)
        assert torch.allclose(model.dynamic_forward(x, forced_gates=[True] * 15).logits,
                              model.dynamic_forward(x, forced_gates=[False] * 15).logits, atol=1e-5)
    paper = legacy("skipnet38", num_classes=10, zero_init_residual=False)
    assert all(b.bn2.weight.eq(1).all() for b in paper.gated_blocks())


def test_cost_table_by_hand_skipnet38_recurrent_gate():
    # ResNet-38 at 32x32: stem 442,368; a 3x3 block 4,718,592; first blocks of stages 2 and 3
    # 3,538,944 each; FC 640. Ungated part: stem + layer1.0 + both downsampling blocks + FC = 12,239,488.
    # Recurrent gate per gated block: projection 10C + LSTM 20*40 + output 10 = 970 / 1,130 / 1,450.
    model = small("rnn", depth=38)
    x = torch.randn(1, 3, 32, 32)
    units = {u.name: u for u in model.cost_units()}
    assert list(units) == ["base"] + [f"block_{i}" for i in range(15)]
    assert all(units[f"block_{i}"].baseline == "base" for i in range(15))
    gates = 5 * (970 + 1_130 + 1_450)
    base = counted_macs(units["base"].probe, x)
    assert gates == 17_750 and base == 12_239_488 + gates == 12_257_238
    assert counted_macs(units["block_0"].probe, x) - base == 4_718_592  # a 16-channel block at 32x32
    assert counted_macs(units["block_14"].probe, x) - base == 4_718_592  # a 64-channel block at 8x8
    full = counted_macs(model.forced_forward, x, 0)
    assert full == 83_018_368 + gates == base + 15 * 4_718_592  # ResNet-38 (83,018,368) + gates


def test_ffgate2_costs_one_eighth_of_a_block():
    # FFGate-II: one 3x3 conv at stride 2 = 9C^2 HW/4 = 589,824 MACs in every stage (1/8 of a block) + FC C.
    model = small("ffgate2", depth=38)
    base = counted_macs(model.dynamic_forward, torch.randn(1, 3, 32, 32), forced_gates=[False] * 15)
    assert base == 12_239_488 + 5 * (3 * 589_824 + 16 + 32 + 64) == 21_087_408
    assert 589_824 / 4_718_592 == 0.125


# ----- real skipping ---------------------------------------------------------------------------------

def _conv_hooks(model):
    calls = {}
    for g, block in enumerate(model.gated_blocks()):
        calls[g] = []
        for conv in (block.conv1, block.conv2):
            conv.register_forward_hook(lambda m, inp, out, g=g: calls[g].append(inp[0].shape[0]))
    return calls


def test_a_closed_gate_never_runs_its_block_at_batch_1():
    model = small("rnn")
    calls = _conv_hooks(model)
    x = torch.randn(1, 3, 16, 16)
    forced = [False, True, False, True, True, False]
    with torch.no_grad():
        out = model.dynamic_forward(x, forced_gates=forced)
    assert {g: len(c) for g, c in calls.items()} == {0: 0, 1: 2, 2: 0, 3: 2, 4: 2, 5: 0}
    assert out.trace.gates[0].tolist() == forced
    table = unit_table(model, x)
    assert counted_macs(model.dynamic_forward, x, forced_gates=forced) == table["base"] + 3 * table["block_1"]
    assert counted_macs(model.dynamic_forward, x, forced_gates=[False] * 6) == table["base"]


def test_in_a_batch_blocks_run_only_on_the_samples_whose_gate_is_open():
    model = small("ffgate2")
    calls = _conv_hooks(model)
    x = torch.randn(5, 3, 16, 16)
    forced = torch.zeros(5, 6, dtype=torch.bool)
    forced[[0, 3], 0] = True  # gate 0: samples 0 and 3
    forced[:, 2] = True  # gate 2: everybody
    forced[4, 5] = True  # gate 5: sample 4
    with torch.no_grad():
        batched = model.dynamic_forward(x, forced_gates=forced)
        singles = [model.dynamic_forward(x[i:i + 1], forced_gates=forced[i:i + 1]) for i in range(5)]
    assert calls[0][:2] == [2, 2] and calls[2][:2] == [5, 5] and calls[5][:2] == [1, 1]
    assert calls[1] == [] and calls[3] == [] and calls[4] == []
    assert torch.equal(batched.trace.gates, forced)
    for i, one in enumerate(singles):  # gather-run-scatter gives each sample its own result
        assert torch.allclose(one.logits[0], batched.logits[i], atol=1e-5)


@pytest.mark.parametrize("gate_type", ["rnn", "ffgate1", "ffgate2"])
def test_batch_1_and_batched_decisions_agree(gate_type):
    model = small(gate_type)
    x = torch.randn(12, 3, 16, 16)
    calibrate_gates(model, x)
    with torch.no_grad():
        batched = model.dynamic_forward(x)
        singles = [model.dynamic_forward(x[i:i + 1]) for i in range(len(x))]
    gates = batched.trace.gates
    assert 0 < gates.float().mean() < 1 and len({tuple(r) for r in gates.tolist()}) > 1  # decisions differ
    for i, one in enumerate(singles):
        assert torch.equal(one.trace.gates[0], gates[i])
        for unit, counts in batched.trace.unit_counts.items():
            assert one.trace.unit_counts[unit].item() == counts[i].item()
        assert torch.allclose(one.logits[0], batched.logits[i], atol=1e-5)
    assert torch.allclose(model(x), batched.logits)
    assert skip_rates(batched.trace).tolist() == pytest.approx((1 - gates.float().mean(0)).tolist())


@pytest.mark.parametrize("gate_type,mode", [("rnn", "compact"), ("ffgate1", "compact"), ("rnn", "mask")])
def test_cost_table_times_trace_equals_counted_macs_per_sample(gate_type, mode):
    model = small(gate_type, depth=14)  # 3 gates
    x = torch.randn(6, 3, 16, 16)
    calibrate_gates(model, x)
    table = unit_table(model, x[:1])
    counted, from_table = [], []
    for i in range(len(x)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = model.dynamic_forward(x[i:i + 1], mode=mode)
        counted.append(counter.get_total_flops() // 2)
        from_table.append(float(contract.executed_macs(out.trace, table)[0]))
    assert counted == from_table
    if mode == "compact":
        assert len(set(counted)) > 1  # the gates really differ between samples
        batched = model.dynamic_forward(x, mode=mode)
        assert contract.executed_macs(batched.trace, table).tolist() == from_table
    else:
        assert set(counted) == {table["base"] + 3 * table["block_0"]}


def test_mask_mode_is_the_same_function_and_forced_path_is_the_full_resnet():
    model = small("rnn")
    x = torch.randn(6, 3, 16, 16)
    calibrate_gates(model, x)
    with torch.no_grad():
        compact = model.dynamic_forward(x, mode="compact")
        mask = model.dynamic_forward(x, mode="mask")
        assert torch.equal(compact.trace.gates, mask.trace.gates)
        assert torch.allclose(compact.logits, mask.logits, atol=1e-5)
        assert all(v.tolist() == [1.0] * 6 for v in mask.trace.unit_counts.values())
        # all gates open = the plain ResNet; the gates still run (their MACs are in the forced path)
        full = model.forced_forward(x, 0)
        assert torch.allclose(full, model.backbone(x), atol=1e-5)
        assert torch.equal(model.forward_exits(x)[0], full)
    with pytest.raises(ValueError, match="exit"):
        contract.forced_forward(model, x, 1)
    with pytest.raises(ValueError, match="forced_gates"):
        model.dynamic_forward(x, forced_gates=[True, False])


# ----- training --------------------------------------------------------------------------------------

def test_supervised_stage_hard_forward_straight_through_backward():
    model = small("rnn")
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    calibrate_gates(model, x)
    with torch.no_grad():  # in eval mode the training forward is the hard-gated network
        logits, gate_logits, actions = model._train_forward(x)
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert torch.equal(actions.bool(), model.dynamic_forward(x).trace.gates)
    model.train()
    terms = model.loss_terms(x, y)
    assert set(terms) == {"cross_entropy"}
    terms["cross_entropy"].backward()
    for p in [model.gate.out.weight, model.gate.lstm.linear.weight, model.gate.proj[3].weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0  # the gates learn through the sigmoid


def test_reinforce_loss_by_hand():
    # one sample, two gates: p = (0.5, 0.75), actions (skip, run), CE 2, alpha 0.5 -> reward per skip 0.25
    # returns R = (0.25 - 2, -2); loss = -(R_0 log 0.5 + R_1 log 0.75)
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    loss = reinforce_loss(logits, torch.tensor([[0.0, 1.0]]), torch.tensor([2.0]), alpha=0.5)
    assert loss.item() == pytest.approx(-(-1.75 * math.log(0.5) - 2.0 * math.log(0.75)), rel=1e-6)
    loss.backward()
    # d/dlogit log pi: skipped gate -p = -0.5, run gate 1-p = 0.25; grad = -R * that
    assert logits.grad[0].tolist() == pytest.approx([-1.75 * 0.5, 2.0 * 0.25], rel=1e-6)
    scaled = reinforce_loss(logits.detach(), torch.tensor([[0.0, 1.0]]), torch.tensor([2.0]), alpha=0.5, rl_weight=0.1)
    assert scaled.item() == pytest.approx(0.1 * loss.item(), rel=1e-6)


def test_hybrid_rl_stage_terms_and_sampled_gates():
    model = small("rnn", alpha=0.3)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    model.training_stage = "hybrid_rl"
    model.train()
    torch.manual_seed(1)
    terms = model.loss_terms(x, y)
    assert set(terms) == {"cross_entropy", "reinforce"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert model.gate.out.weight.grad.abs().sum() > 0
    assert model.backbone.layer3[2].conv2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="training_stage"):
        model.training_stage = "rl"


def test_alpha_trades_accuracy_for_skipping():
    """Stage 2 on the gates only, one fixed batch: a large alpha drives the gates closed."""
    def open_rate_after_training(alpha):
        model = small("ffgate2", depth=14, alpha=alpha)
        x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
        calibrate_gates(model, x)
        model.training_stage = "hybrid_rl"
        opt = torch.optim.SGD(model.gate.parameters(), lr=0.5)
        torch.manual_seed(0)
        for _ in range(25):
            model.train()
            for m in model.modules():  # keep BN statistics fixed: only the policy changes
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
            opt.zero_grad()
            model.loss_terms(x, y)["reinforce"].backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return model.dynamic_forward(x).trace.gates.float().mean().item()

    closed, free = open_rate_after_training(50.0), open_rate_after_training(0.0)
    assert closed < 0.1 and free > 0.3


def test_decision_threshold_moves_every_gate_decision_and_its_cost():
    model = small("ffgate2")
    x = torch.randn(12, 3, 16, 16)
    calibrate_gates(model, x)
    table = unit_table(model, x[:1])
    with torch.no_grad():
        learned = model.dynamic_forward(x)
        at_half = model.dynamic_forward(x, DecisionThreshold((0.5,)))
        everything = model.dynamic_forward(x, DecisionThreshold((0.0,)))
        nothing = model.dynamic_forward(x, DecisionThreshold((1.0,)))
        forced_on = model.dynamic_forward(x, forced_gates=[True] * model.num_gates)
        forced_off = model.dynamic_forward(x, forced_gates=[False] * model.num_gates)
    assert torch.equal(at_half.trace.gates, learned.trace.gates) and torch.equal(at_half.logits, learned.logits)
    assert bool(everything.trace.gates.all()) and not bool(nothing.trace.gates.any())
    assert torch.allclose(everything.logits, forced_on.logits) and torch.allclose(nothing.logits, forced_off.logits)
    # gate 0 sees the same features at every threshold: its decision is exactly p > t
    p0 = learned.trace.extras["gate_probs"][:, 0]
    t = float(p0.median())
    with torch.no_grad():
        moved = model.dynamic_forward(x, DecisionThreshold((t,)))
    assert torch.equal(moved.trace.gates[:, 0], p0 > t)
    costs = [contract.executed_macs(o.trace, table).mean().item() for o in (everything, learned, nothing)]
    assert costs[0] == table["base"] + model.num_gates * table["block_0"] and costs[2] == table["base"]
    assert costs[0] > costs[1] > costs[2]
    with pytest.raises(TypeError, match="decision_threshold policy or None, not 'confidence"):
        model.dynamic_forward(x, make_policy("confidence", 0.9))
