"""BlockDrop: parameter and MAC counts by hand, the ResNet it is built on (all blocks kept = the
ResNet's logits), real dropping (compact vs mask, block hooks, counted MACs vs the cost table),
batch-1 vs batched decisions, the reward and policy gradient by hand, the curriculum, and both
training stages through the harness's trainer."""
import math

import pytest
import torch
from model_helpers import counted_macs, unit_table, warm_batchnorm
from torch.utils.data import TensorDataset

from fractalbench.baselines.blockdrop import (
    KEEP_BIAS,
    BlockDrop,
    block_usage,
    blockdrop_reward,
    bounded_probs,
    curriculum_entropy,
    drop_rates,
    policy_gradient_loss,
)
from fractalbench.baselines.resnet import CifarResNet
from fractalbench.harness import contract
from fractalbench.harness.checker import settle_batchnorm
from fractalbench.harness.policies import DecisionThreshold, make_policy
from fractalbench.harness.registry import create_model, list_models, model_card
from fractalbench.harness.train import TrainConfig, train_model
from fractalbench.harness.weights import fit_weights

# ----- helpers ---------------------------------------------------------------------------------------


def small(depth=20, seed=0, in_chans=1, **kw) -> BlockDrop:
    """A BlockDrop on a random ResNet for 16x16 one-channel inputs (the digits' size), eval mode."""
    torch.manual_seed(seed)
    return BlockDrop(depth, num_classes=10, in_chans=in_chans, **kw).eval()


def split_policy(model, x) -> None:
    """Shift the policy's output biases so that every block's keep probability has its threshold 0.5
    between the two middle samples of ``x``: the learned decisions split the batch at every block."""
    with torch.no_grad():
        logits = model.policy(x).sort(0).values
        mid = x.shape[0] // 2
        model.policy.head[-1].bias -= (logits[mid - 1] + logits[mid]) / 2


def digits_batch(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=gen)


# ----- parameters, registration --------------------------------------------------------------------

# ResNet-(6n+2), option A, 10 classes, 3 channels: 97,216 n - 21,926 parameters (one input channel: 144 x 2 = 288
# fewer, the stem's 3x3 conv). Policy = ResNet-8 with a 64 -> K classifier: stem 432 + BN 32, block 16->16
# 4,608 + 64, block 16->32 13,824 + 128, block 32->64 55,296 + 256, linear 65 K -> 74,640 + 65 K.
def resnet_params(n, in_chans=3):
    return 97_216 * n - 21_926 - 144 * (3 - in_chans)


def policy_params(k, in_chans=3):
    return 74_640 + 65 * k - 144 * (3 - in_chans)


@pytest.mark.parametrize("name,n", [("blockdrop_resnet20", 3), ("blockdrop_resnet32", 5),
                                    ("blockdrop_resnet56", 9), ("blockdrop_resnet110", 18)])
def test_parameter_counts_by_hand(name, n):
    with torch.device("meta"):
        model = create_model(name, num_classes=10, in_chans=3)
        gray = create_model(name, num_classes=10, in_chans=1)
    assert model.num_blocks == 3 * n
    assert sum(p.numel() for p in model.policy.parameters()) == policy_params(3 * n)
    assert sum(p.numel() for p in model.parameters()) == resnet_params(n) + policy_params(3 * n)
    assert sum(p.numel() for p in gray.parameters()) == resnet_params(n, 1) + policy_params(3 * n, 1)
    assert policy_params(54) == 78_150 and resnet_params(18) + policy_params(54) == 1_806_112


def test_registered_names_cards_and_errors():
    assert {"blockdrop_resnet20", "blockdrop_resnet32", "blockdrop_resnet56", "blockdrop_resnet110"} <= set(
        list_models("blockdrop*"))
    card = model_card("blockdrop_resnet110")
    assert card.family == "blockdrop" and card.dynamic_kind == "gated"
    assert card.reference["blockdrop_top1_cifar10"] == 93.6
    assert card.reference["blockdrop_blocks_used_cifar10"] == 16.933
    assert "stage2.lr=0.0001" in card.paper_recipe and "no published CIFAR number" in model_card(
        "blockdrop_resnet56").reference_source
    model = small()
    assert isinstance(model.dense_backbone(), CifarResNet) and model.dense_backbone() is model.backbone
    assert model.block_names == ("layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2",
                                 "layer3.0", "layer3.1", "layer3.2")
    assert contract.dynamic_kind(model) == "gated" and contract.cost_roles(model) == {
        "heads": ("backbone.head",), "gates": ("policy",)}
    with pytest.raises(ValueError, match="training_stage 'rl' is not one of curriculum, joint"):
        model.training_stage = "rl"
    with pytest.raises(ValueError, match="alpha must lie in"):
        small(alpha=0.4)
    with pytest.raises(ValueError, match="curriculum_step must be None"):
        small(curriculum_step=0)
    with pytest.raises(ValueError, match="forced_keep needs 9 bits"):
        model.dynamic_forward(digits_batch(2), forced_keep=[True, False])
    with pytest.raises(ValueError, match="exit"):
        contract.forced_forward(model, digits_batch(2), 1)


# ----- the ResNet inside ---------------------------------------------------------------------------

def test_every_block_kept_is_the_resnet_with_the_same_weights():
    """A trained ResNet's state dict loads into the dense backbone (the harness's weights path);
    with every block kept (forced, threshold 0, or the forced exit) the logits are the ResNet's."""
    torch.manual_seed(3)
    resnet = settle_batchnorm(CifarResNet(20, 10, 1), digits_batch(32, seed=1))
    model = small(seed=5)
    assert fit_weights(model, resnet.state_dict(), "in the test") == "backbone"
    x = digits_batch(6)
    with torch.no_grad():
        expected = resnet(x)
        forced = model.dynamic_forward(x, forced_keep=[True] * 9)
        everything = model.dynamic_forward(x, DecisionThreshold((0.0,)))
        assert torch.allclose(forced.logits, expected, atol=1e-5)
        assert torch.allclose(everything.logits, expected, atol=1e-5) and bool(everything.trace.gates.all())
        assert torch.allclose(model.forward_exits(x)[0], expected, atol=1e-5)
        # loading opened the policy (output bias KEEP_BIAS): the learned decisions start as the ResNet
        learned = model.dynamic_forward(x)
        assert bool(learned.trace.gates.all()) and torch.allclose(learned.logits, expected, atol=1e-5)
        assert (model.policy.head[-1].bias == KEEP_BIAS).all()
        # every block dropped: stem, the option-A shortcuts of the two downsampling blocks, classifier
        b = model.backbone
        nothing = model.dynamic_forward(x, forced_keep=[False] * 9).logits
        assert torch.allclose(nothing, b.head(b.layer3[0].shortcut(b.layer2[0].shortcut(b.stem(x)))), atol=1e-5)


# ----- real dropping and cost ------------------------------------------------------------------------

# 16x16, one channel. ResNet-20 blocks: stage 1 2 x 16x16x16x16x9 = 1,179,648 each; stage 2 first
# 8x8x32x16x9 + 8x8x32x32x9 = 884,736, others 1,179,648; stage 3 first 4x4x64x32x9 + 4x4x64x64x9 =
# 884,736, others 1,179,648. Stem 16x16x16x9 = 36,864; classifier 64 x 10 = 640.
# Policy (ResNet-8): stem 36,864 + blocks 1,179,648 + 884,736 + 884,736 + linear 64 x 9 = 2,986,560.
BLOCK_MACS = [1_179_648] * 3 + [884_736, 1_179_648, 1_179_648] * 2
STEM, HEAD, POLICY = 36_864, 640, 2_986_560


def test_cost_units_by_hand():
    model = small()
    table = unit_table(model, digits_batch(1))
    assert list(table) == ["policy", "base"] + [f"block_{k}" for k in range(9)]
    assert table["policy"] == POLICY and table["base"] == STEM + HEAD
    assert [table[f"block_{k}"] for k in range(9)] == BLOCK_MACS
    units = {u.name: u for u in model.cost_units()}
    assert units["policy"].baseline is None and units["base"].baseline == "policy"
    assert all(units[f"block_{k}"].baseline == "base" for k in range(9))
    with torch.no_grad():
        assert counted_macs(model.forward_exits, digits_batch(1)) == POLICY + STEM + HEAD + sum(BLOCK_MACS)


def test_compact_equals_mask_and_runs_only_the_kept_rows():
    model = small(seed=1)
    x = digits_batch(8)
    warm_batchnorm(model, x)
    keep = torch.rand(8, 9, generator=torch.Generator().manual_seed(2)) > 0.5
    keep[:, 4] = False  # a block no sample keeps: never called
    keep[:, 5] = True  # one every sample keeps
    seen = {}
    hooks = [block.register_forward_hook(lambda m, args, out, k=k: seen.setdefault(k, []).append(args[0].shape[0]))
             for k, block in enumerate(model._blocks)]
    try:
        with torch.no_grad():
            compact = model.dynamic_forward(x, forced_keep=keep)
            seen_compact = dict(seen)
            seen.clear()
            mask = model.dynamic_forward(x, mode="mask", forced_keep=keep)
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(compact.logits, mask.logits, atol=1e-5)
    assert torch.equal(compact.trace.gates, keep) and torch.equal(mask.trace.gates, keep)
    assert seen_compact == {k: [int(keep[:, k].sum())] for k in range(9) if keep[:, k].any()}
    assert 4 not in seen_compact and seen == {k: [8] for k in range(9)}
    # executed MACs: counted on the batched call = the hand sum = the cost table x the trace
    hand = [POLICY + STEM + HEAD + sum(m for m, on in zip(BLOCK_MACS, row) if on) for row in keep.tolist()]
    with torch.no_grad():
        assert counted_macs(model.dynamic_forward, x, forced_keep=keep) == sum(hand)
        assert counted_macs(model.dynamic_forward, x, mode="mask", forced_keep=keep) == 8 * (
            POLICY + STEM + HEAD + sum(BLOCK_MACS))
    table = unit_table(model, x[:1])
    assert contract.executed_macs(compact.trace, table).tolist() == hand
    assert block_usage(compact.trace).tolist() == keep.sum(1).float().tolist()
    assert drop_rates(compact.trace).tolist() == pytest.approx((1 - keep.float().mean(0)).tolist())
    with torch.no_grad():  # and sample by sample at batch 1 (what the harness's oracle does)
        for i in range(8):
            assert counted_macs(model.dynamic_forward, x[i:i + 1], forced_keep=keep[i]) == hand[i]


def test_learned_decisions_batch1_equals_batched_and_cost_oracle():
    model = small(seed=2)
    x = digits_batch(12, seed=3)
    warm_batchnorm(model, x)
    split_policy(model, x)
    table = unit_table(model, x[:1])
    with torch.no_grad():
        batched = model.dynamic_forward(x)
        gates = batched.trace.gates
        assert 0 < gates.float().mean() < 1 and all(0 < c < 12 for c in gates.sum(0).tolist())
        for i in range(12):
            one = model.dynamic_forward(x[i:i + 1])
            assert torch.equal(one.trace.gates[0], gates[i])
            assert torch.allclose(one.logits[0], batched.logits[i], atol=1e-5)
            assert counted_macs(model.dynamic_forward, x[i:i + 1]) == contract.executed_macs(one.trace, table)[0]
        assert torch.equal(batched.trace.extras["gate_probs"] > 0.5, gates)
        assert torch.allclose(model(x), batched.logits)


def test_decision_threshold_moves_the_decisions_and_the_cost():
    model = small(seed=4)
    x = digits_batch(12, seed=5)
    warm_batchnorm(model, x)
    split_policy(model, x)
    table = unit_table(model, x[:1])
    with torch.no_grad():
        learned = model.dynamic_forward(x)
        outs = [model.dynamic_forward(x, DecisionThreshold((t,))) for t in (0.0, 0.3, 0.5, 0.7, 1.0)]
    probs = learned.trace.extras["gate_probs"]
    for t, out in zip((0.0, 0.3, 0.5, 0.7, 1.0), outs):
        assert torch.equal(out.trace.gates, probs > t)
    assert torch.equal(outs[2].logits, learned.logits)
    costs = [contract.executed_macs(o.trace, table).mean().item() for o in outs]
    assert costs[0] == POLICY + STEM + HEAD + sum(BLOCK_MACS) and costs[-1] == POLICY + STEM + HEAD
    assert costs == sorted(costs, reverse=True) and costs[1] > costs[2] > costs[3]
    with pytest.raises(TypeError, match="decision_threshold policy or None"):
        model.dynamic_forward(x, make_policy("confidence", 0.9))


# ----- reward and policy gradient by hand ------------------------------------------------------------

def test_reward_by_hand():
    # K = 4; samples: correct with 2 blocks (1 - 0.5^2), correct with every block (0), correct with none (1),
    # wrong with one block (-gamma)
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 0, 0])
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert blockdrop_reward(logits, y, keep, gamma=5.0).tolist() == [0.75, 0.0, 1.0, -5.0]
    assert blockdrop_reward(logits, y, keep, gamma=0.0).tolist()[3] == 0.0


def test_bounded_probabilities_and_policy_gradient_by_hand():
    assert bounded_probs(torch.tensor([0.0, 0.5, 1.0]), 0.8).tolist() == pytest.approx([0.2, 0.5, 0.8])
    # one sample, two blocks, bounded p = (0.5, 0.75), actions (keep, drop), advantage 2:
    # loss = -2 (log 0.5 + log 0.25); the decided mask (0, 1) keeps the second block's term only
    p = torch.tensor([[0.5, 0.75]], requires_grad=True)
    actions, advantage = torch.tensor([[1.0, 0.0]]), torch.tensor([2.0])
    loss = policy_gradient_loss(p, actions, advantage)
    assert loss.item() == pytest.approx(-2 * (math.log(0.5) + math.log(0.25)), rel=1e-6)
    loss.backward()
    # d loss / d p: kept block -A / p = -4 (raise it), dropped block A / (1 - p) = 8 (lower it)
    assert p.grad[0].tolist() == pytest.approx([-4.0, 8.0], rel=1e-6)
    masked = policy_gradient_loss(p.detach(), actions, advantage, torch.tensor([0.0, 1.0]))
    assert masked.item() == pytest.approx(-2 * math.log(0.25), rel=1e-6)
    # entropy term: sum_k -p log p over the decided blocks, mean over samples
    assert curriculum_entropy(torch.tensor([[0.5, 0.75]])).item() == pytest.approx(
        -(0.5 * math.log(0.5) + 0.75 * math.log(0.75)), rel=1e-6)
    assert curriculum_entropy(torch.tensor([[0.5, 0.75], [0.2, 0.75]]), torch.tensor([0, 1])).item() == pytest.approx(
        -0.75 * math.log(0.75), rel=1e-6)


def test_reinforce_step_moves_keep_probabilities_the_expected_way():
    """A gradient step on the surrogate raises the probability of an action with positive advantage
    and lowers that of one with negative advantage (a logit per block, SGD)."""
    logits = torch.zeros(1, 3, requires_grad=True)
    actions = torch.tensor([[1.0, 1.0, 0.0]])
    for advantage, direction in ((1.0, 1.0), (-1.0, -1.0)):
        logits.grad = None
        bounded = bounded_probs(torch.sigmoid(logits), 0.8)
        policy_gradient_loss(bounded, actions, torch.tensor([advantage])).backward()
        moved = torch.sigmoid(logits.detach() - 0.5 * logits.grad) - 0.5  # from p = 0.5
        assert (moved[0, :2] * direction > 0).all() and moved[0, 2] * direction < 0


def test_policy_learns_to_drop_blocks_that_change_nothing():
    """Residual blocks that are the identity (last BN scale 0): every path classifies as the full
    network, so the reward only counts blocks and the policy (trained alone, curriculum stage with
    every block decided, gamma 5) must lower every keep probability; labels = its own predictions."""
    model = small(seed=6)
    for block in model._blocks:
        torch.nn.init.zeros_(block.bn2.weight)
    x = digits_batch(32, seed=7)
    warm_batchnorm(model, x)
    with torch.no_grad():
        y = model.forward_exits(x)[0].argmax(1)
        before = model.keep_probabilities(x).mean().item()
    model.gamma, model.entropy_weight = 5.0, 0.0
    model.on_train_epoch(0, 1)  # a one-epoch curriculum decides every block
    assert int(model.decided_blocks) == 9
    opt = torch.optim.Adam(model.policy.parameters(), lr=0.01)
    torch.manual_seed(0)
    for _ in range(8):
        model.train()
        model.policy.eval()  # fixed BN statistics: only the policy's weights move
        opt.zero_grad()
        terms = model.loss_terms(x, y)
        assert set(terms) == {"reinforce", "entropy"}
        terms["reinforce"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model.keep_probabilities(x)
        assert after.mean().item() < before - 0.2
        assert torch.equal(model.dynamic_forward(x).logits.argmax(1), y)  # dropping costs nothing here


# ----- curriculum and training stages ----------------------------------------------------------------

def test_curriculum_keeps_the_first_blocks():
    model = small()
    assert [model.curriculum_blocks(t, 3) for t in range(3)] == [3, 6, 9]
    model.curriculum_step = 1
    assert [model.curriculum_blocks(t, 20) for t in (0, 1, 8, 15)] == [1, 2, 9, 9]
    model.curriculum_step = None
    model.on_train_epoch(0, 3)
    assert int(model.decided_blocks) == 3
    x = digits_batch(6)
    with torch.no_grad():  # threshold 1: the policy keeps nothing, the curriculum keeps the first six
        out = model.dynamic_forward(x, DecisionThreshold((1.0,)))
    assert out.trace.gates.tolist() == [[True] * 6 + [False] * 3] * 6
    assert (out.trace.extras["gate_probs"][:, :6] == 1).all()
    # the state travels with the weights: a model rebuilt from its state dict decides the same
    rebuilt = small(seed=9)
    rebuilt.load_state_dict(model.state_dict())
    assert int(rebuilt.decided_blocks) == 3
    # training: the sampled and greedy actions of the first blocks are forced and the entropy term covers
    # the decided blocks only, so only the last three blocks' logits get a gradient from either term
    model.train()
    y = torch.arange(6)
    torch.manual_seed(1)
    x = digits_batch(6, seed=11)
    head = model.policy.head[-1].weight
    for _ in range(10):  # a step where the sampled path's reward differs from the greedy one's
        terms = model.loss_terms(x, torch.randint(0, 10, (6,)))
        assert set(terms) == {"reinforce", "entropy"}
        grads = [torch.autograd.grad(terms[name], head, retain_graph=True)[0] for name in ("reinforce", "entropy")]
        if grads[0][6:].abs().sum() > 0:
            break
    for grad in grads:
        assert grad[:6].abs().sum() == 0 and grad[6:].abs().sum() > 0
    model.training_stage = "joint"
    model.on_train_epoch(0, 3)
    assert int(model.decided_blocks) == 9
    assert set(model.loss_terms(x, y)) == {"reinforce", "cross_entropy"}


def test_curriculum_stage_leaves_the_resnet_alone():
    """Stage ``curriculum`` runs the ResNet in eval mode without gradient (its BN statistics and
    weights stay) even when the trainer puts the whole model in training mode."""
    model = small(seed=3)
    x, y = digits_batch(8), torch.arange(8)
    warm_batchnorm(model, x)
    stats = model.backbone.layer2[1].bn1.running_mean.clone()
    model.train()
    terms = model.loss_terms(x, y)
    sum(terms.values()).backward()
    assert torch.equal(model.backbone.layer2[1].bn1.running_mean, stats) and model.backbone.training
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.policy.head[-1].weight.grad.abs().sum() > 0


def test_joint_stage_trains_both_networks():
    model = small(seed=4, training_stage="joint")
    x, y = digits_batch(8), torch.arange(8)
    warm_batchnorm(model, x)
    model.train()
    torch.manual_seed(2)
    terms = model.loss_terms(x, y)
    assert set(terms) == {"reinforce", "cross_entropy"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert model.backbone.head[-1].weight.grad.abs().sum() > 0 and model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert model.policy.stem[0].weight.grad is not None


def test_train_model_runs_both_stages_and_freeze_trains_only_the_policy():
    """The harness's trainer end to end on random 16x16 data: a curriculum stage under ``freeze:
    backbone`` (the ResNet's weights unchanged, the policy's moved, the curriculum completed), then a
    joint stage (the ResNet moves too)."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 16, 16, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    model = small(seed=5)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    policy = model.policy.head[-1].weight.clone()
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0, freeze="backbone")
    result = train_model(model, data, cfg)
    assert [set(h) for h in result.history] == [{"reinforce", "entropy", "loss"}] * 2
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())
    assert not torch.equal(policy, model.policy.head[-1].weight) and int(model.decided_blocks) == 9
    model.training_stage = "joint"
    train_model(model, data, TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0))
    assert not torch.equal(backbone["stem.0.weight"], model.backbone.stem[0].weight)
