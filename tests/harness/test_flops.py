"""Compute: MACs by hand, published counts, cost table vs per-sample counted oracle, fvcore cross-check."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fractalbench.harness import contract
from fractalbench.harness.early_exit import EarlyExitNetwork
from fractalbench.harness.metrics import (
    ZERO_MAC_OPS,
    CostTable,
    MacCounter,
    build_cost_table,
    cost_rows,
    count_macs,
    expected_cost_rows,
    expected_macs,
    fvcore_count,
    oracle_check,
    oracle_rows,
    parameter_counts,
    trace_histograms,
)
from fractalbench.harness.policies import ConfidencePolicy
from fractalbench.harness.registry import create_model, list_models, model_card


def median_confidence_policy(model, x):
    """Thresholds = per-exit median max-softmax on the batch, so samples spread over the exits."""
    with torch.no_grad():
        logits = contract.forward_exits(model, x)[:-1]
    return ConfidencePolicy(thresholds=tuple(torch.softmax(t, -1).amax(-1).quantile(0.5).item() for t in logits))


# ----- hand-computed formulas ---------------------------------------------------------------------

@pytest.mark.parametrize("n,cin,cout,k,stride,groups,hw",
                         [(1, 3, 8, 3, 1, 1, 8), (2, 4, 6, 3, 2, 2, 9), (3, 8, 8, 1, 1, 8, 5)])
def test_conv_macs_by_hand(n, cin, cout, k, stride, groups, hw):
    conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups)
    x = torch.randn(n, cin, hw, hw)
    out = (hw + 2 * (k // 2) - k) // stride + 1
    expected = n * cout * (cin // groups) * k * k * out * out  # bias additions are not MACs
    count = count_macs(conv, x)
    assert count.total == expected
    assert count.flops == 2 * expected
    assert count.by_operator == {"aten.convolution": expected}
    assert count.unsupported_ops == {}


def test_linear_matmul_and_vector_products_by_hand():
    assert count_macs(nn.Linear(7, 5), torch.randn(3, 7)).total == 3 * 7 * 5
    assert count_macs(nn.Linear(7, 5), torch.randn(2, 4, 7)).total == 2 * 4 * 7 * 5
    a, b = torch.randn(6, 3, 4), torch.randn(6, 4, 5)
    assert count_macs(torch.bmm, a, b).total == 6 * 3 * 4 * 5
    assert count_macs(lambda: torch.einsum("bij,bjk->bik", a, b)).total == 6 * 3 * 4 * 5
    # matrix-vector products: torch's registry has no formula; ours does
    m, v = torch.randn(5, 4), torch.randn(4)
    assert count_macs(torch.mv, m, v).total == 20
    assert count_macs(torch.dot, v, v).total == 4
    assert count_macs(torch.addmv, torch.zeros(5), m, v).total == 20
    assert count_macs(torch.addbmm, torch.zeros(3, 5), a, b).total == 6 * 3 * 4 * 5


def explicit_attention(mha, q, k, v):
    """``nn.MultiheadAttention(q, k, v)[0]`` (batch first) written with explicit matmuls."""
    (n, length, e), s, h = q.shape, k.shape[1], mha.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    heads = lambda t, w, b, m: F.linear(t, w, b).view(n, m, h, e // h).transpose(1, 2)  # noqa: E731
    qh, kh, vh = heads(q, wq, bq, length), heads(k, wk, bk, s), heads(v, wv, bv, s)
    attn = torch.softmax(torch.matmul(qh, kh.transpose(-2, -1)) / (e // h) ** 0.5, -1)
    return mha.out_proj(torch.matmul(attn, vh).transpose(1, 2).reshape(n, length, e))


def test_multi_head_attention_by_hand_in_train_and_fused_eval_mode():
    b, length, e, h = 2, 5, 8, 2
    # Q, K, V projections 3*B*L*E^2; Q K^T and A V: B*H*L*L*(E/H) each; output projection B*L*E^2
    hand = 3 * b * length * e * e + 2 * b * h * length * length * (e // h) + b * length * e * e
    assert hand == 3360
    torch.manual_seed(0)
    mha, x = nn.MultiheadAttention(e, h, batch_first=True), torch.randn(b, length, e)
    with torch.no_grad():
        assert torch.allclose(explicit_attention(mha, x, x, x), mha(x, x, x)[0], atol=1e-6)
    assert count_macs(lambda: explicit_attention(mha, x, x, x)).total == hand
    mha.train()
    train = count_macs(mha, x, x, x)
    mha.eval()
    fused = count_macs(mha, x, x, x)  # eval + no grad: one opaque op, the fast path
    assert fused.op_calls.get("aten._native_multi_head_attention") == 1, fused.op_calls
    fused_no_weights = count_macs(lambda: mha(x, x, x, need_weights=False))
    mha.train()
    sdpa = count_macs(lambda: mha(x, x, x, need_weights=False))  # attention by F.scaled_dot_product_attention
    for count in (train, fused, fused_no_weights, sdpa):
        assert count.total == hand and count.unsupported_ops == {}, count


def test_fused_attention_kernels_by_hand():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    assert count_macs(F.scaled_dot_product_attention, q, k, v).total == 2 * 3 * 5 * 7 * (4 + 6)
    assert (count_macs(lambda: torch.matmul(torch.softmax(q @ k.transpose(-2, -1), -1), v)).total
            == 2 * 3 * 5 * 7 * (4 + 6))
    # training (CPU flash kernel): forward L*S*2E, backward recomputes Q K^T then four products, L*S*5E
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    with MacCounter() as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    count = counter.result()
    assert count.op_calls.get("aten._scaled_dot_product_flash_attention_for_cpu_backward") == 1, count.op_calls
    assert count.total == 2 * 3 * 5 * 5 * (2 * 4) + 2 * 3 * 5 * 5 * (5 * 4) and count.unsupported_ops == {}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_transformer_encoder_fast_path_by_hand_also_on_nested_tensors():
    b, length, e, h, ffn = 2, 5, 8, 2, 16
    per_token = 3 * e * e + e * e + 2 * e * ffn  # projections + feed-forward
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(e, h, ffn, dropout=0.0, batch_first=True)
    x = torch.randn(b, length, e)
    hand = b * length * per_token + 2 * b * length * length * e
    layer.train()
    assert count_macs(layer, x).total == hand
    layer.eval()
    fused = count_macs(layer, x)
    assert fused.op_calls.get("aten._transformer_encoder_layer_fwd") == 1 and fused.total == hand
    # with a padding mask the encoder runs nested tensors: only the real tokens are computed
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, 3:] = True
    nested = count_macs(lambda: encoder(x, src_key_padding_mask=pad))
    lengths = (5, 3)
    assert nested.total == 2 * sum(n * per_token + 2 * n * n * e for n in lengths)
    assert nested.unsupported_ops == {}


def test_zero_mac_ops_are_free_and_the_rest_is_listed():
    x = torch.randn(2, 3, 8, 8)
    free = count_macs(lambda: F.max_pool2d(F.relu(F.batch_norm(x, torch.zeros(3), torch.ones(3))), 2).softmax(1).sum())
    assert free.total == 0 and free.unsupported_ops == {}
    assert {"aten.relu", "aten.max_pool2d_with_indices", "aten._softmax", "aten.sum"} <= set(free.op_calls)
    bilinear = nn.Bilinear(4, 5, 3)
    listed = count_macs(bilinear, torch.randn(2, 4), torch.randn(2, 5))
    assert listed.unsupported_ops == {"aten._trilinear": 1}  # no formula: reported, not silently 0
    assert "aten.convolution" not in ZERO_MAC_OPS and "aten.view" in ZERO_MAC_OPS
    a, b = torch.rand(4) > 0.5, torch.rand(4) > 0.5
    in_place = count_macs(lambda: a.clone().bitwise_and_(b).logical_or_(b).float().mul_(2).sigmoid_().eq_(1))
    assert in_place.total == 0 and in_place.unsupported_ops == {}
    assert {"aten.bitwise_and_", "aten.logical_or_", "aten.mul_", "aten.sigmoid_", "aten.eq_"} <= set(in_place.op_calls)


def test_by_module_names_follow_the_model_even_through_probes(tiny_models):
    net = tiny_models["tiny_two_exit"]().eval()
    count = count_macs(lambda x: net.forced_forward(x, 1), torch.randn(1, 2, 4, 4), module=net)
    assert count.by_module["TwoExitNet.stage0"] == 864
    assert count.by_module["TwoExitNet.stage1"] == 1296
    assert count.by_module["TwoExitNet.head1"] == 12


# ----- published counts --------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,classes,macs,macs_rel,params,params_abs", [
    ("resnet56", 32, 10, 125.5e6, 0.001, 0.85e6, 0.005e6),    # He et al. 2016 Table 6 (params rounded to 0.01M)
    ("resnet110", 32, 10, 252.9e6, 0.001, 1.7e6, 0.05e6),     # params published as 1.7M
    ("timm:resnet18", 224, 1000, 1.82e9, 0.005, 11.69e6, 0.005e6),  # torchvision: 1.81 GFLOPS (= MACs), 11.69M
    ("timm:resnet50", 224, 1000, 4.09e9, 0.005, 25.56e6, 0.005e6),  # torchvision: 4.09 GFLOPS (= MACs), 25.56M
])
def test_published_macs_and_parameters(name, size, classes, macs, macs_rel, params, params_abs):
    model = create_model(name, num_classes=classes).eval()
    count = count_macs(model, torch.randn(1, 3, size, size))
    assert count.total == pytest.approx(macs, rel=macs_rel)
    assert count.unsupported_ops == {}
    assert parameter_counts(model)["params"] == pytest.approx(params, abs=params_abs)


def test_fvcore_agrees_on_static_models_and_rows_store_both():
    model = create_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    fv = fvcore_count(model, x)
    assert fv.macs == count_macs(model, x).total == 40_551_040
    assert fv.total > fv.macs and "batch_norm" in fv.by_operator  # fvcore also counts norms and pooling
    assert fv.unsupported_ops == {"aten::add": 9, "aten::pad": 2}
    rows = {r["metric"]: r for r in cost_rows(model, x, model="resnet20")}
    assert rows["macs"]["value"] == rows["macs_fvcore"]["value"] == 40_551_040
    detail = json.loads(rows["macs_fvcore"]["detail"])
    assert detail["skipped_ops"] == {"aten::add": 9, "aten::pad": 2} and detail["ratio_to_harness"] == 1.0
    assert rows["flops"]["value"] == 2 * 40_551_040 and rows["params"]["value"] == 269_722
    assert rows["macs"]["model"] == "resnet20" and rows["macs"]["exit"] == 0 and rows["macs"]["batch_size"] == 1


# ----- cost tables, expected cost and the oracle on the tiny contract models -------------------------

def test_cost_tables_by_hand(tiny_models):
    x = torch.randn(1, 2, 4, 4)
    two = build_cost_table(tiny_models["tiny_two_exit"](), x)
    assert dict(two) == {"first": 876, "second": 1308} and two.exits == (876, 2184)
    gated = build_cost_table(tiny_models["tiny_gated"](), x)
    assert dict(gated) == {"base": 1184, "block_0": 2304, "block_1": 2304, "block_2": 2304}
    routed = build_cost_table(tiny_models["tiny_routed"](), x)
    assert routed["base"] == 532
    assert [routed[f"expert_{layer}_{e}"] for layer in range(2) for e in range(3)] == [16, 32, 48] * 2


def test_cost_table_keeps_training_flags_and_checks_its_input(tiny_models):
    model = tiny_models["tiny_two_exit"]().train()
    model.head0.eval()
    build_cost_table(model, torch.randn(1, 2, 4, 4))
    assert model.training and model.stage0.training and not model.head0.training
    with pytest.raises(ValueError, match="batch-1"):
        build_cost_table(model, torch.randn(2, 2, 4, 4))


@pytest.mark.parametrize("name", ["tiny_two_exit", "tiny_gated", "tiny_routed"])
@pytest.mark.parametrize("mode", ["compact", "mask"])
def test_oracle_equals_table_on_tiny_models(tiny_models, name, mode):
    torch.manual_seed(1)
    model = tiny_models[name]().eval()
    x = torch.randn(12, 2, 4, 4)
    policy = median_confidence_policy(model, x) if contract.num_exits(model) > 1 else None
    table = build_cost_table(model, x[:1])
    samples = oracle_check(model, x, table, policy, num_samples=12, mode=mode)
    assert len(samples) == 12 and all(s.agrees for s in samples), samples
    if mode == "compact":  # the decisions really differ, so the equality is not trivial
        assert len({s.counted for s in samples}) > 1
        batched = contract.dynamic_forward(model, x, policy, mode)
        assert contract.executed_macs(batched.trace, table).tolist() == [float(s.counted) for s in samples]


def test_expected_macs_is_the_mean_of_executed_macs(tiny_models):
    torch.manual_seed(0)
    model = tiny_models["tiny_two_exit"]().eval()
    x = torch.randn(40, 2, 4, 4)
    policy = median_confidence_policy(model, x)
    table = build_cost_table(model, x[:1])
    trace = contract.dynamic_forward(model, x, policy).trace
    cost = expected_macs(trace, table)
    n_first = int((trace.exit_index == 0).sum())
    assert cost.mean == pytest.approx((n_first * 876 + (40 - n_first) * 2184) / 40, rel=1e-12)
    assert cost.histograms["exit_counts"] == [n_first, 40 - n_first]
    assert cost.summary.p99 is None and cost.summary.n == 40  # p99 needs 100 samples
    rows = cost_rows(model, x[:1], {"conf": trace}, model="tiny")
    by = {(r["metric"], r["exit"]): r for r in rows}
    assert by[("expected_macs", None)]["value"] == pytest.approx(cost.mean)
    assert by[("expected_macs", None)]["policy"] == "conf" and by[("expected_macs", None)]["n"] == 40
    assert by[("expected_flops", None)]["value"] == pytest.approx(2 * cost.mean)
    assert by[("exit_fraction", 0)]["value"] == n_first / 40
    assert by[("macs", 1)]["value"] == 2184 and ("macs_fvcore", 0) not in by  # fvcore: static models only


def test_histograms_of_gates_and_experts():
    trace = contract.Trace(torch.tensor([0, 1, 1, 2]), {"u": torch.ones(4)},
                           gates=torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0]], dtype=torch.bool),
                           experts=torch.tensor([[[0, 1]], [[1, 1]], [[2, -1]], [[0, 0]]]))
    hist = trace_histograms(trace, num_exits=4)
    assert hist["exit_counts"] == [1, 2, 1, 0]
    assert hist["gate_rates"] == [0.75, 0.25]
    assert hist["expert_counts"] == [[3, 3, 1]] and hist["expert_dropped"] == [1]


def test_routed_rows_report_active_parameters_and_expert_load(tiny_models):
    torch.manual_seed(0)
    model = tiny_models["tiny_routed"]().eval()
    x = torch.randn(8, 2, 4, 4)
    trace = contract.dynamic_forward(model, x).trace
    rows = cost_rows(model, x[:1], trace, model="tiny_routed")
    metrics = {r["metric"]: r for r in rows}
    assert metrics["params"]["value"] == 307 and metrics["params_active"]["value"] == 307 - 240 + 120
    loads = [r for r in rows if r["metric"] == "expert_load"]
    assert len(loads) == 6
    for layer in range(2):
        assert sum(r["value"] for r in loads if json.loads(r["detail"])["layer"] == layer) == pytest.approx(1.0)


def test_expert_load_rows_carry_the_per_sample_spread():
    """Layer 0, three experts: sample 0 routes [0, 1], sample 1 [1, 1], sample 2 [2, dropped], sample
    3 nothing (both dropped, left out of the spread). Expert 1: 3 of 8 assignments overall; within
    each routing sample 1/2, 1, 0 -> median 1/2, min 0, max 1, n 3."""
    trace = contract.Trace(torch.zeros(4, dtype=torch.long), {"u": torch.ones(4)},
                           experts=torch.tensor([[[0, 1]], [[1, 1]], [[2, -1]], [[-1, -1]]]))
    table = CostTable(units={"u": 1.0}, exits=(1.0,), baselines={"u": None}, probes={}, exit_counts=(),
                      input_shape=(1,))
    loads = {json.loads(r["detail"])["expert"]: r for r in expected_cost_rows(trace, table, "p")
             if r["metric"] == "expert_load"}
    one = loads[1]
    assert one["value"] == 3 / 8 and one["n"] == 3 and one["p50"] == 0.5
    detail = json.loads(one["detail"])
    assert (detail["min"], detail["max"], detail["count"], detail["dropped"], detail["tokens"]) == (0.0, 1.0, 3, 3, 8)
    assert loads[0]["p50"] == 0.0 and loads[0]["p90"] == pytest.approx(0.4)  # shares 0.5, 0, 0


def test_oracle_rows_flag_a_wrong_cost_table(tiny_models):
    model = tiny_models["tiny_two_exit"]().eval()
    x = torch.randn(6, 2, 4, 4)
    table = build_cost_table(model, x[:1])
    policy = median_confidence_policy(model, x)
    ok = oracle_rows(model, x, table, policy, num_samples=6, model="tiny")[0]
    assert ok["metric"] == "macs_oracle_error" and ok["value"] == 0 and ok["error"] == "" and ok["n"] == 6
    assert ok["policy"] == policy.describe()
    wrong = dict(table.units, second=1000)
    bad = oracle_rows(model, x, type(table)(wrong, table.exits, table.baselines, table.probes, table.exit_counts,
                                            table.input_shape), policy, num_samples=6)[0]
    assert bad["value"] == 308 and bad["error"].startswith("oracle mismatch")


def test_early_exit_cascade_from_the_harness():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)) for _ in stages]
    net = EarlyExitNetwork(stages, heads).eval()
    x = torch.randn(10, 1, 6, 6)
    table = build_cost_table(net, x[:1])
    first, second = 1 * 4 * 9 * 36 + 12, 4 * 4 * 9 * 36 + 12
    assert table.exits == (first, first + second) and dict(table) == {"exit_0": first, "exit_1": first + second}
    assert all(s.agrees for s in oracle_check(net, x, table, median_confidence_policy(net, x), num_samples=10))


# ----- every registered dynamic model ------------------------------------------------------------------

SMALL_KWARGS: dict[str, dict] = {}  # builder options that make a slow model small (where the builder takes them)
DYNAMIC_MODELS = [n for n in list_models() if model_card(n).dynamic_kind != "static"]


@pytest.mark.parametrize("name", DYNAMIC_MODELS)
def test_oracle_equals_table_for_every_registered_dynamic_model(name):
    card = model_card(name)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=3, **SMALL_KWARGS.get(name, {})).eval()
    size = min(card.input_size, 32)
    x = torch.randn(8, 3, size, size)
    policy = median_confidence_policy(model, x) if card.dynamic_kind == "early_exit" else None
    table = build_cost_table(model, x[:1])
    assert len(table.exits) == contract.num_exits(model)
    assert all(b <= a for a, b in zip(table.exits[1:], table.exits)) or card.dynamic_kind != "early_exit"
    samples = oracle_check(model, x, table, policy, num_samples=4)
    assert all(s.agrees for s in samples), [(s.index, s.counted, s.table) for s in samples]
