"""A-ViT token halting: the cost table by hand (per token and per query-key pair), halting and the
class token's mean field by hand with fixed halting scores, a halted class token ending its sample,
the ponder and prior losses by hand, compact equal to masked, and the counted MACs of each sample."""
import math

import pytest
import torch
from model_helpers import counted_macs, unit_table

from fractalbench.baselines.token_halting import HaltingViT
from fractalbench.harness import contract
from fractalbench.harness.policies import DecisionThreshold
from fractalbench.harness.registry import create_model

# ViT-Lite-2/4 (dimension 128, MLP 128): per token qkv 128 x 384 + proj 128 x 128 + MLP 2 x 128 x 128;
# per query-key pair the two attention products, 2 x 128
PER_TOKEN, PER_PAIR = 49_152 + 16_384 + 32_768, 2 * 128


def fixed_scores(score: float, **kw) -> HaltingViT:
    """Every token's halting score is ``score`` at every layer (gate_scale 0)."""
    torch.manual_seed(0)
    return create_model("haltvit_lite_2_4", gate_scale=0.0, gate_center=-math.log(score / (1 - score)), **kw).eval()


def test_cost_table_per_token_and_per_pair_by_hand():
    model = fixed_scores(0.6)
    table = unit_table(model, torch.randn(1, 3, 16, 16))
    for layer in range(2):
        assert table[f"layer{layer}_token"] == PER_TOKEN + PER_PAIR
        assert table[f"layer{layer}_pairs"] == 2 * PER_PAIR
    # a layer on n tokens: n x (L + P) + n (n - 1) / 2 x 2 P = n L + n^2 P
    n = 17
    assert n * table["layer0_token"] + n * (n - 1) // 2 * table["layer0_pairs"] == n * PER_TOKEN + n * n * PER_PAIR


def test_fixed_scores_halt_by_hand_and_the_class_token_is_its_mean_field():
    model = fixed_scores(0.6)
    x = torch.randn(3, 3, 16, 16)
    v = model.backbone
    with torch.no_grad():
        # threshold 0.99: 0.6 after layer 1 runs on, layer 2 halts everything with the remainder 0.4
        out = contract.dynamic_forward(model, x)
        h1 = v.blocks[0](v.embed(x))
        h2 = v.blocks[1](h1)
        assert torch.allclose(out.logits, v.head.fc(v.head.norm(0.6 * h1[:, 0] + 0.4 * h2[:, 0])), atol=1e-5)
        assert out.trace.extras["token_depth"].eq(2).all() and out.trace.gates.all()
        # threshold 0.5: every token, the class token too, halts after layer 1; the samples stop there
        early = contract.dynamic_forward(model, x, DecisionThreshold((0.5,)))
        assert torch.allclose(early.logits, v.head.fc(v.head.norm(h1[:, 0])), atol=1e-5)
        assert early.trace.extras["token_depth"].eq(1).all()
        assert early.trace.unit_counts["layer1_token"].eq(0).all()
        table = unit_table(model, x[:1])
        assert counted_macs(lambda: contract.dynamic_forward(model, x[:1], DecisionThreshold((0.5,)))) == (
            table["base"] + 17 * PER_TOKEN + 17 * 17 * PER_PAIR)


def test_ponder_and_prior_losses_by_hand():
    model = fixed_scores(0.6)  # halting mass 0.6 at layer 1, remainder 0.4 at layer 2; prior centred at layer 1
    terms = model.loss_terms(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert terms["ponder"].item() == pytest.approx(5e-4 * (2 + 0.4))
    prior = torch.tensor([1.0, math.exp(-0.5)])
    prior /= prior.sum()
    kl = 0.6 * math.log(0.6 / prior[0].item()) + 0.4 * math.log(0.4 / prior[1].item())
    assert terms["distribution"].item() == pytest.approx(0.1 * kl, rel=1e-4)


def test_compact_equals_masked_and_each_sample_costs_what_it_ran():
    torch.manual_seed(0)
    model = create_model("haltvit_lite_2_4").eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        compact = contract.dynamic_forward(model, x)
        masked = contract.dynamic_forward(model, x, mode="mask")
    assert torch.allclose(compact.logits, masked.logits, atol=1e-5)
    assert torch.equal(compact.trace.gates, masked.trace.gates)
    depths = compact.trace.extras["token_depth"]
    assert (depths == 1).any() and (depths == 2).any()  # tokens halt at both layers on this batch
    table = unit_table(model, x[:1])
    for i in range(4):
        with torch.no_grad():
            one = contract.dynamic_forward(model, x[i:i + 1])
            macs = counted_macs(contract.dynamic_forward, model, x[i:i + 1])
        assert macs == contract.executed_macs(one.trace, table).item()
        assert torch.equal(one.trace.gates, compact.trace.gates[i:i + 1])
