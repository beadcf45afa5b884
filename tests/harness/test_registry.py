import pytest
import torch

from fractalbench.harness import registry
from fractalbench.harness.registry import (
    ModelCard,
    UnknownNameError,
    create_model,
    list_models,
    model_card,
    register_model,
)


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownNameError, match="did you mean: .*resnet20"):
        create_model("resnet2O")


def test_unknown_prefix_and_timm_name():
    with pytest.raises(UnknownNameError, match="unknown model prefix 'timn'"):
        create_model("timn:resnet18")
    with pytest.raises(UnknownNameError, match="resnet18"):
        create_model("timm:resnet18x")


def test_duplicate_registration_raises():
    card = ModelCard(family="test", paper="none")

    @register_model("tmp_dup_model", card=card)
    def first(*, num_classes=10, in_chans=3):
        return torch.nn.Linear(1, 1)

    try:
        with pytest.raises(ValueError, match="already registered under the name 'tmp_dup_model'"):
            register_model("tmp_dup_model", card=card)(first)
        entry = registry.registered("tmp_dup_model")
        assert entry.builder is first and entry.card is card and "test_registry" in entry.origin
    finally:
        registry.unregister_model("tmp_dup_model")


def test_list_models_wildcards_and_discovery():
    assert registry.registered("resnet20").card.family == "resnet"
    assert registry.registered("sdn:resnet20") is None and registry.registered("resnet2O") is None
    assert list_models("resnet*") == ["resnet110", "resnet20", "resnet32", "resnet44", "resnet56"]
    assert "noop" in list_models() and "linear" in list_models()


def test_timm_model_is_a_static_baseline_without_download():
    model = create_model("timm:resnet18", num_classes=5, in_chans=1)
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    assert model_card("timm:resnet18").dynamic_kind == "static"


def test_bad_builder_option_is_a_value_error():
    with pytest.raises(ValueError, match="does not take these options"):
        create_model("resnet20", widht=3)


def test_card_rejects_unknown_dynamic_kind():
    with pytest.raises(ValueError, match="dynamic_kind"):
        ModelCard(family="x", paper="y", dynamic_kind="sometimes")
