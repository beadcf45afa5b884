"""Cascades of separately trained networks: MACs per exit by hand, each member's own weights through
`into:`, the members' outcomes equal to their own cells' (two independent paths), and bad weights
lists as one clear error each."""
from __future__ import annotations

import pytest
import torch
import yaml
from model_helpers import counted_macs, unit_table

from fractalbench.baselines.cascade import Cascade
from fractalbench.harness import contract
from fractalbench.harness.policies import ConfidencePolicy
from fractalbench.harness.registry import create_model, model_card
from fractalbench.harness.results import load_run
from fractalbench.harness.runner import run_suite
from fractalbench.harness.suites import SuiteError, load_suite, parse_suite
from fractalbench.harness.weights import IMAGENET_MEAN, IMAGENET_STD, WeightsConfig, WeightsError, load_weights

RESNET20_MACS, RESNET56_MACS = 40_551_040, 125_485_696  # this project's counts at 32x32 (test_resnet)


def test_exit_k_costs_members_0_to_k_by_hand():
    model = create_model("cascade").eval()
    assert model.member_names == ("resnet20", "resnet56") and model.num_exits == 2
    table = unit_table(model, torch.randn(1, 3, 32, 32))
    assert table["exit_0"] == RESNET20_MACS
    assert table["exit_1"] == RESNET20_MACS + RESNET56_MACS  # a sample that goes on paid for the small one too
    assert sum(p.numel() for p in model.parameters()) == 269_722 + 853_018
    assert model_card("cascade").dynamic_kind == "early_exit" and contract.cost_roles(model) == {}


def test_samples_that_leave_never_enter_the_next_member():
    torch.manual_seed(0)
    model = create_model("cascade", members=["resnet20", "resnet32"], num_classes=10).eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        small = model.members[0](x).softmax(-1).max(-1).values
        threshold = float(small.median())
        policy = ConfidencePolicy((threshold,))
        seen: list[int] = []
        hook = model.members[1].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
        out = model.dynamic_forward(x, policy)
        hook.remove()
        macs = counted_macs(lambda v: model.dynamic_forward(v, policy), x)
    leave = small >= threshold
    assert out.trace.exit_index.tolist() == [0 if b else 1 for b in leave.tolist()]
    assert seen == [int((~leave).sum())]  # only the samples that stayed ran the second network
    with torch.no_grad():
        assert torch.allclose(out.logits[leave], model.members[0](x)[leave], atol=1e-5)
        assert torch.allclose(out.logits[~leave], model.members[1](x[~leave]), atol=1e-5)
    per_sample = [counted_macs(m, x[:1]) for m in model.members]
    assert macs == 6 * per_sample[0] + int((~leave).sum()) * per_sample[1]


def test_each_member_loads_its_own_weights_into_members_k(tmp_path):
    torch.manual_seed(1)
    small, big = create_model("resnet20"), create_model("resnet32")
    torch.save(small.state_dict(), tmp_path / "small.pt")
    torch.save(big.state_dict(), tmp_path / "big.pt")
    model = create_model("cascade", members=["resnet20", "resnet32"]).eval()
    for name, into in (("small.pt", "members.0"), ("big.pt", "members.1")):
        loaded = load_weights(model, WeightsConfig(str(tmp_path / name), into=into), name="cascade")
        assert loaded.target == f"{into} (model)"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exits = model.eval().forward_exits(x)
        assert torch.equal(exits[0], small.eval()(x)) and torch.equal(exits[1], big.eval()(x))
    with pytest.raises(WeightsError, match=r"weights into 'members.2': cascade has no such submodule \(its "
                                           r"submodules: stages, heads\)"):
        load_weights(model, WeightsConfig(str(tmp_path / "small.pt"), into="members.2"), name="cascade")
    with pytest.raises(WeightsError, match="do not fit cascade.members.1"):
        load_weights(model, WeightsConfig(str(tmp_path / "small.pt"), into="members.1"), name="cascade")


def test_a_weights_list_needs_a_distinct_into_for_each_source():
    base = {"name": "x", "datasets": ["digits"]}
    with pytest.raises(SuiteError, match=r"must each name a different submodule to load into \(`into:`\), got "
                                         r"\['members.0', None\]"):
        parse_suite({**base, "models": [{"name": "cascade", "weights": [{"source": "a.pt", "into": "members.0"},
                                                                        "b.pt"]}]})
    with pytest.raises(SuiteError, match="cell:nope: no model entry of this suite has that label"):
        parse_suite({**base, "models": [{"name": "cascade", "weights": [{"source": "cell:nope", "into": "members.0"},
                                                                        {"source": "b.pt", "into": "members.1"}]}]})
    suite = parse_suite({**base, "models": [{"name": "cascade", "weights": "a.pt"}]})
    assert suite.models[0].weights == (WeightsConfig("a.pt"),)  # one source stands for a list of one


def test_members_that_declare_different_normalisations_are_refused(tmp_path):
    from fractalbench.harness.cells import LoadedParts  # noqa: F401  (the type a run stores)
    from fractalbench.harness.weights import one_normalisation

    model = create_model("cascade", members=["resnet20", "resnet20"])
    torch.save(create_model("resnet20").state_dict(), tmp_path / "r.pt")
    imagenet = load_weights(model, WeightsConfig(str(tmp_path / "r.pt"), into="members.0", mean=IMAGENET_MEAN,
                                                 std=IMAGENET_STD))
    other = load_weights(model, WeightsConfig(str(tmp_path / "r.pt"), into="members.1", mean=(0.5, 0.5, 0.5),
                                              std=IMAGENET_STD))
    plain = load_weights(model, WeightsConfig(str(tmp_path / "r.pt"), into="members.1"))
    assert one_normalisation([imagenet, imagenet]).mean == IMAGENET_MEAN
    assert one_normalisation([plain, plain]) is None
    with pytest.raises(WeightsError, match="declare different input normalisations"):
        one_normalisation([imagenet, other])
    with pytest.raises(WeightsError, match="declare no input normalisation while"):
        one_normalisation([imagenet, plain])


def test_a_run_assembles_the_cascade_from_two_cells_and_its_exits_score_as_they_did(tmp_path):
    """Two independent paths: each member's cell scores its test split; the cascade built from their
    checkpoints scores the same at its forced exits (the same networks, the same outcomes)."""
    suite = {"name": "casc", "datasets": [{"name": "digits", "image_size": 16}],
             "models": [{"name": "cascade", "label": "casc", "kwargs": {"members": ["resnet20", "resnet32"]},
                         "train": {"epochs": 0},
                         "weights": [{"source": "cell:small", "into": "members.0"},
                                     {"source": "cell:big", "into": "members.1"}]},
                        {"name": "resnet20", "label": "small"}, {"name": "resnet32", "label": "big"}],
             "train": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 3, "lr": 0.05},
             "metrics": ["accuracy", "cost"]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    summary = run_suite(load_suite(str(tmp_path / "s.yaml")), tmp_path / "run")
    assert summary.finished == ["small__digits16__cpu", "big__digits16__cpu", "casc__digits16__cpu"]
    rows = load_run(tmp_path / "run")
    top1 = rows[(rows.metric == "top1") & (rows.split == "test")] if "split" in rows else rows[rows.metric == "top1"]
    small = top1[top1.model == "small"].value.item()
    big = top1[top1.model == "big"].value.item()
    casc = top1[top1.model == "casc"].set_index("exit").value
    assert casc[0] == pytest.approx(small) and casc[1] == pytest.approx(big)
    meta = yaml.safe_load((tmp_path / "run" / "cells" / "casc__digits16__cpu.json").read_text())["meta"]
    assert [w["loaded_into"] for w in meta["weights"]] == ["members.0 (model)", "members.1 (model)"]
    assert [w["source"] for w in meta["weights"]] == ["cell:small", "cell:big"]


def test_cascade_needs_two_members():
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        Cascade([create_model("resnet20")])
    with pytest.raises(ValueError, match="member_kwargs needs one mapping per member"):
        create_model("cascade", member_kwargs=[{}])
