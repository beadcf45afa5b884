"""Sparse attention (the LRA image task): block patterns and attention MACs by hand, the counted
MACs equal to the formula (partial last block included), block-sparse attention equal to full
attention where its pattern covers every block, grayscale pixel sequences, and clear errors."""
import pytest
import torch

from fractalbench.baselines.sparse_attention import (
    BlockSparseAttention,
    PixelSequenceTransformer,
    attention_macs,
    block_pattern,
    dense_equivalent,
)
from fractalbench.harness.metrics import MacCounter
from fractalbench.harness.registry import create_model, model_card


def test_longformer_pattern_and_macs_by_hand():
    pattern = block_pattern(16, "longformer", window=1, globals_=1)
    assert pattern[0] == list(range(16))  # the global block attends to everything
    assert pattern[1] == [0, 1, 2] and pattern[7] == [0, 6, 7, 8] and pattern[15] == [0, 14, 15]
    # 1,024 tokens in 16 blocks of 64: key blocks 16 + 3 + 13 x 4 + 3 = 74, each 64 x 64 query-key pairs,
    # two products of width 64
    assert attention_macs(1024, 64, "longformer", 64) == 2 * 64 * 64 * 64 * 74 == 38_797_312
    assert attention_macs(1024, 64, "full") == 2 * 1024 * 1024 * 64


def test_bigbird_random_blocks_are_fixed_distinct_and_outside_the_window():
    pattern = block_pattern(16, "bigbird", window=1, globals_=1, random=3, seed=0)
    assert pattern == block_pattern(16, "bigbird", window=1, globals_=1, random=3, seed=0)
    for q, keys in enumerate(pattern[1:], start=1):
        window = {k for k in (0, q - 1, q, q + 1) if 0 <= k < 16}
        assert len(keys) == len(set(keys)) == len(window) + 3 and window <= set(keys)
    with pytest.raises(ValueError, match="attention 'dense' is not one of full, longformer, bigbird"):
        block_pattern(4, "dense")


@pytest.mark.parametrize("attention, length, extra", [
    ("full", 300, {}), ("longformer", 1024, {}), ("longformer", 1000, {}), ("bigbird", 1000, {"random": 3})])
def test_counted_attention_macs_equal_the_formula(attention, length, extra):
    layer = BlockSparseAttention(32, 32, 2, length, attention, 64, **extra).eval()
    with torch.no_grad(), MacCounter(layer) as counter:
        layer(torch.randn(2, length, 32))
    count = counter.result()
    assert count.by_operator["aten.bmm"] == 2 * attention_macs(length, 32, attention, 64, **extra)
    assert count.total == count.by_operator["aten.bmm"] + 2 * length * (32 * 96 + 32 * 32)  # qkv and output


def test_a_pattern_that_covers_every_block_equals_full_attention():
    torch.manual_seed(0)
    sparse = BlockSparseAttention(32, 32, 2, 320, "longformer", 64, window=5).eval()
    full = BlockSparseAttention(32, 32, 2, 320, "full").eval()
    full.load_state_dict(sparse.state_dict())
    x = torch.randn(3, 320, 32)
    with torch.no_grad():
        assert torch.allclose(sparse(x), full(x), atol=1e-5)


def test_the_lra_models_read_grayscale_pixel_sequences():
    torch.manual_seed(0)
    model = create_model("lra_longformer").eval()
    assert isinstance(model, PixelSequenceTransformer) and model.seq_len == 1024 and len(model.layers) == 4
    x = torch.rand(2, 3, 32, 32)
    gray = 0.2989 * x[:, 0] + 0.5870 * x[:, 1] + 0.1140 * x[:, 2]
    assert torch.allclose(model.pixels(x).squeeze(-1), gray.flatten(1), atol=1e-6)
    assert model(x).shape == (2, 10)
    with pytest.raises(ValueError, match=r"reads 1024 pixels \(seq_len=1024\), got 16x16 = 256"):
        model(torch.rand(1, 3, 16, 16))
    wide = create_model("lra_bigbird", seq_len=256, num_classes=4).eval()
    with torch.no_grad():  # 4 blocks: window, global and random blocks cover every block -> full attention
        assert torch.allclose(wide(x[:, :, :16, :16]), dense_equivalent(wide)(x[:, :, :16, :16]), atol=1e-5)
    assert model_card("lra_transformer").reference["top1_lra_image"] == 42.44
    assert model_card("lra_longformer").reference["top1_lra_image"] == 42.22
    assert model_card("lra_bigbird").reference["top1_lra_image"] == 40.83


def test_cost_against_length_rows_count_what_the_formula_and_the_cost_table_say():
    """Longformer (4 layers) at 256 and 1,024 tokens beside full attention of its size: the attention
    products of each variant are 4 x the hand formula; at 1,024 the Longformer variant's whole-model
    MACs equal the registered model's own cost table (two independent paths); saving > 0 at 1,024."""
    from fractalbench.harness.metrics import build_cost_table
    from fractalbench.harness.metrics.length_scaling import length_scaling_rows

    torch.manual_seed(0)
    model = create_model("lra_longformer", num_classes=10, in_chans=3).eval()
    rows = length_scaling_rows(model, (256, 1024), rounds=1, calls=1, model="lra_longformer")
    import json

    by = {(r["metric"], r["policy"], json.loads(r["detail"])["length"]): r for r in rows}
    assert len(rows) == 3 * 2 * 2
    for length in (256, 1024):
        for attention in ("longformer", "full"):
            macs = by[("macs_at_length", attention, length)]
            assert json.loads(macs["detail"])["attention_macs"] == 4 * attention_macs(length, 64, attention, 64)
            assert by[("latency_at_length", attention, length)]["value"] > 0
            assert by[("memory_at_length", attention, length)]["value"] > 0
    table = build_cost_table(model, torch.randn(1, 3, 32, 32))
    assert by[("macs_at_length", "longformer", 1024)]["value"] == table.exits[-1]
    assert by[("macs_at_length", "longformer", 1024)]["value"] < by[("macs_at_length", "full", 1024)]["value"]
    # the full transformer has one variant only; a static CNN none
    assert {r["policy"] for r in length_scaling_rows(create_model("lra_transformer"), (128,), rounds=1,
                                                     calls=1)} == {"full"}
    assert length_scaling_rows(create_model("resnet20"), (128,)) == []
