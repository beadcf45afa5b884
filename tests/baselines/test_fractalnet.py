"""FractalNet: the expansion rule with merged joins, drop-path (local keeps one input, global runs
one column), parameter and MAC counts by hand, and the columns as a cascade of exits that really
stops and whose cost table agrees with FlopCounterMode sample by sample."""
import math

import pytest
import torch
from model_helpers import counted_macs, median_policy, unit_table, warm_batchnorm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fractalbench.baselines.fractalnet import FractalBlock, FractalNet, local_keep_mask
from fractalbench.harness.contract import executed_macs
from fractalbench.harness.policies import ConfidencePolicy, PatiencePolicy
from fractalbench.harness.registry import create_model, model_card

TINY = (4, 8, 8, 8, 8)
NO_DROPOUT = (0.0,) * 5


def expected_params(widths, columns, in_chans=3, classes=10) -> int:
    """Per block: C first convs see the block input, the other 2^C - 1 - C see w; BN 2w per conv."""
    total, c_in = 0, in_chans
    convs = 2 ** columns - 1
    for w in widths:
        total += 9 * (c_in * w * columns + w * w * (convs - columns)) + 2 * w * convs
        c_in = w
    return total + widths[-1] * classes + classes


def column_macs(widths, column, size=32, in_chans=3, classes=10) -> int:
    """Column c alone: per block one conv c_in -> w and 2^c - 1 convs w -> w at that block's size."""
    total, c_in = 0, in_chans
    for w in widths:
        total += 9 * size * size * (c_in * w + (2 ** column - 1) * w * w)
        c_in, size = w, math.ceil(size / 2)
    return total + widths[-1] * classes


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_model("fractalnet40", widths=TINY, dropout=NO_DROPOUT)
    return warm_batchnorm(model, torch.randn(32, 3, 32, 32))


def test_parameter_counts_by_hand():
    # 20 layers (C = 3): per block 3 convs from the block input, 4 convs w -> w, 7 BNs.
    # 153,536 + 812,800 + 3,247,616 + 12,983,296 + 16,522,240 + FC 5,130 = 33,724,618
    with torch.device("meta"):
        m20, m40 = create_model("fractalnet20"), create_model("fractalnet40")
    n20, n40 = (sum(p.numel() for p in m.parameters()) for m in (m20, m40))
    assert n20 == expected_params((64, 128, 256, 512, 512), 3) == 33_724_618
    assert n40 == expected_params((64, 128, 256, 512, 512), 4) == 76_106_634
    assert (m20.depth, m40.depth) == (20, 40)
    card = model_card("fractalnet20")
    assert card.reference["params"] == 38.6e6 and "33,724,618" in card.notes
    assert n20 / card.reference["params"] == pytest.approx(0.8737, abs=1e-3)  # the documented 4.9M gap
    assert "76,106,634" in model_card("fractalnet40").notes
    tiny_model = create_model("fractalnet40", widths=TINY, num_classes=7, in_chans=1)
    assert sum(p.numel() for p in tiny_model.parameters()) == expected_params(TINY, 4, in_chans=1, classes=7)


def test_merged_joins_follow_the_expansion_rule():
    block = FractalBlock(3, 2, 3).eval()
    # depth 1: column 2 alone; 2: columns 1, 2; 3: column 2; 4: every column (the block's last join)
    assert block.joins == [[(2, 0)], [(1, 0), (2, 1)], [(2, 2)], [(0, 0), (1, 1), (2, 3)]]
    assert [len(col) for col in block.columns] == [1, 2, 4]
    x = torch.randn(2, 2, 5, 5)
    c = block.columns
    with torch.no_grad():
        inner = (c[1][0](x) + c[2][1](c[2][0](x))) / 2            # f_2(z) = join(f_1(f_1(z)), conv(z))
        deep = c[2][3](c[2][2](inner))                             # f_1(f_1(.)) on the inner f_2
        expected = (c[0][0](x) + c[1][1](inner) + deep) / 3        # merged join of f_3
        assert torch.allclose(block(x), expected, atol=1e-6)
        assert torch.allclose(block.column_forward(x, 2), c[2][3](c[2][2](c[2][1](c[2][0](x)))))


def test_local_drop_path_always_keeps_one_input():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 4):
        masks = torch.stack([local_keep_mask(n, 0.15, gen) for _ in range(4000)])
        assert masks.any(dim=1).all()
        # P(drop) per input = 0.15, slightly less after rescuing all-dropped joins (prob 0.15^n)
        assert masks.logical_not().float().mean().item() == pytest.approx(0.15 * (1 - 0.15 ** (n - 1) / n), abs=0.02)
    extreme = torch.stack([local_keep_mask(4, 0.999, gen) for _ in range(500)])
    assert (extreme.sum(dim=1) >= 1).all() and (extreme.sum(dim=1) == 1).float().mean() > 0.99


def test_every_join_in_training_keeps_a_path():
    torch.manual_seed(0)
    block = FractalBlock(4, 2, 3, local_drop=0.9).train()
    x = torch.randn(2, 2, 4, 4)
    for _ in range(300):
        out = block(x)
        assert len(block.last_keep_masks) == 4  # joins with >= 2 inputs at depths 2, 4, 6, 8
        assert all(mask.any() for mask in block.last_keep_masks)
        assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_global_drop_path_runs_one_column_for_half_the_batch():
    torch.manual_seed(0)
    model = create_model("fractalnet20", widths=TINY, dropout=NO_DROPOUT, local_drop=0.0).train()
    sizes: dict[tuple[int, int, int], list[int]] = {}
    for b, block in enumerate(model.blocks):
        for c, column in enumerate(block.columns):
            for j, unit in enumerate(column):
                def record(m, a, o, key=(b, c, j)):
                    sizes.setdefault(key, []).append(a[0].shape[0])

                unit.register_forward_hook(record)
    x = torch.randn(8, 3, 32, 32)
    chosen_columns = set()
    for _ in range(12):
        sizes.clear()
        out = model(x)
        col, chosen = model.last_global_column, model.last_global_samples
        chosen_columns.add(col)
        assert out.shape == (8, 10) and len(chosen) == 4
        for (_b, c, _j), seen in sizes.items():
            # every conv runs once on the local half; the chosen column's convs also on the global half
            assert seen == ([4, 4] if c == col else [4])
        with torch.no_grad():  # the global half got exactly column `col` alone (batch statistics of that half)
            assert torch.allclose(out[chosen], model.forward_column(x[chosen], col), atol=1e-5)
    assert chosen_columns == {0, 1, 2}
    model.eval()
    sizes.clear()
    with torch.no_grad():
        model(x)
    assert model.last_global_column is None and all(seen == [8] for seen in sizes.values())


def test_macs_per_exit_at_32x32_by_hand():
    torch.manual_seed(0)
    widths = (16, 32, 64, 128, 128)
    model = create_model("fractalnet20", widths=widths).eval()
    x = torch.randn(1, 3, 32, 32)
    cols = [column_macs(widths, c) for c in range(3)]
    exits = [counted_macs(model.forced_forward, x, k) for k in range(3)]
    assert exits == [sum(cols[:k + 1]) for k in range(3)]
    assert exits == [4_572_416, 19_171_840, 53_825_280]  # column 0: 442,368 + 3 x 1,179,648 + 589,824 + FC 1,280
    # the full fractal net runs every conv once and the classifier once
    assert counted_macs(model, x) == sum(cols) - 2 * widths[-1] * 10
    # paper widths (64 ... 512), from the same formula: 67,834,880 / 296,101,888 / 845,233,152
    paper = [column_macs((64, 128, 256, 512, 512), c) for c in range(3)]
    assert [sum(paper[:k + 1]) for k in range(3)] == [67_834_880, 296_101_888, 845_233_152]


def test_forced_exit_runs_exactly_its_columns(tiny):
    x = torch.randn(3, 3, 32, 32)
    fired = set()
    hooks = [unit.register_forward_hook(lambda *a, c=c: fired.add(c))
             for block in tiny.blocks for c, column in enumerate(block.columns) for unit in column]
    try:
        with torch.no_grad():
            exits = tiny.forward_exits(x)
            for k in range(4):
                fired.clear()
                assert torch.equal(tiny.forced_forward(x, k), exits[k])
                assert fired == set(range(k + 1))
    finally:
        for h in hooks:
            h.remove()
    counts = [counted_macs(tiny.forced_forward, x[:1], k) for k in range(4)]
    assert counts == [sum(column_macs(TINY, c) for c in range(k + 1)) for k in range(4)]


def test_full_network_is_not_an_exit(tiny):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = tiny(x)
        assert torch.equal(full, tiny.forward_fractal(x))
        assert all(not torch.allclose(full, e) for e in tiny.forward_exits(x))


@pytest.mark.parametrize("name", ["confidence", "entropy"])
def test_batch_one_decisions_equal_batched_and_masked(tiny, name):
    torch.manual_seed(1)
    x = torch.randn(10, 3, 32, 32)
    policy = median_policy(tiny, x, name)
    with torch.no_grad():
        batched = tiny.dynamic_forward(x, policy)
        masked = tiny.dynamic_forward(x, policy, mode="mask")
        assert len(set(batched.trace.exit_index.tolist())) >= 3
        assert torch.equal(batched.trace.exit_index, masked.trace.exit_index)
        assert torch.allclose(batched.logits, masked.logits, atol=1e-5)
        assert masked.trace.unit_counts["exit_3"].tolist() == [1.0] * 10
        for i in range(len(x)):
            one = tiny.dynamic_forward(x[i:i + 1], policy)
            assert one.trace.exit_index.item() == batched.trace.exit_index[i].item()
            # the deepest column is 40 plain conv layers: batch-size-dependent conv rounding grows to
            # ~1e-3 there (measured: at most 9e-4 at batch 10 vs 1); a wrong sample or exit differs by O(1)
            assert torch.allclose(one.logits[0], batched.logits[i], rtol=1e-3, atol=2e-3)


def test_executed_macs_equal_counted_macs_sample_by_sample(tiny):
    torch.manual_seed(2)
    x = torch.randn(8, 3, 32, 32)
    table = unit_table(tiny, x[:1])
    assert [table[f"exit_{k}"] for k in range(4)] == [sum(column_macs(TINY, c) for c in range(k + 1)) for k in range(4)]
    for policy in (median_policy(tiny, x), PatiencePolicy(thresholds=(1.0,))):
        seen = set()
        for i in range(len(x)):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                out = tiny.dynamic_forward(x[i:i + 1], policy)
            assert executed_macs(out.trace, table).item() == counter.get_total_flops() // 2
            seen.add(out.trace.exit_index.item())
        assert len(seen) >= 2


def test_batch_one_really_stops_after_column_0(tiny):
    fired = []
    hook = tiny.blocks[0].columns[1][0].register_forward_hook(lambda *a: fired.append(1))
    try:
        with torch.no_grad():
            out = tiny.dynamic_forward(torch.randn(1, 3, 32, 32), ConfidencePolicy(thresholds=(0.0,)))
    finally:
        hook.remove()
    assert out.trace.exit_index.item() == 0 and fired == []


def test_training_step_on_digits_sized_input():
    torch.manual_seed(0)
    model = create_model("fractalnet20", widths=TINY, num_classes=10, in_chans=1).train()
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    terms = model.loss_terms(x, y)
    assert list(terms) == ["cross_entropy"] and torch.isfinite(terms["cross_entropy"])
    terms["cross_entropy"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (6, 10) and [e.shape for e in model.forward_exits(x)] == [(6, 10)] * 3


def test_bad_options_raise():
    with pytest.raises(ValueError, match="one rate per block"):
        FractalNet(widths=(4, 8), dropout=(0.0,))
    with pytest.raises(ValueError, match="local_drop"):
        FractalNet(widths=(4,), local_drop=1.0)
    with pytest.raises(ValueError, match="exits 0..2"):
        create_model("fractalnet20", widths=TINY).forced_forward(torch.randn(1, 3, 32, 32), 3)


def _batch_stat_reference(model, x, path):
    """The same path with every BN in plain training mode (batch statistics), on a copy."""
    import copy

    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    with torch.no_grad():
        return ref.forward_fractal(x) if path == 0 else ref.forward_column(x, path - 1)


def test_batchnorm_statistics_per_path_are_the_path_population_statistics():
    torch.manual_seed(0)
    model = create_model("fractalnet20", widths=TINY, dropout=NO_DROPOUT, num_classes=5, in_chans=1)
    x = torch.randn(12, 1, 16, 16) * 3 + 1
    model.eval()
    with torch.no_grad():
        before = model(x)
    # uncalibrated: the running statistics (fresh: mean 0, var 1), same as plain BatchNorm2d in eval
    plain = nn.BatchNorm2d(4).eval()
    bn = model.path_batchnorms()[0]
    h = torch.randn(2, 4, 3, 3)
    assert torch.equal(bn(h), plain(h))
    model.calibrate_batchnorm([x])  # one batch: population statistics = that batch's statistics
    # a BN is calibrated on the paths that run it: column c's units on the full path and column c's
    first = [b.columns[c][0][-2] for b in model.blocks for c in range(3)]
    assert [b.path_ready.tolist() for b in first[:3]] == [[True, True, False, False], [True, False, True, False],
                                                          [True, False, False, True]]
    with torch.no_grad():
        full, columns = model(x), model.forward_exits(x)
    torch.testing.assert_close(full, _batch_stat_reference(model, x, 0), rtol=1e-3, atol=2e-4)
    for k, logits in enumerate(columns):
        torch.testing.assert_close(logits, _batch_stat_reference(model, x, k + 1), rtol=1e-3, atol=2e-4)
    assert not torch.allclose(full, before)
    # paths really differ: the first BN of column 0 sees the same input on the full path and its
    # own path, a later join output differs, so the last block's statistics differ between paths
    last = model.blocks[-1].columns[0][0][-2]
    assert not torch.allclose(last.path_mean[0], last.path_mean[1])


def test_calibration_over_several_batches_is_exact_mean_and_biased_variance():
    torch.manual_seed(1)
    model = create_model("fractalnet20", widths=TINY, dropout=NO_DROPOUT, num_classes=5, in_chans=1)
    x = torch.randn(10, 1, 8, 8)
    first = model.blocks[0].columns[0][0]  # conv -> BN -> ReLU on the block input, same on every path
    model.calibrate_batchnorm([x[:3], x[3:]])
    with torch.no_grad():
        h = first[0](x)
    bn = first[1]
    assert bn.path_ready.tolist() == [True, True, False, False]  # column 0 runs on the full path and its own
    for path in (0, 1):
        torch.testing.assert_close(bn.path_mean[path], h.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.path_var[path], h.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


def test_trainer_calibrates_per_path_statistics_and_checkpoint_keeps_them(tmp_path):
    from torch.utils.data import TensorDataset

    from fractalbench.harness.checkpoints import read_checkpoint
    from fractalbench.harness.train import TrainConfig, train_model

    torch.manual_seed(0)
    model = create_model("fractalnet20", widths=TINY, num_classes=3, in_chans=1)
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.arange(16) % 3)
    ckpt = tmp_path / "m.pt"
    train_model(model, data, TrainConfig(epochs=2, batch_size=8, max_steps_per_epoch=1), checkpoint=ckpt)
    assert all(b.path_ready[0] and b.path_ready.sum() == 2 for b in model.path_batchnorms())
    fresh = create_model("fractalnet20", widths=TINY, num_classes=3, in_chans=1)
    fresh.load_state_dict(read_checkpoint(ckpt)["model"])
    x = torch.randn(4, 1, 8, 8)
    model.eval(), fresh.eval()
    with torch.no_grad():
        for a, b in zip(model.forward_exits(x) + [model(x)], fresh.forward_exits(x) + [fresh(x)]):
            assert torch.equal(a, b)
