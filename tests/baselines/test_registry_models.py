"""Checks every registered model gets for free: forward, backward, finite outputs, and the
dynamic protocol's self-consistency (forced exits equal exits; batch-1 and batched decisions agree).
Variants over MAX_PARAMS are left to their family's tests."""
import pytest
import torch

from harness import contract
from harness.registry import create_model, list_models, model_card

# Registered variants that are too slow for the fast suite on 2 CPU cores are exercised by their
# family's own tests at small widths; here we keep to those below this parameter budget.
MAX_PARAMS = 3_000_000


def small_models():
    return list_models()


def build(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=3)
    if sum(p.numel() for p in model.parameters()) > MAX_PARAMS:
        pytest.skip(f"{name} has more than {MAX_PARAMS} parameters; covered by its family tests")
    return model


@pytest.mark.parametrize("name", small_models())
def test_forward_backward_finite(name):
    model = build(name)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    model.train()
    terms = contract.loss_terms(model, x, y)
    assert terms and all(torch.isfinite(v) for v in terms.values())
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        sum(terms.values()).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in small_models() if model_card(n).dynamic_kind != "static"])
def test_dynamic_protocol_is_self_consistent(name):
    model = build(name).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        exits = contract.forward_exits(model, x)
        assert len(exits) == contract.num_exits(model)
        for k, logits in enumerate(exits):
            assert torch.allclose(contract.forced_forward(model, x, k), logits, atol=1e-4), f"exit {k}"
        batched = contract.dynamic_forward(model, x)
        for i in range(len(x)):
            one = contract.dynamic_forward(model, x[i:i + 1])
            assert one.trace.exit_index.item() == batched.trace.exit_index[i].item()
            for unit, counts in batched.trace.unit_counts.items():
                assert one.trace.unit_counts[unit].item() == counts[i].item(), unit
            assert torch.allclose(one.logits[0], batched.logits[i], atol=1e-4)
