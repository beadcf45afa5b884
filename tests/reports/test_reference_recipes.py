"""The reference table's recipes: the card's paper recipe beside the cell's own (from the suite as
written), whether they differ, and the row of a model with no published CIFAR number; on a real
tiny run (digits, a couple of training steps) and on hand-made suites."""
from pathlib import Path

import pytest

from fractalbench.harness.registry import model_card
from fractalbench.harness.runner import run_suite
from fractalbench.harness.suites import parse_suite
from fractalbench.reports import tables
from fractalbench.reports.html import write_report
from fractalbench.reports.reference import NO_PUBLISHED, dataset_matches, recipe_differences, suite_recipe, train_recipe

TINY = {"name": "tiny_recipes", "datasets": [{"name": "digits", "image_size": 8}],
        "models": ["resnet20", {"name": "moe_resnet20_top2", "label": "moe", "train": {"lr": 0.02}}],
        "train": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 2}, "metrics": ["accuracy"]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipes") / "run"
    summary = run_suite(parse_suite(TINY, "tiny.yaml"), out)
    assert len(summary.finished) == 2, summary
    return out


def reference(run: Path):
    runs = tables.load_runs([run])
    return tables.reference_table(runs, tables.combined_rows(runs))


def test_paper_and_measured_recipes_side_by_side(tiny_run):
    ref = reference(tiny_run)
    resnet = ref[ref["label"] == "resnet20"]
    assert set(resnet["quantity"]) >= {"params", "top1_cifar10"}
    row = resnet.iloc[0]
    assert row["paper recipe"] == model_card("resnet20").paper_recipe
    assert row["paper recipe"].startswith("epochs=164 batch_size=128 optimizer=sgd lr=0.1")
    assert row["measured recipe"].startswith("epochs=1 batch_size=64 optimizer=sgd lr=0.05 momentum=0.9 nesterov=yes")
    assert "max_steps_per_epoch=2" in row["measured recipe"] and "precision=fp32" in row["measured recipe"]
    assert row["recipes differ"] == "yes"
    assert "epochs 1 vs 164" in row["recipe differences"] and "batch_size 64 vs 128" in row["recipe differences"]
    assert (resnet["recipes differ"] == "yes").all()


def test_model_without_a_published_number_says_so(tiny_run):
    ref = reference(tiny_run)
    [row] = ref[ref["label"] == "moe"].to_dict("records")
    assert row["quantity"] == "top1" and row["source"].startswith(NO_PUBLISHED)
    assert row["published"] is None or row["published"] != row["published"]  # missing
    assert 0 <= row["measured"] <= 100 and row["measured at"] == "digits8"
    assert "lr=0.02" in row["measured recipe"]  # the entry's own override
    assert row["recipes differ"] == "unknown"  # its card has no paper recipe to compare with


def test_report_html_shows_the_recipe_columns(tiny_run, tmp_path):
    text = write_report([tiny_run], tmp_path / "report.html").read_text()
    for header in ("paper recipe", "measured recipe", "recipes differ", "recipe differences"):
        assert f"<th>{header}</th>" in text
    assert NO_PUBLISHED in text and "epochs 1 vs 164" in text
    csv = (tiny_run / "report" / "reference.csv").read_text()  # tables go beside the first run
    assert "recipes differ" in csv.splitlines()[0]


def test_attribute_sweep_stage_and_untrained_suites():
    content = {"train": {"epochs": 10, "lr": 0.1, "schedule": "step", "milestones": [5]},
               "models": [{"name": "skipnet110", "train": {"epochs": 12},
                           "attribute_sweep": {"attribute": "alpha", "values": [0.1, 0.2],
                                               "train": {"epochs": 3, "lr": 1e-4, "schedule": "none"}}}]}
    recipe = suite_recipe(content, "skipnet110", "skipnet110")
    assert (recipe["epochs"], recipe["milestones"], recipe["stage2.epochs"], recipe["stage2.lr"]) == \
        ("12", "5", "3", "0.0001")
    assert recipe["stage2.alpha"] == "0.1,0.2" and "stage2.milestones" not in recipe
    assert suite_recipe({**content, "train": None}, "skipnet110", "skipnet110") == {"epochs": "0"}
    assert suite_recipe(content, "other", "resnet20") is None


def test_recipe_comparison():
    paper = {"epochs": "164", "optimizer": "sgd", "lr": "0.1", "milestones": "82,123", "weight_decay": "1e-4"}
    same = train_recipe({"epochs": 164, "lr": 0.1, "schedule": "step", "milestones": [82, 123], "weight_decay": 1e-4})
    assert recipe_differences(paper, same) == []
    other = train_recipe({"epochs": 164, "lr": 0.1, "schedule": "cosine", "weight_decay": 1e-4})
    assert recipe_differences(paper, other) == ["milestones - vs 82,123"]
    assert recipe_differences({}, same) is None and recipe_differences(paper, None) is None
    assert train_recipe({"optimizer": "adam"})["betas"] == "0.9,0.999" and "momentum" not in train_recipe(
        {"optimizer": "adam"})
    assert "warmup_epochs" not in same and train_recipe({"warmup_epochs": 0.5})["warmup_epochs"] == "0.5"


def test_dataset_names_match_labels_not_longer_names():
    assert dataset_matches("cifar10", "cifar10") and dataset_matches("cifar1032", "cifar10")
    assert not dataset_matches("cifar100", "cifar10") and dataset_matches("cifar100", "cifar100")
    assert dataset_matches("digits16", "digits") and not dataset_matches("digits16", "cifar10")
