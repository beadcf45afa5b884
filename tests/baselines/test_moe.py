"""Mixture-of-Experts: balancing losses by hand, router gradients, capacity drops, real dispatch
(hooks), batch-1 vs batched routing, the cost table vs a per-sample counted oracle, parameters."""
import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import counted_macs, unit_table
from torch.utils.flop_counter import FlopCounterMode

from fractalbench.baselines.moe import (
    MoELayer,
    MoEResNet,
    cv_squared,
    expert_histogram,
    importance,
    smooth_load,
    switch_balancing_loss,
)
from fractalbench.harness import contract
from fractalbench.harness.policies import DecisionThreshold
from fractalbench.harness.registry import create_model, list_models, model_card


def build(name, seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_chans=3, **kw).eval()


# ----- balancing losses by hand (2 experts, 4 tokens) -------------------------------------------------

def test_switch_balancing_loss_by_hand():
    # argmax (0, 0, 1, 0): f = (3/4, 1/4); mean probabilities P = (2.4/4, 1.6/4) = (0.6, 0.4)
    # loss = E * sum f_e P_e = 2 * (0.75 * 0.6 + 0.25 * 0.4) = 2 * 0.55 = 1.1
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    assert switch_balancing_loss(probs, probs.argmax(-1)).item() == pytest.approx(1.1, rel=1e-6)
    uniform = torch.full((4, 2), 0.5)  # balanced: f = P = 1/2 -> 2 * (1/4 + 1/4) = 1
    assert switch_balancing_loss(uniform, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(1.0)


def test_importance_and_cv_squared_by_hand():
    # top-1 gates (value 1) of 4 tokens: three to expert 0, one to expert 1 -> importance (3, 1),
    # mean 2, population variance ((3-2)^2 + (1-2)^2) / 2 = 1 -> CV^2 = 1 / 4
    gates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert importance(gates).tolist() == [3.0, 1.0]
    assert cv_squared(importance(gates)).item() == pytest.approx(0.25)
    soft = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])  # (2.5, 1.5): var 0.25, mean^2 4
    assert cv_squared(importance(soft)).item() == pytest.approx(0.25 / 4)
    assert cv_squared(torch.tensor([2.0, 2.0])).item() == 0.0


def test_smooth_load_estimator_by_hand():
    # k = 1, two experts: P(e in top 1) = Phi((clean_e - noisy_other) / std_e) (the other expert's
    # noisy logit is the k-th largest excluding e). Phi values from the standard normal table:
    clean = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.2, 0.2], [-1.0, 1.0]])
    noisy = torch.tensor([[1.2, -0.3], [0.45, 0.4], [0.5, 0.0], [-1.0, 0.6]])
    std = torch.tensor([[1.0, 2.0], [1.0, 1.0], [0.5, 0.5], [1.0, 1.0]])
    p0 = [0.9031995154,   # Phi((1.0 + 0.3) / 1) = Phi(1.3)
          0.3445782584,   # Phi((0.0 - 0.4) / 1) = Phi(-0.4)
          0.6554217416,   # Phi((0.2 - 0.0) / 0.5) = Phi(0.4)
          0.0547992917]   # Phi((-1.0 - 0.6) / 1) = Phi(-1.6)
    p1 = [0.2742531178,   # Phi((0.0 - 1.2) / 2) = Phi(-0.6)
          0.5199388058,   # Phi((0.5 - 0.45) / 1) = Phi(0.05)
          0.2742531178,   # Phi((0.2 - 0.5) / 0.5) = Phi(-0.6)
          0.9772498681]   # Phi((1.0 + 1.0) / 1) = Phi(2.0)
    load = smooth_load(clean, noisy, std, k=1)
    assert load.tolist() == pytest.approx([sum(p0), sum(p1)], rel=1e-6)  # (1.9579988071, 2.0456949095)
    l0, l1 = 1.9579988071, 2.0456949095
    assert cv_squared(load).item() == pytest.approx(((l0 - l1) / 2) ** 2 / ((l0 + l1) / 2) ** 2, rel=1e-5)


def test_model_loss_terms_are_the_weighted_sums_over_layers():
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    switch = build("switch_resnet20")
    terms = switch.loss_terms(x, y)
    assert set(terms) == {"cross_entropy", "load_balancing"}
    logits, routings = switch._run(x)
    expected = sum(switch_balancing_loss(r.probs.reshape(-1, 4), r.probs.reshape(-1, 4).argmax(-1)) for r in routings)
    assert terms["load_balancing"].item() == pytest.approx(0.01 * expected.item(), rel=1e-5)
    assert terms["cross_entropy"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    top2 = build("moe_resnet20_top2").train()
    terms = top2.loss_terms(x, y)
    assert set(terms) == {"cross_entropy", "importance", "load"}
    assert all(torch.isfinite(v) and v >= 0 for v in terms.values())


# ----- router gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["moe_resnet20_top2", "switch_resnet20"])
def test_router_receives_a_gradient_from_the_task_loss(name):
    model = build(name).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    terms = model.loss_terms(x, y)
    terms["cross_entropy"].backward()  # the task loss alone: the gate values must carry gradient
    for layer in model.moe:
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    if name == "moe_resnet20_top2":  # the noise projection learns through the smooth load estimator
        model.zero_grad()
        model.loss_terms(x, y)["load"].backward()
        assert all(layer.noise.weight.grad.abs().sum() > 0 for layer in model.moe)


def test_switch_scales_by_the_selected_probability_not_a_constant_one():
    layer = MoELayer(8, num_experts=3, k=1, router="switch").eval()
    z = torch.randn(2, 5, 8)
    routing = layer.route(z, noisy=False)
    probs = layer.router(z).softmax(-1)
    assert torch.allclose(routing.weights[..., 0], probs.max(-1).values)
    assert (routing.weights < 1).all()  # a softmax after selection would be identically 1


# ----- capacity -------------------------------------------------------------------------------------

def _all_to_expert_0(layer):
    """Every token identical after the norm (weight 0, bias 1) and expert 0 strictly preferred."""
    with torch.no_grad():
        layer.norm.weight.zero_()
        layer.norm.bias.fill_(1.0)
        layer.router.weight.zero_()
        layer.router.weight[0] = 0.25


def test_capacity_overflow_drops_tokens_that_pass_through_the_residual():
    torch.manual_seed(0)
    # 2x2 feature map = 4 tokens, 2 experts, top-1, capacity factor 0.5: ceil(0.5 * 1 * 4 / 2) = 1 token
    layer = MoELayer(4, num_experts=2, k=1, router="switch", capacity_factor=0.5).eval()
    _all_to_expert_0(layer)
    assert layer.capacity(4) == 1
    rows = {0: [], 1: []}
    for e, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: rows[e].append(inp[0].shape[0]))
    h = torch.randn(2, 4, 2, 2)
    with torch.no_grad():
        out, routing = layer(h)
    assert routing.assign[..., 0].tolist() == [[0, -1, -1, -1], [0, -1, -1, -1]]  # per sample: first token kept
    assert rows == {0: [2], 1: []}  # expert 0 ran once on the two kept tokens; expert 1 never ran
    tokens_in, tokens_out = h.flatten(2), out.flatten(2)
    assert torch.equal(tokens_out[:, :, 1:], tokens_in[:, :, 1:])  # dropped: unchanged (residual)
    p0 = torch.softmax(torch.tensor([0.25 * 4, 0.0]), 0)[0]  # router logits (sum of ones * 0.25, 0)
    with torch.no_grad():
        expected = tokens_in[:, :, 0] + p0 * layer.experts[0](torch.ones(1, 4))
    assert torch.allclose(tokens_out[:, :, 0], expected, atol=1e-6)


def test_capacity_priority_first_choices_then_second_choices():
    # 3 tokens, top-2 of 3 experts, capacity ceil(0.5 * 2 * 3 / 3) = 1 per expert:
    # first choices in raster order: t0->0 kept, t1->0 dropped, t2->1 kept;
    # then second choices: t0->1 dropped (expert 1 full), t1->2 kept, t2->0 dropped.
    layer = MoELayer(4, num_experts=3, k=2, capacity_factor=0.5)
    choice = torch.tensor([[[0, 1], [0, 2], [1, 0]]])
    assert layer.capacity(3) == 1
    assert layer._apply_capacity(choice).tolist() == [[[0, -1], [-1, 2], [1, -1]]]
    assert MoELayer(4, 3, 2)._apply_capacity(choice).tolist() == choice.tolist()  # no capacity: nothing dropped


def test_router_init_follows_the_papers():
    top2, switch = build("moe_resnet20_top2"), build("switch_resnet20")
    assert top2.router_init == "zero" and switch.router_init == "fedus"
    for layer in top2.moe:  # Shazeer et al.: W_g = W_noise = 0, so the first routing is uniform
        assert not layer.router.weight.any() and not layer.noise.weight.any()
    weights = torch.cat([layer.router.weight.flatten() for layer in switch.moe])
    fan_in = switch.moe[0].router.in_features
    assert weights.std().item() == pytest.approx((0.1 / fan_in) ** 0.5 * 0.88, rel=0.2)  # truncated at 2 std
    assert weights.abs().max().item() <= 2 * (0.1 / fan_in) ** 0.5
    z = torch.randn(1, 5, top2.moe[0].router.in_features)
    routing = top2.moe[0].route(z, noisy=False)
    assert not routing.clean_logits.any()  # every expert equally likely: the top-2 weights are 1/2 each
    assert torch.allclose(routing.weights, torch.full_like(routing.weights, 0.5))
    with pytest.raises(ValueError, match="router_init 'ones' is not one of zero, fedus, torch"):
        build("moe_resnet20_top2", router_init="ones")


# ----- dispatch, batch-1 vs batched, the oracle -----------------------------------------------------

@pytest.mark.parametrize("name", ["moe_resnet20_top2", "switch_resnet20"])
def test_batch_1_and_batched_routing_agree(name):
    model = build(name, router_init="torch")  # a router that spreads tokens at init (zero init routes uniformly)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        batched = model.dynamic_forward(x)
        singles = [model.dynamic_forward(x[i:i + 1]) for i in range(len(x))]
    experts = batched.trace.experts
    assert experts.shape == (6, 2, 16 * model.k)  # 4x4 tokens in stage 3, k choices each
    assert len(torch.unique(experts[experts >= 0])) == 4  # every expert is used somewhere
    if name == "switch_resnet20":
        assert (experts == -1).any()  # capacity 1.25: ceil(1.25 * 16 / 4) = 5 tokens per expert and sample
    for i, one in enumerate(singles):
        assert torch.equal(one.trace.experts[0], experts[i])
        for unit, counts in batched.trace.unit_counts.items():
            assert one.trace.unit_counts[unit].item() == counts[i].item(), unit
        assert torch.allclose(one.logits[0], batched.logits[i], atol=1e-5)


@pytest.mark.parametrize("name", ["moe_resnet20_top2", "switch_resnet20"])
def test_only_chosen_experts_run_on_their_tokens(name):
    model = build(name)
    rows: dict[str, list[int]] = {}
    for li, layer in enumerate(model.moe):
        for e, expert in enumerate(layer.experts):
            rows[f"layer{li}_expert{e}"] = []
            unit = f"layer{li}_expert{e}"
            expert.fc1.register_forward_hook(lambda m, inp, out, u=unit: rows[u].append(inp[0].shape[0]))
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        out = model.dynamic_forward(x)
    for unit, counts in out.trace.unit_counts.items():
        if unit != "base":  # each expert ran once, on exactly the tokens routed to it
            assert sum(rows[unit]) == counts.sum().item() and len(rows[unit]) == int(counts.sum() > 0)
    counts, dropped = expert_histogram(out.trace, 4)
    assert counts.sum(1).tolist() == [5 * 16 * model.k - d for d in dropped.tolist()]
    assert counts[1].tolist() == [int(out.trace.unit_counts[f"layer1_expert{e}"].sum()) for e in range(4)]


@pytest.mark.parametrize("name,mode", [("moe_resnet20_top2", "compact"), ("switch_resnet20", "compact"),
                                       ("switch_resnet20", "mask")])
def test_cost_table_times_trace_equals_counted_macs_per_sample(name, mode):
    model = build(name)
    x = torch.randn(6, 3, 16, 16)
    table = unit_table(model, x[:1])
    # 16x16 input: ResNet-20 at 16x16 = 10,138,240 MACs (convs / 4, FC 640); routers 2 x 16 tokens x 64 x 4
    assert table["base"] == 10_138_240 + 2 * 16 * 256 == 10_146_432
    assert {v for k, v in table.items() if k != "base"} == {2 * 64 * 256}  # per token: 64->256->64
    counted, from_table = [], []
    for i in range(len(x)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = model.dynamic_forward(x[i:i + 1], mode=mode)
        counted.append(counter.get_total_flops() // 2)
        from_table.append(float(contract.executed_macs(out.trace, table)[0]))
    assert counted == from_table
    if name == "switch_resnet20" and mode == "compact":
        assert len(set(counted)) > 1  # tokens dropped differ per sample, so the equality is not trivial
    if mode == "mask":
        assert set(counted) == {10_146_432 + 2 * 4 * 16 * 32_768}  # every expert on every token


def test_mask_mode_matches_compact_logits():
    model = build("switch_resnet20")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        compact, mask = model.dynamic_forward(x), model.dynamic_forward(x, mode="mask")
    assert torch.equal(compact.trace.experts, mask.trace.experts)
    assert torch.allclose(compact.logits, mask.logits, atol=1e-5)
    assert torch.equal(model.forced_forward(x, 0), model(x)) and len(model.forward_exits(x)) == 1


# ----- parameters, MACs at 32x32, registration ------------------------------------------------------

def test_parameters_total_and_active_by_hand():
    # ResNet-20: 269,722. Per MoE layer: LayerNorm 128, router 64*4 = 256 (noisy top-k: + noise 256),
    # 4 experts of 64*256+256 + 256*64+64 = 33,088. Active: all but the experts (and the training-only
    # noise projection), plus k experts per layer.
    top2, switch = build("moe_resnet20_top2"), build("switch_resnet20")
    assert sum(p.numel() for p in top2.parameters()) == 269_722 + 2 * (128 + 512 + 4 * 33_088) == 535_706
    assert sum(p.numel() for p in switch.parameters()) == 269_722 + 2 * (128 + 256 + 4 * 33_088) == 535_194
    assert top2.active_parameters() == 269_722 + 2 * (128 + 256 + 2 * 33_088) == 402_842
    assert switch.active_parameters() == 269_722 + 2 * (128 + 256 + 33_088) == 336_666


def test_macs_at_32x32_by_hand():
    # ResNet-20 40,551,040 + routers 2 x 64 tokens x 64 x 4 = 32,768; an expert costs 32,768 MACs per token;
    # noisy top-2 without capacity runs 2 experts on all 64 tokens in both layers: + 8,388,608.
    model = build("moe_resnet20_top2")
    x = torch.randn(1, 3, 32, 32)
    units = {u.name: u for u in model.cost_units()}
    assert len(units) == 1 + 2 * 4 and units["layer1_expert3"].baseline == "base"
    base = counted_macs(units["base"].probe, x)
    assert base == 40_551_040 + 32_768 == 40_583_808
    assert counted_macs(units["layer1_expert3"].probe, x) - base == 32_768
    assert counted_macs(model.dynamic_forward, x) == base + 2 * 64 * 2 * 32_768 == 48_972_416


def test_registration_and_options():
    assert {"moe_resnet20_top2", "switch_resnet20"} <= set(list_models())
    assert all(model_card(n).dynamic_kind == "routed" for n in ("moe_resnet20_top2", "switch_resnet20"))
    model = create_model("switch_resnet20", num_classes=7, in_chans=1, num_experts=8, capacity_factor=None)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7) and len(model.moe[0].experts) == 8
    with pytest.raises(ValueError, match="k="):
        MoEResNet(20, router="switch", k=2)
    with pytest.raises(ValueError, match="router"):
        MoEResNet(20, router="hash")
    with pytest.raises(ValueError, match="moe_layers"):
        MoEResNet(20, moe_layers=4)
    assert math.ceil(1.25 * 64 / 4) == MoELayer(64, 4, 1, "switch", capacity_factor=1.25).capacity(64) == 20


@pytest.mark.parametrize("name", ["moe_resnet20_top2", "switch_resnet20"])
def test_decision_threshold_drops_exactly_the_choices_whose_weight_is_below_it(name):
    model = build(name, router_init="torch")
    x = torch.randn(6, 3, 16, 16)
    table = unit_table(model, x[:1])
    with torch.no_grad():
        learned = model.dynamic_forward(x)
        zero = model.dynamic_forward(x, DecisionThreshold((0.0,)))
        b = model.backbone
        h = b.layer3[1](b.layer3[0](b.layer2(b.layer1(b.stem(x)))))  # the input of MoE layer 0
        z = model.moe[0].norm(h.flatten(2).transpose(1, 2))
        routing = model.moe[0].route(z, noisy=False)  # layer 0 sees the same features at any threshold
        t = float(routing.weights.flatten().median())
        moved = model.dynamic_forward(x, DecisionThreshold((t,)))
        nothing = model.dynamic_forward(x, DecisionThreshold((1.01,)))
    assert torch.equal(zero.logits, learned.logits) and torch.equal(zero.trace.experts, learned.trace.experts)
    expected = torch.where(routing.weights >= t, routing.assign, -1).flatten(1)
    assert torch.equal(moved.trace.experts[:, 0], expected)
    assert 0 < (expected == -1).float().mean() < 1  # the threshold splits the choices
    assert bool((nothing.trace.experts == -1).all())
    costs = [contract.executed_macs(o.trace, table).mean().item() for o in (learned, moved, nothing)]
    assert costs[0] > costs[1] > costs[2] == table["base"]
    with torch.no_grad():  # no expert ran: the MoE layers are the identity (pre-norm residual)
        plain = b.head(b.layer3(b.layer2(b.layer1(b.stem(x)))))
    assert torch.allclose(nothing.logits, plain, rtol=1e-5, atol=1e-5)  # same function, another memory layout


# ----- expert-choice routing (Zhou et al. 2022) -------------------------------------------------------

def test_expert_choice_experts_take_their_top_tokens_by_hand():
    # one sample, 4 tokens, 2 experts, capacity factor 1: each expert takes ceil(1 * 4 / 2) = 2 tokens.
    layer = MoELayer(4, num_experts=2, k=1, router="expert_choice", capacity_factor=1.0, group="sample")
    assert layer.capacity(4) == 2 and layer.k == 2  # one slot per expert in the trace
    scores = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]])
    assign, weights = layer._expert_choice(scores)
    # expert 0's column 0.9, 0.6, 0.7, 0.2 -> tokens 0, 2; expert 1's 0.1, 0.4, 0.3, 0.8 -> tokens 3, 1.
    # Token 1 is taken by expert 1 only, token 0 and 2 by expert 0 only; none is dropped.
    assert assign.tolist() == [[[0, -2], [-2, 1], [0, -2], [-2, 1]]]
    assert torch.equal(weights, torch.tensor([[[0.9, 0.0], [0.0, 0.4], [0.7, 0.0], [0.0, 0.8]]]))
    # a token both experts want and one nobody wants: capacity 1 each (factor 0.5)
    layer = MoELayer(4, num_experts=2, k=1, router="expert_choice", capacity_factor=0.5, group="sample")
    scores = torch.tensor([[[0.5, 0.5], [0.45, 0.55], [0.4, 0.6], [0.6, 0.4]]])
    assign, _ = layer._expert_choice(scores)
    # expert 0 -> token 3 (0.6); expert 1 -> token 2 (0.6): tokens 0 and 1 dropped (-1 in slot 0)
    assert assign.tolist() == [[[-1, -2], [-1, -2], [-2, 1], [0, -2]]]
    trace = contract.Trace(torch.zeros(1, dtype=torch.long), {}, experts=assign.reshape(1, 1, 8))
    histogram = expert_histogram(trace, 2)
    assert histogram[0].tolist() == [[1, 1]] and histogram[1].tolist() == [2]  # 2 dropped tokens, empty slots apart
    from fractalbench.harness.metrics._cost_tables import trace_histograms

    assert trace_histograms(trace, 1, 2)["expert_dropped"] == [2]  # the load rows' "dropped": tokens, not slots


def test_expert_choice_capacity_and_options():
    layer = MoELayer(64, 4, 1, "expert_choice", capacity_factor=2.0)
    assert layer.capacity(64) == 32 and layer.capacity(3) == 2 and layer.batch_dependent
    assert not MoELayer(64, 4, 1, "expert_choice", capacity_factor=2.0, group="sample").batch_dependent
    assert MoELayer(64, 4, 1, "expert_choice", capacity_factor=4.0).capacity(10) == 10  # every expert, every token
    with pytest.raises(ValueError, match="capacity factor in"):
        MoELayer(64, 4, 1, "expert_choice", capacity_factor=None)
    with pytest.raises(ValueError, match="routing group 'device' is not one of batch, sample"):
        MoELayer(64, 4, 1, "expert_choice", capacity_factor=2.0, group="device")


def test_expert_choice_routes_over_the_batch_and_declares_it():
    torch.manual_seed(0)
    model = build("expert_choice_resnet20")
    assert model.batch_dependent and contract.batch_dependent(model)
    assert not contract.batch_dependent(build("switch_resnet20"))
    x = torch.randn(6, 3, 16, 16)  # 16 tokens per sample in stage 3: the group holds 96
    with torch.no_grad():
        batched = model.dynamic_forward(x)
        reversed_ = model.dynamic_forward(x.flip(0))
        alone = [model.dynamic_forward(x[i:i + 1]) for i in range(6)]
    experts = batched.trace.experts
    assert experts.shape == (6, 2, 16 * 4)
    per_expert = torch.stack([(experts[:, 0] == e).sum() for e in range(4)])
    assert per_expert.tolist() == [48] * 4  # ceil(2 x 96 / 4) tokens of the whole batch per expert
    counts = {u: c for u, c in batched.trace.unit_counts.items() if u.startswith("layer0")}
    assert sum(c.sum() for c in counts.values()).item() == 4 * 48
    assert len({int(c[0]) for c in counts.values()} | {int(c[1]) for c in counts.values()}) > 1  # uneven per sample
    assert torch.equal(reversed_.trace.experts.flip(0), experts)  # the order of the batch does not matter
    assert torch.allclose(reversed_.logits.flip(0), batched.logits, atol=1e-5)
    # which samples share the batch does: alone, each sample's own 16 tokens fill ceil(2 x 16 / 4) = 8 per expert
    assert all(((one.trace.experts[0, 0] == e).sum() == 8) for one in alone for e in range(4))
    assert any(not torch.equal(one.trace.experts[0], experts[i]) for i, one in enumerate(alone))
    sample = build("expert_choice_resnet20", group="sample")
    with torch.no_grad():
        batched, alone = sample.dynamic_forward(x), [sample.dynamic_forward(x[i:i + 1]) for i in range(6)]
    assert not sample.batch_dependent
    assert all(torch.equal(one.trace.experts[0], batched.trace.experts[i]) for i, one in enumerate(alone))


def test_expert_choice_compact_equals_mask_and_the_oracle_counts_what_ran():
    torch.manual_seed(1)
    model = build("expert_choice_resnet20")
    x = torch.randn(3, 3, 16, 16)
    table = unit_table(model, x[:1])
    with torch.no_grad():
        compact, mask = model.dynamic_forward(x), model.dynamic_forward(x, mode="mask")
    assert torch.equal(compact.trace.experts, mask.trace.experts)
    assert torch.allclose(compact.logits, mask.logits, atol=1e-5)
    assert counted_macs(model.dynamic_forward, x) == contract.executed_macs(compact.trace, table).sum().item()
    assert model.loss_terms(x, torch.tensor([0, 1, 2])).keys() == {"cross_entropy"}  # balanced by construction


def test_expert_choice_active_parameters_by_hand():
    # as switch_resnet20 (router 256, no noise), with capacity factor 2: two experts per token on average
    model = build("expert_choice_resnet20")
    assert sum(p.numel() for p in model.parameters()) == 535_194
    assert model.active_parameters() == 269_722 + 2 * (128 + 256 + 2 * 33_088) == 402_842


def test_checker_verifies_a_batch_dependence_declaration():
    from fractalbench.harness.checker import run_checks

    report = run_checks(build("expert_choice_resnet20"), torch.randn(8, 3, 16, 16))
    line = next(r for r in report.results if r.name == "batch-1 vs batched")
    assert line.status == "ok" and "declared batch-dependent" in line.detail

    class OrderSensitive(MoEResNet):
        """Declares batch dependence but routes by position in the batch: the declaration is too weak."""

        def dynamic_forward(self, x, policy=None, mode="compact"):
            out = super().dynamic_forward(x, policy, mode)
            out.logits = out.logits + torch.arange(len(x), dtype=out.logits.dtype)[:, None]
            return out

    torch.manual_seed(0)
    bad = OrderSensitive(20, router="expert_choice", capacity_factor=2.0, k=1).eval()
    report = run_checks(bad, torch.randn(8, 3, 16, 16))
    line = next(r for r in report.results if r.name == "batch-1 vs batched")
    assert line.status == "FAIL" and "reversed batch does not give the reversed results" in line.detail


# ----- MoE layers in a vision transformer (issue 26) ----------------------------------------------------

def test_vit_moe_parameters_total_and_active_by_hand():
    from fractalbench.baselines.moe import MoEViT

    model = build("switch_vit_lite_7_4")
    assert isinstance(model, MoEViT) and model.moe_at == (1, 3, 5)
    # dense ViT-Lite-7/4 (3,716,874) + per MoE layer 3 more experts of the MLP's size (fc1 256 x 512 + 512,
    # fc2 512 x 256 + 256: 262,912 each) and a router 256 x 4 (expert 0 is the dense MLP itself)
    expert, router = 131_584 + 131_328, 256 * 4
    assert sum(p.numel() for p in model.parameters()) == 3_716_874 + 3 * (3 * expert + router) == 6_086_154
    assert model.active_parameters() == 3_716_874 + 3 * router  # one expert per token, as the dense MLP
    for layer, j in zip(model.moe, model.moe_at):
        assert layer.experts[0].fc1 is model.backbone.blocks[j].linear1
    ec = build("expert_choice_vit_lite_7_4")
    assert ec.active_parameters() == 3_716_874 + 3 * (router + expert)  # capacity factor 2: two experts per token


def test_a_dense_vit_checkpoint_upcycles_into_every_expert():
    from fractalbench.harness.weights import fit_weights

    dense = build("vit_lite_2_4", seed=1)
    model = build("switch_vit_lite_2_4", seed=2)
    assert fit_weights(model, dense.state_dict(), "the dense ViT") == "backbone"
    for expert in model.moe[0].experts:
        assert torch.equal(expert.fc1.weight, dense.blocks[1].linear1.weight)
        assert torch.equal(expert.fc2.bias, dense.blocks[1].linear2.bias)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # each token's output: x + p * MLP(x), p its top-1 probability (1/E at a zero router)
        torch.nn.init.zeros_(model.moe[0].router.weight)
        model.moe[0].capacity_factor = None
        v = dense
        h = v.blocks[0](v.embed(x))
        b = v.blocks[1]
        h = b.norm1(h + b.self_attn(b.pre_norm(h)))
        expected = v.head(h + 0.25 * b.linear2(F.gelu(b.linear1(h))))
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_vit_switch_capacity_overflow_drops_tokens_counted_by_hand():
    """Every token of the 2 images prefers expert 0: per image capacity ceil(1.25 x 17 / 4) = 6 tokens,
    so 11 of its 17 tokens (class token and 16 patches) are dropped and pass through the residual."""
    model = build("switch_vit_lite_2_4")
    with torch.no_grad():
        model.moe[0].router.weight.zero_()
        model.moe[0].router.weight[0].fill_(1.0)  # logit of expert 0: sum of the token's features; LN'd stream
        model.backbone.blocks[1].norm1.bias.fill_(5.0)  # every feature > 0 after norm1: expert 0 wins everywhere
    x = torch.randn(2, 3, 16, 16)
    out = contract.dynamic_forward(model, x)
    counts, dropped = expert_histogram(out.trace, 4)
    assert counts.tolist() == [[12, 0, 0, 0]] and dropped.tolist() == [22]
    assert out.trace.unit_counts["layer0_expert0"].tolist() == [6.0, 6.0]
    table = unit_table(model, x[:1])
    assert table["layer0_expert0"] == 128 * 128 + 128 * 128  # one token through a GELU MLP of ratio 1
    with torch.no_grad():
        assert counted_macs(lambda: contract.dynamic_forward(model, x[:1])) == table["base"] + 6 * 32_768


@pytest.mark.parametrize("name", ["switch_vit_lite_2_4", "moe_resnet20_top2"])
def test_a_training_step_under_bf16_autocast(name):
    """Under autocast a ViT's experts return bf16 into an fp32 stream (after its LayerNorm)."""
    model = build(name).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(contract.loss_terms(model, x, y).values())
    loss.backward()
    assert torch.isfinite(loss) and model.moe[0].router.weight.grad is not None


# ----- useful against padded expert compute (MoE-CAP's sparse accounting), by hand -----------------

def _hand_trace(layer0, layers=2):
    experts = torch.tensor(layer0)[:, None, :].expand(-1, layers, -1).clone()
    return contract.Trace(torch.zeros(len(layer0), dtype=torch.long), {}, experts=experts)


PER_TOKEN = {f"layer{layer}_expert{e}": float(e + 1) for layer in range(2) for e in range(4)}  # MACs 1, 2, 3, 4


def test_expert_compute_without_capacity_pads_to_the_busiest_expert_of_each_batch():
    """Noisy top-2, no capacity, 2 tokens x 2 choices per sample, batches of 2. Sample 0 [0, 1, 0, 2],
    sample 1 [0, 1, 0, 1], sample 2 [3, -1, 3, 3] (one choice dropped by a threshold).
    Useful: 2x1 + 2 + 3 = 7, 2x1 + 2x2 = 6, 3x4 = 12. Batch 1's busiest expert is 0 with 4 tokens,
    so every expert's buffer is 4 rows shared by 2 samples: 2 x (1+2+3+4) = 20 per sample; batch 2
    (sample 2 alone): expert 3 with 3 tokens, 3 x 10 = 30."""
    model = build("moe_resnet20_top2")
    layers = model.expert_compute(_hand_trace([[0, 1, 0, 2], [0, 1, 0, 1], [3, -1, 3, 3]]), PER_TOKEN, 2)
    first = layers[0]
    assert first["useful"].tolist() == [7.0, 6.0, 12.0] and first["padded"].tolist() == [20.0, 20.0, 30.0]
    assert (first["dropped"], first["routable"], first["tokens"], first["capacity"]) == (1, 12, 2, None)
    assert first["dispatch"] == "per batch of 2"


def test_expert_compute_with_a_per_sample_capacity_pads_every_expert_to_it():
    """Switch (top-1, capacity factor 1.25) with 4 tokens per sample: capacity ceil(1.25 x 4 / 4) = 2
    per expert, so padded = 2 x (1+2+3+4) = 20 per sample whatever the batch; sample 0 routes
    [0, 0, -1, 1] (useful 1+1+2 = 4), sample 1 [2, 3, 3, 2] (3+4+4+3 = 14)."""
    model = build("switch_resnet20")
    layers = model.expert_compute(_hand_trace([[0, 0, -1, 1], [2, 3, 3, 2]]), PER_TOKEN, 1)
    first = layers[0]
    assert first["capacity"] == 2 and first["dispatch"] == "per sample"
    assert first["useful"].tolist() == [4.0, 14.0] and first["padded"].tolist() == [20.0, 20.0]
    assert (first["dropped"], first["routable"]) == (1, 8)


def test_expert_compute_of_batch_wide_expert_choice_shares_the_batch_capacity():
    """Expert choice (capacity factor 2, 4 experts) over the batch, 1 token per sample (4 slots), 3
    samples in batches of 2: a batch of 2 tokens gives each expert min(2, ceil(2 x 2 / 4)) = 1 slot,
    10 MACs of buffers over 2 samples = 5 each; the last batch (1 token): min(1, ceil(2/4)) = 1 slot,
    10 MACs. Sample 0 taken by experts 0 and 1 (useful 3), sample 1 by 2 and 3 (7), sample 2 by
    none (dropped: -1 in its first slot)."""
    model = build("expert_choice_resnet20")
    empty = -2
    trace = _hand_trace([[0, 1, empty, empty], [empty, empty, 2, 3], [-1, empty, empty, empty]])
    first = model.expert_compute(trace, PER_TOKEN, 2)[0]
    assert first["useful"].tolist() == [3.0, 7.0, 0.0] and first["padded"].tolist() == [5.0, 5.0, 10.0]
    assert (first["dropped"], first["routable"], first["tokens"]) == (1, 3, 1)


def test_vit_switch_overflow_useful_against_padded_rows_by_hand():
    """The overflow case above through the rows: per image 6 of 17 tokens run expert 0 (6 x 32,768
    MACs useful); each of the 4 experts has a 6-token buffer (24 x 32,768 padded): utilization 1/4;
    22 of 34 assignments dropped."""
    from fractalbench.harness.metrics import expert_compute_rows

    model = build("switch_vit_lite_2_4")
    with torch.no_grad():
        model.moe[0].router.weight.zero_()
        model.moe[0].router.weight[0].fill_(1.0)
        model.backbone.blocks[1].norm1.bias.fill_(5.0)
    x = torch.randn(2, 3, 16, 16)
    trace = contract.dynamic_forward(model, x).trace
    rows = {r["metric"]: r for r in expert_compute_rows(model, trace, unit_table(model, x[:1]), 64, "routed")}
    assert rows["expert_macs_useful"]["value"] == 6 * 32_768
    assert rows["expert_macs_padded"]["value"] == 24 * 32_768
    assert rows["expert_utilization"]["value"] == 0.25
    assert rows["tokens_dropped"]["value"] == 22 / 34 and rows["tokens_dropped"]["n"] == 34
