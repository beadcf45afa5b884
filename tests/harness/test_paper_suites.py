"""The paper suites: they parse, cover every family, follow each model card's paper recipe except
where the harness cannot (Nesterov, Adam's betas), and every published number on a card has a source."""
import dataclasses

import pytest

from fractalbench.harness.cells import card_dict as _card_dict
from fractalbench.harness.registry import list_models, model_card, recipe_text
from fractalbench.harness.suites import load_suite
from fractalbench.harness.train import TrainConfig
from fractalbench.reports.reference import TRAIN_DEFAULTS, parse_recipe, recipe_differences, suite_recipe

FAMILIES = {"resnet", "branchynet", "sdn", "skipnet", "fractalnet", "moe", "fractalbrainnet", "msdnet"}
#: Recipe keys the trainer cannot follow: SGD with momentum is always Nesterov, Adam keeps torch's betas.
UNFOLLOWABLE = {"nesterov", "stage2.nesterov", "betas"}


@pytest.mark.parametrize("name, dataset", [("paper", "cifar10"), ("paper_c100", "cifar100")])
def test_paper_suites_parse_on_cuda_with_the_papers_dataset(name, dataset):
    suite = load_suite(name)
    assert suite.path == f"fractalbench/suites/{name}.yaml"
    assert suite.devices == ("cuda",)
    [ds] = suite.datasets
    assert (ds.name, ds.root, ds.val_fraction) == (dataset, "data", 0.1)
    assert {"accuracy", "cost", "latency", "memory", "sweep"} <= set(suite.metrics)
    assert [p.name for p in suite.policies] == ["confidence", "entropy", "patience"]
    assert suite.budgets == (0.25, 0.5, 0.75)


def test_paper_suite_has_every_family_and_c100_only_papers_reporting_cifar100():
    families = {model_card(m.name).family for m in load_suite("paper").models}
    assert FAMILIES <= families
    assert {model_card(m.name).family for m in load_suite("paper_c100").models} == {"sdn", "skipnet", "fractalnet",
                                                                                     "msdnet"}


@pytest.mark.parametrize("name", ["paper", "paper_c100"])
def test_paper_suites_follow_the_cards_recipes(name):
    suite = load_suite(name)
    for entry in suite.models:
        card = model_card(entry.name)
        paper = parse_recipe(card.paper_recipe)
        if card.family in ("moe", "fractalbrainnet"):  # no published recipe: the suite states its own
            assert not paper, entry.display
            continue
        assert {"epochs", "batch_size", "optimizer", "lr", "schedule"} <= set(paper), entry.display
        measured = suite_recipe(suite.raw, entry.display, entry.name)
        differences = recipe_differences(paper, measured)
        assert {d.split()[0] for d in differences} <= UNFOLLOWABLE, (entry.display, differences)


def test_paper_recipes_of_the_headline_models():
    assert parse_recipe(model_card("resnet110").paper_recipe)["milestones"] == "82,123"
    fractal = parse_recipe(model_card("fractalnet20").paper_recipe)
    assert (fractal["epochs"], fractal["batch_size"], fractal["lr"]) == ("400", "100", "0.02")
    assert fractal["milestones"] == "200,300,350,375"
    skip = parse_recipe(model_card("skipnet110").paper_recipe)
    assert (skip["stage2.lr"], skip["stage2.epochs"]) == ("0.0001", "26")
    assert parse_recipe(model_card("sdn:resnet56").paper_recipe)["milestones"] == "35,60,85"
    assert parse_recipe(model_card("branchynet_resnet110").paper_recipe)["optimizer"] == "adam"


def test_every_published_number_has_a_source():
    names = list_models() + ["sdn:resnet56", "sdn:resnet110"]
    for name in names:
        card = model_card(name)
        if card.reference:
            assert card.reference_source.strip(), name
            assert all(isinstance(v, (int, float)) for v in card.reference.values()), name


def test_published_cifar_numbers():
    assert model_card("resnet20").reference["top1_cifar10"] == 91.25
    assert model_card("resnet110").reference["top1_cifar10"] == 93.39
    fractal = model_card("fractalnet20").reference
    assert fractal["top1_full_cifar10"] == pytest.approx(95.40) and fractal["top1_cifar100"] == pytest.approx(75.68)
    assert model_card("branchynet_resnet110").reference["knee_top1_cifar10"] == 79.17
    assert model_card("skipnet110").reference["hrl_top1_cifar10"] == 93.30
    assert not model_card("moe_resnet20_top2").reference


def test_card_stored_in_cell_meta_carries_the_paper_recipe():
    assert _card_dict("resnet56")["paper_recipe"] == model_card("resnet56").paper_recipe
    assert "paper_recipe" in _card_dict("noop") and _card_dict("noop")["paper_recipe"] == ""


def test_recipe_text_round_trips_through_the_report_parser():
    text = recipe_text({"epochs": 164, "lr": 1e-4, "nesterov": False, "milestones": (82, 123)}, "a note | with a bar")
    assert text.startswith("epochs=164 lr=0.0001 nesterov=no milestones=82,123 | a note")
    assert parse_recipe(text) == {"epochs": "164", "lr": "0.0001", "nesterov": "no", "milestones": "82,123"}


def test_report_train_defaults_are_the_trainers():
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "seed"}
    assert TRAIN_DEFAULTS == defaults
