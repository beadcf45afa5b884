"""CondConv on a CIFAR ResNet: parameters and MACs by hand (from layer shapes), the grouped-convolution
trick counted and computed like one convolution per sample, the per-sample loop vs the grouped path,
batch-1 vs batched, mask (K convolutions) vs compact, expert pruning by decision threshold against
the counted oracle, sparse upcycling that keeps the dense network exactly, DY-Conv's router, the
routing-weight report and the contract checker."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_helpers import counted_macs, unit_table

from fractalbench.baselines.dynamic_conv import CondConv2d, CondConvResNet, DyConvRouter, per_sample_conv
from fractalbench.harness import contract
from fractalbench.harness.checker import check_registered, run_checks, settle_batchnorm
from fractalbench.harness.metrics import flops
from fractalbench.harness.policies import ConfidencePolicy, DecisionThreshold
from fractalbench.harness.registry import create_model, model_card
from fractalbench.harness.results import make_row
from fractalbench.harness.train import frozen_part
from fractalbench.harness.weights import fit_weights

K = 4


def build(name="condconv_resnet20", seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_chans=3, **kw).eval()


@pytest.fixture(scope="module")
def table20():
    """condconv_resnet20's cost table at 32x32 (MACs depend on shapes only, not on weights or statistics)."""
    return flops.build_cost_table(build(), torch.randn(1, 3, 32, 32))


def settled(name="condconv_resnet20", n=8, size=32, seed=0, **kw):
    """A model whose batch norms hold the statistics of a random batch, and that batch."""
    model = build(name, seed, **kw)
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return settle_batchnorm(model, x), x


# ----- counts by hand ----------------------------------------------------------------------------------

def resnet_conv_layers(depth, size=32, widths=(16, 32, 64)):
    """(in, out, output side) of every residual-block 3x3 convolution of a CIFAR ResNet, in order."""
    n, layers, in_planes, side = (depth - 2) // 6, [], widths[0], size
    for stage, planes in enumerate(widths):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            side = (side + 2 - 3) // stride + 1
            layers += [(in_planes, planes, side), (planes, planes, side)]
            in_planes = planes
    return layers


def hand_counts(depth, k=K, size=32, classes=10, widths=(16, 32, 64)):
    """Parameters and per-image MACs of condconv_resnet<depth> with k experts (k=1 without routers:
    the dense ResNet), from layer shapes alone. Convolutions and linears count; BN, ReLU, pooling 0."""
    layers = resnet_conv_layers(depth, size, widths)
    stem_params, stem_macs = 3 * widths[0] * 9, 3 * widths[0] * 9 * size * size
    head_params, head_macs = widths[-1] * classes + classes, widths[-1] * classes
    bn_params = 2 * widths[0] + sum(2 * out for _, out, _ in layers)
    kernels = [cin * cout * 9 for cin, cout, _ in layers]  # P_l
    conv_macs = sum(p * side * side for p, (_, _, side) in zip(kernels, layers))
    dense = {"params": stem_params + bn_params + sum(kernels) + head_params,
             "macs": stem_macs + conv_macs + head_macs}
    if k == 1:
        return dense
    router_params = sum(cin * k + k for cin, _, _ in layers)
    router_macs = sum(cin * k for cin, _, _ in layers)
    return {"params": dense["params"] + (k - 1) * sum(kernels) + router_params,
            "macs": dense["macs"] + k * sum(kernels) + router_macs,
            "base": stem_macs + router_macs + head_macs, "router_macs": router_macs, "head_macs": head_macs,
            "aggregate": kernels, "conv": [p * side * side for p, (_, _, side) in zip(kernels, layers)],
            "mix": [cout * side * side for _, cout, side in layers],
            "mixed_network_params": dense["params"] + router_params}


def test_hand_counts_reproduce_the_projects_dense_resnet20():
    dense = hand_counts(20, k=1)
    assert dense["macs"] == 40_551_040  # the project's resnet20: 40.55 M MACs (conv + FC, option A)
    model = build("resnet20")
    assert dense["params"] == sum(p.numel() for p in model.parameters()) == 269_722
    assert flops.build_cost_table(model, torch.randn(1, 3, 32, 32)).exits[0] == dense["macs"]


def test_condconv_resnet20_parameters_and_macs_match_hand_computation(table20):
    hand = hand_counts(20)
    # 40,551,040 dense + K x 267,264 (mixing the 18 kernels) + 624 x K (routers) = 41,622,592
    assert hand["macs"] == 40_551_040 + 4 * 267_264 + 4 * 624 == 41_622_592
    # 269,722 dense + 3 x 267,264 (more experts) + 18 routers (624 x 4 weights + 18 x 4 biases) = 1,074,082
    assert hand["params"] == 269_722 + 3 * 267_264 + 4 * 624 + 4 * 18 == 1_074_082
    model = build()
    x, table = torch.randn(1, 3, 32, 32), table20
    assert table.exits == (hand["macs"],)
    assert flops.count_macs(model, x).total == hand["macs"]
    counts = flops.parameter_counts(model)
    assert counts == {"params": hand["params"], "params_active": hand["params"]}
    assert model.mixed_network_parameters() == hand["mixed_network_params"] == 272_290
    expected = {"base": hand["base"]}
    for layer, (agg, conv, mix) in enumerate(zip(hand["aggregate"], hand["conv"], hand["mix"])):
        expected.update({f"layer{layer}_aggregate": agg, f"layer{layer}_conv": conv, f"layer{layer}_mix": mix})
    assert dict(table.units) == expected
    assert unit_table(model, x) == expected  # plain FlopCounterMode, without the harness's counter
    assert table.unit_roles["base"] == {"backbone": 3 * 16 * 9 * 32 * 32, "heads": hand["head_macs"], "gates": 0,
                                        "routers": hand["router_macs"]}
    rows = {r["metric"]: r["value"] for r in flops.cost_rows(model, x, fvcore=False, table=table)}
    assert rows["macs"] == hand["macs"] and rows["params"] == hand["params"]
    trace = contract.dynamic_forward(model, torch.randn(3, 3, 32, 32)).trace
    assert contract.executed_macs(trace, table).tolist() == [hand["macs"]] * 3
    # mask mode, the mixture-of-experts form: K convolutions per layer, then K outputs mixed; no kernel mixing
    masked_macs = hand["base"] + sum(4 * conv + 4 * mix for conv, mix in zip(hand["conv"], hand["mix"]))
    assert masked_macs == hand["macs"] - 4 * 267_264 + 3 * sum(hand["conv"]) + 4 * sum(hand["mix"])
    masked = contract.dynamic_forward(model, torch.randn(3, 3, 32, 32), mode="mask").trace
    assert contract.executed_macs(masked, table).tolist() == [masked_macs] * 3
    with flops.MacCounter(model) as counter, torch.no_grad():
        contract.dynamic_forward(model, torch.randn(1, 3, 32, 32), mode="mask")
    assert float(counter.result().total) == masked_macs


@pytest.mark.parametrize("name,experts,size,widths", [("condconv_resnet56", 2, 32, (16, 32, 64)),
                                                      ("condconv_resnet56", 8, 32, (16, 32, 64)),
                                                      ("condconv_resnet20", 4, 16, (8, 16, 32))])
def test_other_sizes_count_as_by_hand(name, experts, size, widths):
    depth = int(name.removeprefix("condconv_resnet"))
    hand = hand_counts(depth, k=experts, size=size, widths=widths)
    model = build(name, num_experts=experts, widths=widths)
    assert sum(p.numel() for p in model.parameters()) == hand["params"]
    assert flops.count_macs(model, torch.randn(1, 3, size, size)).total == hand["macs"]
    assert model.num_layers == 2 * 3 * ((depth - 2) // 6)


# ----- the grouped-convolution trick ---------------------------------------------------------------------

def test_grouped_convolution_counts_n_single_convolutions():
    n, c, out, side = 5, 6, 7, 9
    x, kernels = torch.randn(n, c, side, side), torch.randn(n, out, c, 3, 3)
    single = counted_macs(F.conv2d, x[:1], kernels[0], None, 2, 1)
    side_out = (side + 2 - 3) // 2 + 1
    assert single == out * c * 9 * side_out * side_out
    assert counted_macs(per_sample_conv, x, kernels, 2, 1) == n * single
    assert flops.count_macs(per_sample_conv, x, kernels, 2, 1).total == n * single
    grouped = per_sample_conv(x, kernels, 2, 1)
    for i in range(n):
        assert torch.allclose(grouped[i], F.conv2d(x[i:i + 1], kernels[i], None, 2, 1)[0], atol=1e-5)


def loop_layer(layer, x):
    """One CondConv layer, one sample at a time: its kernel sum_k r_k W_k, then an ordinary convolution."""
    outs = []
    for i in range(x.shape[0]):
        r = layer.router(x[i:i + 1])[0]
        kernel = sum(r[k] * layer.weight[k] for k in range(layer.num_experts))
        outs.append(F.conv2d(x[i:i + 1], kernel, None, layer.stride, layer.padding))
    return torch.cat(outs)


def loop_network(model, x):
    """The whole network with every CondConv layer evaluated by :func:`loop_layer`."""
    h = model.stem(x)
    for block in model.blocks():
        h = block(h, lambda conv, inp: loop_layer(conv, inp))
    return model.head(h)


@pytest.mark.parametrize("router", ["condconv", "dyconv"])
def test_grouped_path_equals_the_per_sample_loop_and_the_mixture_of_experts_form(router):
    torch.manual_seed(0)
    layer = CondConv2d(6, 5, 3, stride=2, padding=1, num_experts=3, router=router)
    x = torch.randn(4, 6, 9, 9)
    with torch.no_grad():
        compact, r, kept = layer(x)
        masked, _, _ = layer(x, mode="mask")
        expected = loop_layer(layer, x)
        experts = sum(r[:, k, None, None, None] * F.conv2d(x, layer.weight[k], None, 2, 1) for k in range(3))
    assert kept.all()
    assert torch.allclose(compact, expected, atol=1e-5) and torch.allclose(masked, expected, atol=1e-5)
    assert torch.allclose(experts, expected, atol=1e-5)  # the paper's sum_k r_k (W_k * x)
    p, side = 5 * 6 * 9, 5
    routing = 6 * 3 if router == "condconv" else 6 * 1 + 1 * 3  # FC 6 -> K, or FC 6 -> 6 // 4 = 1 -> K
    assert counted_macs(layer, x[:1]) == routing + 3 * p + p * side * side  # router + mixing + one convolution
    # K convolutions, then their outputs (5 channels of side x side) mixed by the K weights
    assert counted_macs(layer, x[:1], mode="mask") == routing + 3 * p * side * side + 3 * 5 * side * side


def test_network_grouped_path_equals_loop_and_batch_one_equals_batched():
    model, x = settled()
    with torch.no_grad():
        batched = model(x)
        loop = loop_network(model, x)
        singles = torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])
    scale = batched.abs().max()
    assert torch.allclose(batched, loop, atol=1e-5 * scale, rtol=1e-4)
    assert torch.allclose(batched, singles, atol=1e-5 * scale, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # different images, different outputs


# ----- decisions: routing weights and the decision threshold ----------------------------------------------

def test_threshold_drops_experts_and_skips_empty_kernels_compact_equals_mask_and_the_oracle(table20):
    model, x = settled()
    with torch.no_grad():
        weights = model._run(x)[1]
    threshold = float(weights.median())
    policy = DecisionThreshold((threshold,))
    with torch.no_grad():
        out = model.dynamic_forward(x, policy)
        masked = model.dynamic_forward(x, policy, "mask")
    # pruning changes the features, so later layers route differently: the trace's own weights decide
    assert torch.equal(out.trace.extras["routing_weights"][:, 0], weights[:, 0])
    kept = out.trace.extras["routing_weights"] >= threshold
    assert torch.equal(out.trace.experts, torch.where(kept, torch.arange(K), -1))
    none_kept = ~kept.any(-1)
    assert none_kept.any() and kept.all(-1).any()  # some kernels empty (conv skipped), some full
    for layer in range(model.num_layers):
        assert out.trace.unit_counts[f"layer{layer}_aggregate"].tolist() == kept[:, layer].sum(1).float().tolist()
        assert out.trace.unit_counts[f"layer{layer}_conv"].tolist() == (~none_kept[:, layer]).float().tolist()
        assert masked.trace.unit_counts[f"layer{layer}_conv"].tolist() == [float(K)] * x.shape[0]
        assert masked.trace.unit_counts[f"layer{layer}_mix"].tolist() == [float(K)] * x.shape[0]
        assert masked.trace.unit_counts[f"layer{layer}_aggregate"].tolist() == [0.0] * x.shape[0]
    assert torch.allclose(out.logits, masked.logits, atol=1e-5 * out.logits.abs().max(), rtol=1e-4)
    table = table20
    samples = flops.oracle_check(model, x, table, policy, indices=list(range(x.shape[0])))
    assert all(s.agrees for s in samples)
    assert len({s.counted for s in samples}) > 1  # the threshold makes the cost differ per sample
    with flops.MacCounter(model) as counter, torch.no_grad():
        batched = model.dynamic_forward(x, policy)
    assert float(counter.result().total) == float(contract.executed_macs(batched.trace, table).sum())
    # by hand for sample 0: base + per layer (experts kept) x P_l + (any kept) x P_l H_l W_l
    hand = hand_counts(20)
    k0, any0 = kept[0].sum(-1).tolist(), kept[0].any(-1).tolist()
    sample0 = hand["base"] + sum(a * n + c * bool(m) for a, c, n, m in zip(hand["aggregate"], hand["conv"], k0, any0))
    assert samples[0].counted == sample0


def test_threshold_one_runs_no_block_convolution_and_zero_runs_everything(table20):
    model, x = settled(n=3)
    table = table20
    with torch.no_grad():
        nothing = model.dynamic_forward(x, DecisionThreshold((1.0,)))
        everything = model.dynamic_forward(x, DecisionThreshold((0.0,)))
        default = model.dynamic_forward(x)
    assert (nothing.trace.experts == -1).all()
    assert contract.executed_macs(nothing.trace, table).tolist() == [table["base"]] * 3
    assert contract.executed_macs(everything.trace, table).tolist() == [table.exits[0]] * 3
    assert torch.equal(everything.logits, default.logits)


def test_exit_policies_are_refused_and_bad_options_named():
    model = build()
    with pytest.raises(TypeError, match="decision_threshold"):
        model.dynamic_forward(torch.randn(1, 3, 32, 32), ConfidencePolicy(thresholds=()))
    with pytest.raises(ValueError, match="num_experts must be an integer >= 2"):
        build(num_experts=1)
    with pytest.raises(ValueError, match="router 'top2' is not one of condconv, dyconv"):
        build(router="top2")
    with pytest.raises(ValueError, match="upcycle_noise"):
        build(upcycle_noise=-1.0)


# ----- trained weights: sparse upcycling -------------------------------------------------------------------

def dense_resnet(x):
    model = build("resnet20", seed=3)
    return settle_batchnorm(model, x)


@pytest.mark.parametrize("router", ["condconv", "dyconv"])
def test_dense_weights_give_the_dense_resnets_logits(router):
    x = torch.randn(8, 3, 32, 32)
    dense = dense_resnet(x)
    model = build(router=router)
    assert fit_weights(model, dense.state_dict(), "a resnet20 checkpoint") == "backbone"
    with torch.no_grad():
        expected, got = dense(x), model.eval()(x)
    assert torch.allclose(got, expected, atol=1e-5 * expected.abs().max(), rtol=1e-4)
    convs = [c for stage in (dense.layer1, dense.layer2, dense.layer3) for b in stage for c in (b.conv1, b.conv2)]
    for layer, conv in zip(model.conv_layers(), convs):
        w = layer.weight.detach()
        if router == "dyconv":  # copies; the softmax weights sum to 1
            assert torch.equal(w, conv.weight.expand_as(w))
        else:  # router zeroed (every weight 1/2); experts 2W/K + noise summing to zero over the experts
            assert layer.router.fc.weight.abs().sum() == 0 and layer.router.fc.bias.abs().sum() == 0
            assert torch.allclose(w.sum(0) / 2, conv.weight, atol=1e-6)
            assert not torch.equal(w[0], w[1])  # the experts' symmetry is broken
    assert model.stem[1] is model.dense_backbone().stem[1]  # the loaded batch norms are the model's


def test_state_dict_holds_no_parameter_twice_and_not_the_dense_convolutions():
    model = build()
    keys = list(model.state_dict())
    assert len(keys) == len(set(keys))
    assert not any(k.startswith("_dense") for k in keys)
    assert "layer1.0.conv1.weight" in keys and tuple(model.state_dict()["layer1.0.conv1.weight"].shape) == (4, 16, 16,
                                                                                                           3, 3)
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))
    assert all(m is not model.dense_backbone() for m in model.modules())
    frozen = frozen_part(model, "backbone")  # `freeze: backbone` trains the experts and routers only
    frozen_ids = {id(p) for p in frozen.parameters()}
    trainable = [n for n, p in model.named_parameters() if id(p) not in frozen_ids]
    assert trainable and all(n.endswith(".weight") and ".conv" in n or ".router." in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if id(p) not in frozen_ids) == 4 * 267_264 + 2_568


def test_experts_and_routers_train_from_the_task_loss():
    model = build().train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    terms = model.loss_terms(x, y)
    assert set(terms) == {"cross_entropy"}
    terms["cross_entropy"].backward()
    for layer in model.conv_layers():
        assert layer.weight.grad.abs().sum() > 0 and layer.router.fc.weight.grad.abs().sum() > 0


# ----- DY-Conv's router ------------------------------------------------------------------------------------

def test_dyconv_attention_sums_to_one_and_its_temperature_anneals():
    model = build(router="dyconv")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        weights = model._run(x)[1]
    assert torch.allclose(weights.sum(-1), torch.ones(3, model.num_layers), atol=1e-6)
    routers = [layer.router for layer in model.conv_layers()]
    assert all(isinstance(r, DyConvRouter) for r in routers) and routers[0].fc1.out_features == 4  # 16 / 4
    seen = []
    for epoch in range(12):
        model.on_train_epoch(epoch, 12)
        seen.append(float(routers[-1].temperature))
    assert seen[0] == 30.0 and seen[9] == pytest.approx(1.0) and seen[11] == pytest.approx(1.0)
    assert seen[3] == pytest.approx(30 - 29 * 3 / 9)
    model.on_train_epoch(0, 2)
    assert float(routers[0].temperature) == 30.0
    model.on_train_epoch(1, 2)
    assert float(routers[0].temperature) == 1.0  # a short run still ends at the inference temperature
    assert "layer1.0.conv1.router.temperature" in model.state_dict()
    # router MACs: FC 16 -> 4 and 4 -> K on every layer with 16 input channels
    layer = model.conv_layers()[0]
    assert counted_macs(layer.router, torch.randn(1, 16, 8, 8)) == 16 * 4 + 4 * K


# ----- reporting -------------------------------------------------------------------------------------------

def test_extra_results_report_routing_weight_shares_and_percentiles():
    model, x = settled(n=6)
    extras = contract.extra_results(model, x)
    with torch.no_grad():
        weights = model._run(x)[1]
    assert extras.artifacts["routing_weights"].shape == (6, 18, K)
    assert np.allclose(extras.artifacts["routing_weights"], weights.numpy())
    assert len(extras.rows) == 18 * K
    for row in extras.rows:
        make_row(row.metric, row.value, row.unit, **row.fields)  # a catalogue metric with its unit
    by_layer = {}
    for row in extras.rows:
        d = row.fields["detail"]
        by_layer.setdefault(d["layer"], []).append(row.value)
        column = weights[:, d["layer"], d["expert"]]
        assert d["mean_weight"] == pytest.approx(float(column.mean()), rel=1e-6)
        for q in (10, 50, 90):  # linear interpolation between order statistics, as numpy's default
            assert d[f"p{q}"] == pytest.approx(float(np.percentile(column.numpy(), q)), rel=1e-5)
        assert row.value == pytest.approx(float(column.sum() / weights[:, d["layer"]].sum()), rel=1e-6)
    assert all(sum(v) == pytest.approx(1.0) for v in by_layer.values())
    upcycled = build()
    fit_weights(upcycled, dense_resnet(x).state_dict(), "weights")
    assert all(r.value == pytest.approx(1 / K) and r.fields["detail"]["mean_weight"] == 0.5
               for r in contract.extra_results(upcycled, x).rows)


def test_trace_histograms_count_experts_kept():
    model, x = settled(n=4)
    with torch.no_grad():
        trace = model.dynamic_forward(x, DecisionThreshold((0.5,))).trace
    hist = flops.trace_histograms(trace, num_experts=K)
    kept = trace.experts >= 0
    for layer in range(model.num_layers):
        assert hist["expert_counts"][layer] == kept[:, layer].sum(0).tolist()
        assert hist["expert_dropped"][layer] == int((~kept[:, layer]).sum())


def test_card_and_kind():
    card = model_card("condconv_resnet20")
    assert card.dynamic_kind == "routed" and contract.dynamic_kind(build()) == "routed"
    assert card.reference["imagenet_top1_efficientnet_condconv_b0_8experts"] == 78.3
    assert card.reference["imagenet_madds_efficientnet_condconv_b0_8experts"] == 413e6
    assert isinstance(build(), CondConvResNet)


def test_fractalbench_check_is_all_ok():
    report = check_registered("condconv_resnet20")
    assert report.ok, report.text()
    assert all(r.status == "ok" for r in report.results), report.text()


def test_dyconv_router_passes_every_check():
    model, x = settled(router="dyconv", size=16)
    report = run_checks(model, x, num_classes=10)
    assert all(r.status == "ok" for r in report.results), report.text()


class MaskSkipsAConvolution(CondConvResNet):
    """Declares the convolutions replaced in mask mode too, and charges none there: cheaper than compact."""

    mask_replaces = {"layer*_aggregate": "layer*_mix", "layer*_conv": "layer*_mix"}

    def _trace(self, weights, kept, mode):
        trace = super()._trace(weights, kept, mode)
        if mode == "mask":
            for unit, counts in trace.unit_counts.items():
                if unit.endswith(("_conv", "_mix")):
                    counts.zero_()
        return trace


@pytest.mark.parametrize("declared,message", [
    (True, "cost fewer MACs in mask mode than in compact mode"),
    (False, "run fewer times than in compact mode")])
def test_masked_mode_check_allows_declared_replaced_units_only_while_mask_costs_no_less(declared, message):
    torch.manual_seed(0)
    model = MaskSkipsAConvolution(20, 10, 3, widths=(4, 8, 8)).eval()
    if not declared:
        model.mask_replaces = {}
    x = torch.randn(4, 3, 16, 16)
    settle_batchnorm(model, x)
    results = {r.name: r for r in run_checks(model, x, num_classes=10).results}
    assert results["masked mode"].status == "FAIL" and message in results["masked mode"].detail
    honest = CondConvResNet(20, 10, 3, widths=(4, 8, 8)).eval()
    settle_batchnorm(honest, x)
    assert {r.name: r for r in run_checks(honest, x, num_classes=10).results}["masked mode"].status == "ok"
