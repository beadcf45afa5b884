"""Checks every registered model gets for free: forward, backward, finite outputs, and the
dynamic contract (fractalbench.harness.checker: forced exits equal exits; batch-1 and batched decisions agree
under a policy that really decides; the cost table equals counted MACs; real stopping; masked
mode). Variants over MAX_PARAMS are left to their family's tests."""
from functools import cache

import pytest
import torch

from fractalbench.harness import contract
from fractalbench.harness.checker import check_registered
from fractalbench.harness.registry import create_model, list_models, model_card

# Registered variants that are too slow for the fast suite on 2 CPU cores are exercised by their
# family's own tests at small widths; here we keep to those below this parameter budget.
MAX_PARAMS = 3_000_000

# Prefixed factories are not enumerated by list_models(); one of each family we want covered here.
PREFIXED = ("sdn:resnet20", "sdn:vit_lite_2_4")


def small_models():
    names = list_models()
    return names + [p for p in PREFIXED if p not in names]


@cache
def meta_parameter_count(name):
    """Parameters of ``name`` built on the meta device (shapes only, no memory, no init); None if
    its builder cannot run there."""
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=10, in_chans=3)
    except Exception:  # noqa: BLE001 - any builder failure on meta: the caller falls back
        return None
    return sum(p.numel() for p in model.parameters())


def parameter_count(name):
    """Parameters of ``name`` without building its weights where possible: meta build, else the
    card's reference count, else a real build."""
    count = meta_parameter_count(name)
    if count is None:
        count = model_card(name).reference.get("params")
    if count is None:
        count = sum(p.numel() for p in create_model(name, num_classes=10, in_chans=3).parameters())
    return int(count)


def build(name):
    if parameter_count(name) > MAX_PARAMS:
        pytest.skip(f"{name} has more than {MAX_PARAMS} parameters; covered by its family tests")
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=3)
    meta = meta_parameter_count(name)
    assert meta is None or sum(p.numel() for p in model.parameters()) == meta, (
        "the meta build differs from the real one")
    return model


@pytest.mark.parametrize("name", small_models())
def test_forward_backward_finite(name):
    model = build(name)
    side = min(model_card(name).input_size, 32)  # a ViT is built for its card's size
    x = torch.randn(4, 3, side, side)
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


# The cost table runs one probe (a whole forward at batch 1 under the MAC counter) per cost unit:
# models with more units than this (SkipNet-74/110: 36 and 54) take 5-15 s on 2 cores and run with -m slow.
MAX_FAST_UNITS = 30


@cache
def meta_unit_count(name):
    """Cost units of ``name`` built on the meta device (0 if its builder cannot run there)."""
    try:
        with torch.device("meta"):
            return len(contract.cost_units(create_model(name, num_classes=10, in_chans=3)))
    except Exception:  # noqa: BLE001 - any builder failure on meta: counted as fast
        return 0


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.slow] if meta_unit_count(n) > MAX_FAST_UNITS else [])
    for n in small_models() if model_card(n).dynamic_kind != "static"])
def test_dynamic_contract_holds(name):
    """Every check of fractalbench.harness.checker (forced exits, real decisions, batch-1 vs batched, cost table
    vs counted MACs under a policy that exits early or closes gates, ops without a formula, real
    stopping, masked mode) on a random batch at the card's input size (at most 32x32)."""
    if parameter_count(name) > MAX_PARAMS:
        pytest.skip(f"{name} has more than {MAX_PARAMS} parameters; covered by its family tests")
    report = check_registered(name, input_size=min(model_card(name).input_size, 32))
    assert report.ok, report.text()
    assert report["decisions"].status == "ok" and report["real stopping"].status == "ok"


def test_every_model_builds_on_meta_and_counts_like_its_card():
    """The size check above needs no real build: every model builds on meta (FractalBrainNet's
    pattern generation included), and the large ones count exactly their cards' measured numbers."""
    assert all(meta_parameter_count(n) is not None for n in small_models())
    for name in ("fractalbrainnet_xlarge", "fractalbrainnet_large", "fractalbrainnet_medium"):
        assert meta_parameter_count(name) == model_card(name).reference["params"]
