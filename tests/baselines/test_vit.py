"""Vision transformers: ViT-Lite's published parameter and MAC counts by hand, its exits after every
block through the SDN wrapper (ours and a timm ViT built without downloading), the early-exit
contract on them, and head-only training of a timm ViT's exits on its frozen backbone."""
import pytest
import torch
from model_helpers import median_policy, unit_table
from torch.utils.data import TensorDataset

from fractalbench.baselines.sdn import SDN, TokenClassifier
from fractalbench.baselines.vit import VisionTransformerLite
from fractalbench.harness.contract import dynamic_forward, executed_macs
from fractalbench.harness.metrics import MacCounter
from fractalbench.harness.registry import create_model, model_card
from fractalbench.harness.train import TrainConfig, train_model

# One ViT-Lite encoder layer at D = 256, MLP 512: qkv 256 x 768 (no bias) + proj 256 x 256 + 256
# + MLP 256 x 512 + 512 + 512 x 256 + 256 + two LayerNorms 2 x 512.
LAYER_PARAMS = 196_608 + 65_792 + 131_584 + 131_328 + 1_024
# Tokenizer 3 x 4 x 4 x 256 + 256, class token 256, positions 65 x 256, final LayerNorm 512, FC 256 x 10 + 10.
OUTER_PARAMS = 12_544 + 256 + 16_640 + 512 + 2_570
# Per 32x32 image, 65 tokens: qkv 65 x 256 x 768 + proj 65 x 256 x 256 + MLP 2 x 65 x 256 x 512.
LAYER_LINEAR_MACS = 12_779_520 + 4_259_840 + 2 * 8_519_680
ATTENTION_MACS = 2 * 4 * 65 * 65 * 64  # q @ k^T and attn @ v, 4 heads of 64
OUTER_MACS = 64 * 48 * 256 + 256 * 10  # the patch convolution and the classifier


@pytest.mark.parametrize("name, depth, params, published_macs", [
    ("vit_lite_7_4", 7, 3.717e6, 0.239e9), ("vit_lite_6_4", 6, 3.191e6, 0.205e9)])
def test_parameters_and_macs_match_the_published_counts(name, depth, params, published_macs):
    model = create_model(name).eval()
    count = sum(p.numel() for p in model.parameters())
    assert count == depth * LAYER_PARAMS + OUTER_PARAMS  # 3,716,874 and 3,190,538
    assert round(count / 1e6, 3) == params / 1e6
    with torch.no_grad(), MacCounter(model) as counter:
        model(torch.randn(1, 3, 32, 32))
    macs = counter.result()
    assert macs.total == depth * (LAYER_LINEAR_MACS + ATTENTION_MACS) + OUTER_MACS  # 254,482,432 for 7/4
    assert macs.by_operator["aten.bmm"] == depth * ATTENTION_MACS
    # the authors' count leaves out the attention products: 239,340,032 and 205,261,312
    assert round((macs.total - macs.by_operator["aten.bmm"]) / 1e9, 3) == published_macs / 1e9
    assert macs.unsupported_ops == {}
    card = model_card(name)
    assert card.reference["params"] == params and card.reference["macs"] == published_macs


def test_an_input_of_another_size_is_refused_naming_img_size():
    model = create_model("vit_lite_2_4")
    assert isinstance(model, VisionTransformerLite) and model.img_size == 16
    with pytest.raises(ValueError, match=r"built for 16x16 inputs \(img_size=16\), got 32x32"):
        model(torch.randn(1, 3, 32, 32))


def test_sdn_on_vit_lite_has_a_class_token_exit_after_every_block_and_keeps_the_forward():
    torch.manual_seed(0)
    model = create_model("sdn:vit_lite_7_4").eval()
    assert isinstance(model, SDN) and model.num_exits == 7
    assert model.ic_units == [1, 2, 3, 4, 5, 6]  # unit 0 is the embedding; blocks 0..5, block 6 ends in the head
    assert all(isinstance(h, TokenClassifier) and h.pool == "token" for h in model.heads[:-1])
    # each exit: LayerNorm 512 + FC 256 x 10 + 10
    assert sum(p.numel() for p in model.parameters()) == 7 * LAYER_PARAMS + OUTER_PARAMS + 6 * 3_082
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model.dense_backbone()(x), atol=1e-6)
        outs = model.forward_exits(x)
    assert len(outs) == 7 and all(o.shape == (3, 10) for o in outs)
    table = unit_table(model, x[:1])
    # exit k costs the embedding, k + 1 layers and exits 0..k (LayerNorm not counted, FC 2,560)
    first = 64 * 48 * 256 + LAYER_LINEAR_MACS + ATTENTION_MACS + 2_560
    cost = executed_macs(model.trace_for_exits(torch.tensor([0, 6])), table).tolist()
    assert cost == [first, 7 * (LAYER_LINEAR_MACS + ATTENTION_MACS) + OUTER_MACS + 6 * 2_560]


def test_early_exits_on_a_vit_really_stop_and_cost_what_they_ran():
    torch.manual_seed(0)
    model = create_model("sdn:vit_lite_2_4").eval()
    x = torch.randn(16, 3, 16, 16)
    policy = median_policy(model, x)
    out = dynamic_forward(model, x, policy)
    assert 0 < int((out.trace.exit_index == 0).sum()) < 16
    table = unit_table(model, x[:1])
    for i in range(4):  # batch 1: each sample's counted MACs equal the table's price of its exit
        with torch.no_grad(), MacCounter(model) as counter:
            single = dynamic_forward(model, x[i:i + 1], policy)
        assert counter.result().total == executed_macs(single.trace, table).item()
        assert single.trace.exit_index.item() == out.trace.exit_index[i].item()


def _small_timm_vit_sdn():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    return create_model("sdn:timm:vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4)


def test_a_timm_vit_gets_exits_after_every_block_with_counted_fused_attention():
    model = _small_timm_vit_sdn().eval()
    assert model.num_exits == 4 and model.ic_units == [1, 2, 3]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model.dense_backbone()(x), atol=1e-5)
        with MacCounter(model) as counter:
            model.dense_backbone()(x[:1])
    # ViT-Ti (D 192, 3 heads, MLP 768) at 32x32 with 4x4 patches: 65 tokens, 4 blocks
    block = 65 * 192 * 576 + 65 * 192 * 192 + 2 * 65 * 192 * 768 + 2 * 65 * 65 * 192
    assert counter.result().total == 4 * block + 64 * 48 * 192 + 192 * 10 == 122_097_024
    assert not counter.result().unsupported_ops.keys() & {"_scaled_dot_product_flash_attention_for_cpu"}


def test_head_only_training_of_a_timm_vits_exits_leaves_the_backbone_as_it_was():
    model = _small_timm_vit_sdn()
    backbone = {k: v.clone() for k, v in model.dense_backbone().state_dict().items()}
    heads = {k: v.clone() for k, v in model.heads[:-1].state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
    train_model(model, data, TrainConfig(epochs=1, batch_size=16, optimizer="adamw", lr=1e-2, weight_decay=0.05,
                                         freeze="backbone"))
    after = model.dense_backbone().state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone.items())
    moved = model.heads[:-1].state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in heads.items())
