import json

import pytest
import torch

from fractalbench.harness import registry
from fractalbench.harness.data import DatasetConfig, load_dataset
from fractalbench.harness.registry import ModelCard, register_model
from fractalbench.harness.results import load_run
from fractalbench.harness.runner import run_suite
from fractalbench.harness.suites import SuiteError, parse_suite


def suite(models, **extra):
    raw = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}], "models": models,
           "train": {"epochs": 1, "batch_size": 64}, "metrics": ["accuracy"], **extra}
    return parse_suite(raw, "t.yaml")


class Boom(torch.nn.Module):
    def __init__(self, exc):
        super().__init__()
        self.exc = exc
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):  # raises in the cell's training; the run's preflight (eval mode) gets logits
        if self.training:
            raise self.exc
        return x.flatten(1)[:, :10] * self.w


@pytest.fixture
def broken_models():
    card = ModelCard(family="test", paper="none")
    register_model("tmp_raises", card=card)(lambda *, num_classes, in_chans: Boom(RuntimeError("kaboom in forward")))
    register_model("tmp_interrupts", card=card)(lambda *, num_classes, in_chans: Boom(KeyboardInterrupt()))
    yield
    registry.unregister_model("tmp_raises")
    registry.unregister_model("tmp_interrupts")


def test_failing_cell_is_stored_and_others_go_on(tmp_path, broken_models):
    summary = run_suite(suite(["noop", "tmp_raises", "linear"]), tmp_path)
    assert summary.failed == ["tmp_raises__digits8__cpu"] and len(summary.finished) == 2
    frame = load_run(tmp_path)
    err = frame[frame.metric == "error"]
    assert len(err) == 1 and "RuntimeError: kaboom in forward" in err.error.iloc[0]
    assert frame[(frame.model == "linear") & (frame.metric == "top1")].value.iloc[0] > 50
    # the null model predicts class 0 for everything: top-1 = share of class 0 in the test set
    labels = load_dataset(DatasetConfig("digits", image_size=8)).test.tensors[1]
    share = 100.0 * (labels == 0).sum().item() / len(labels)
    assert frame[(frame.model == "noop") & (frame.metric == "top1")].value.iloc[0] == pytest.approx(share)
    assert (tmp_path / "results.csv").read_text().count("\n") == len(frame) + 1


def test_interrupt_keeps_finished_cells_and_rerun_resumes(tmp_path, broken_models):
    first = run_suite(suite(["linear", "tmp_interrupts", "noop"]), tmp_path)
    assert first.interrupted and first.finished == ["linear__digits8__cpu"]
    before = json.loads((tmp_path / "cells" / "linear__digits8__cpu.json").read_text())
    registry.unregister_model("tmp_interrupts")
    register_model("tmp_interrupts", card=ModelCard(family="test", paper="none"))(
        lambda *, num_classes, in_chans: registry.create_model("noop", num_classes=num_classes))
    second = run_suite(suite(["linear", "tmp_interrupts", "noop"]), tmp_path)
    assert second.skipped == ["linear__digits8__cpu"]
    assert second.finished == ["tmp_interrupts__digits8__cpu", "noop__digits8__cpu"]
    after = json.loads((tmp_path / "cells" / "linear__digits8__cpu.json").read_text())
    assert before == after
    assert set(load_run(tmp_path).model) == {"linear", "tmp_interrupts", "noop"}


def test_run_directory_of_another_suite_is_refused(tmp_path):
    run_suite(suite(["noop"]), tmp_path)
    other = parse_suite({**suite(["noop"]).raw, "name": "other"}, "o.yaml")
    with pytest.raises(SuiteError, match="holds results of suite 't' with different content"):
        run_suite(other, tmp_path)


def test_an_edited_suite_reruns_only_the_cells_whose_entry_changed(tmp_path):
    first = run_suite(suite(["noop", {"name": "linear", "train": {"epochs": 1}}]), tmp_path)
    assert first.finished == ["noop__digits8__cpu", "linear__digits8__cpu"]
    kept = (tmp_path / "cells" / "noop__digits8__cpu.json").read_text()
    old_digest = json.loads((tmp_path / "suite.json").read_text())["digest"]
    messages = []
    edited = suite(["noop", {"name": "linear", "train": {"epochs": 2}}])
    second = run_suite(edited, tmp_path, echo=messages.append)
    assert second.skipped == ["noop__digits8__cpu"] and second.finished == ["linear__digits8__cpu"]
    assert (tmp_path / "cells" / "noop__digits8__cpu.json").read_text() == kept
    stale = tmp_path / "stale" / old_digest
    assert (stale / "linear__digits8__cpu.json").exists()  # the old result is kept, not lost
    assert (stale / "artifacts" / "linear__digits8__cpu" / "model.pt").exists()  # and its checkpoint moved
    assert any("linear__digits8__cpu: its suite entry changed" in m for m in messages)
    epochs = load_run(tmp_path).query("metric == 'train_seconds'").detail.map(json.loads).map(lambda d: d["epochs"])
    assert list(epochs) == [2]  # trained afresh for 2 epochs, not resumed from the 1-epoch checkpoint
    third = run_suite(suite(["noop", {"name": "linear", "train": {"epochs": 2}}], seed=5), tmp_path)
    assert third.finished == ["noop__digits8__cpu", "linear__digits8__cpu"]  # a shared setting: every cell


def test_a_measurement_setting_remeasures_from_the_checkpoint_and_compare_thresholds_change_nothing(tmp_path):
    """budgets, policies, latency... decide how a trained model is measured: a change of only these
    keeps every checkpoint and measures again (no retraining); `compare` thresholds keep the cells."""
    first = run_suite(suite(["sdn:resnet20"], metrics=["accuracy", "cost", "sweep"]), tmp_path)
    assert first.finished == ["sdn-resnet20__digits8__cpu"]
    checkpoint = tmp_path / "artifacts" / "sdn-resnet20__digits8__cpu" / "model.pt"
    trained = checkpoint.read_bytes()
    messages = []
    second = run_suite(suite(["sdn:resnet20"], metrics=["accuracy", "cost", "sweep"], budgets=[0.5]), tmp_path,
                       echo=messages.append)
    assert second.finished == ["sdn-resnet20__digits8__cpu"]
    assert any("only the measurement settings changed" in m and "no retraining" in m for m in messages)
    assert checkpoint.read_bytes() == trained
    frame = load_run(tmp_path)
    train = frame[frame.metric == "train_seconds"].detail.map(json.loads).iloc[0]
    assert train["resumed_from_epoch"] == train["epochs"] == 1  # resumed after its last epoch: no step ran
    assert "confidence@budget0.5" in set(frame["policy"])  # the new measurement is there
    third = run_suite(suite(["sdn:resnet20"], metrics=["accuracy", "cost", "sweep"], budgets=[0.5],
                            compare={"accuracy_points": 2.0}), tmp_path)
    assert third.skipped == ["sdn-resnet20__digits8__cpu"]


def test_editing_one_entry_then_running_another_with_models_keeps_the_unchanged_cell(tmp_path):
    """Only linear's entry changed; ``--models resnet20`` (with_models) must not take resnet20's
    unchanged cell for a changed one (the digests are looked up by label in the whole suite)."""
    first = run_suite(suite([{"name": "linear", "train": {"epochs": 1}}, "resnet20"]), tmp_path)
    assert first.finished == ["linear__digits8__cpu", "resnet20__digits8__cpu"]
    kept = (tmp_path / "cells" / "resnet20__digits8__cpu.json").read_text()
    edited = suite([{"name": "linear", "train": {"epochs": 2}}, "resnet20"]).with_models(["resnet20"])
    second = run_suite(edited, tmp_path)
    assert second.skipped == ["resnet20__digits8__cpu"] and not second.finished
    assert (tmp_path / "cells" / "resnet20__digits8__cpu.json").read_text() == kept
    assert not list((tmp_path / "stale").glob("*/resnet20__digits8__cpu.json"))


def test_models_not_chosen_by_models_keep_their_unchanged_cells(tmp_path):
    """A shared measurement setting changed and `--models linear` runs: noop's and resnet20's cells
    are not run now, but they are judged against the whole suite: their checkpoints stay (they are
    measured again when they next run), nothing of theirs moves as if their entry had changed."""
    run_suite(suite(["noop", "linear", "resnet20"]), tmp_path)
    checkpoint = tmp_path / "artifacts" / "resnet20__digits8__cpu" / "model.pt"
    trained = checkpoint.read_bytes()
    messages = []
    second = run_suite(suite(["noop", {"name": "linear", "train": {"epochs": 2}}, "resnet20"],
                             evaluate={"batch_size": 100}).with_models(["linear"]), tmp_path, echo=messages.append)
    assert second.finished == ["linear__digits8__cpu"]
    assert checkpoint.read_bytes() == trained
    assert not any("resnet20__digits8__cpu: its suite entry changed" in m for m in messages)
    assert any("resnet20__digits8__cpu: only the measurement settings changed" in m for m in messages)
    third = run_suite(suite(["noop", {"name": "linear", "train": {"epochs": 2}}, "resnet20"],
                            evaluate={"batch_size": 100}), tmp_path)
    assert third.skipped == ["linear__digits8__cpu"] and sorted(third.finished) == ["noop__digits8__cpu",
                                                                                   "resnet20__digits8__cpu"]
    train = load_run(tmp_path).query("metric == 'train_seconds' and model == 'resnet20'").detail.map(json.loads)
    assert train.iloc[0]["resumed_from_epoch"] == 1  # measured again from its checkpoint, not retrained


def test_editing_an_entry_reruns_the_cells_built_on_its_weights(tmp_path):
    base = [{"name": "resnet20", "label": "r20"},
            {"name": "sdn:resnet20", "label": "s", "weights": "cell:r20", "train": {"freeze": "backbone"}}, "linear"]
    run_suite(suite(base), tmp_path)
    edited = [{"name": "resnet20", "label": "r20", "train": {"epochs": 2}}, *base[1:]]
    second = run_suite(suite(edited), tmp_path)
    assert sorted(second.finished) == ["r20__digits8__cpu", "s__digits8__cpu"]
    assert second.skipped == ["linear__digits8__cpu"]


def test_environment_and_schema_recorded(tmp_path):
    run_suite(suite(["noop"]), tmp_path)
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["libraries"]["torch"].startswith("2.14.1") and env["cpu_count"] >= 1 and "git_commit" in env
    frame = load_run(tmp_path)
    assert set(frame.schema_version) == {1} and set(frame.suite) == {"t"}


def test_result_files_get_the_mode_a_plain_write_gives(tmp_path):
    # written atomically through mkstemp, which creates 0600: others sharing the run could not read them
    run_suite(suite(["noop"]), tmp_path)
    (tmp_path / "plain.txt").write_text("x")
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    written = [tmp_path / "environment.json", tmp_path / "suite.json", *sorted((tmp_path / "cells").glob("*.json"))]
    assert len(written) == 3 and {p.stat().st_mode & 0o777 for p in written} == {plain}


def test_missing_dataset_fails_before_any_cell(tmp_path):
    from fractalbench.harness.data import DatasetError

    raw = suite(["noop"]).raw | {"datasets": [{"name": "svhn", "root": str(tmp_path / "none")}]}
    with pytest.raises(DatasetError, match="dataset svhn"):
        run_suite(parse_suite(raw), tmp_path / "run")
    assert not (tmp_path / "run" / "cells").exists()


def sweep_entry(**sweep):
    return {"name": "skipnet38", "train": {"max_steps_per_epoch": 2},
            "attribute_sweep": {"attribute": "alpha", "values": [0.1, 0.5], "set": {"training_stage": "hybrid_rl"},
                                "train": {"lr": 0.0001}, **sweep}}


def test_attribute_sweep_trains_a_second_stage_per_value(tmp_path):
    summary = run_suite(suite([sweep_entry()], metrics=["accuracy", "cost"]), tmp_path)
    assert summary.failed == [] and len(summary.finished) == 1
    frame = load_run(tmp_path)
    points = frame[(frame.metric == "policy_top1") & (frame.policy == "alpha")]
    assert sorted(points.threshold) == [0.1, 0.5] and set(points.split) == {"test"}
    # stage 2 ran the RL objective (the `set` attributes were applied), once per value
    reinforce = frame[(frame.metric == "train_loss_reinforce") & (frame.policy == "alpha")]
    assert sorted(reinforce.threshold) == [0.1, 0.5]
    assert frame[(frame.metric == "train_loss_reinforce") & (frame.policy != "alpha")].empty  # stage 1 is supervised
    cost = frame[(frame.metric == "expected_macs") & (frame.policy == "alpha")]
    full = frame[(frame.metric == "macs") & (frame.exit == 0)].value.iloc[0]
    assert sorted(cost.threshold) == [0.1, 0.5] and (cost.value <= full).all() and (cost.value > 0).all()
    gates = frame[(frame.metric == "gate_rate") & (frame.policy == "alpha")]
    assert len(gates) == 2 * 17  # skipnet38 has 17 gated blocks (every block but the first)
    artifacts = {p.name for p in (tmp_path / "artifacts").rglob("stage2_*.pt")}
    assert artifacts == {"stage2_alpha_0.1.pt", "stage2_alpha_0.5.pt"}


def test_attribute_sweep_of_a_missing_attribute_is_refused_before_any_cell(tmp_path):
    entry = {"name": "resnet20", "train": {"max_steps_per_epoch": 1},
             "attribute_sweep": {"attribute": "alpha", "values": [0.1]}}
    with pytest.raises(SuiteError, match=r"field 'models\[1\].attribute_sweep.attribute': model 'resnet20' "
                                         r"\(CifarResNet\) has no attribute 'alpha'"):
        run_suite(suite(["linear", entry]), tmp_path)
    assert not tmp_path.joinpath("cells").exists()


@pytest.mark.parametrize("sweep, message", [
    ({"values": []}, "attribute_sweep.values': needs at least one value"),
    ({"values": [0.1, 0.1]}, "values must be distinct"),
    ({"attribute": "not an attr"}, "must be a model attribute name"),
    ({"train": {"lr": "fast"}}, "attribute_sweep.train.lr': must be a number"),
    ({"train": {"optimiser": "sgd"}}, "unknown field; did you mean: optimizer\\? allowed:"),
])
def test_attribute_sweep_validation(sweep, message):
    with pytest.raises(SuiteError, match=message.replace("[", r"\[")):
        suite([sweep_entry(**sweep)])


def test_routed_model_gets_a_validation_fitted_decision_threshold_per_budget(tmp_path):
    entry = {"name": "moe_resnet20_top2", "kwargs": {"router_init": "torch"}, "train": {"max_steps_per_epoch": 3}}
    summary = run_suite(suite([entry], metrics=["accuracy", "cost"], budgets=[0.25, 0.5, 0.75]), tmp_path)
    assert summary.failed == []
    frame = load_run(tmp_path)
    acc = frame[frame.metric == "policy_top1"].set_index("policy")
    assert sorted(acc.index) == ["decision_threshold@budget0.25", "decision_threshold@budget0.5",
                                 "decision_threshold@budget0.75", "router"]
    fits = [json.loads(acc.loc[f"decision_threshold@budget{b:g}", "detail"]) for b in (0.25, 0.5, 0.75)]
    for b, fit in zip((0.25, 0.5, 0.75), fits):
        assert fit["fitted_on"] == "validation" and fit["budget_fraction"] == b
        none, everything = fit["validation_macs_none"], fit["validation_macs_all"]
        assert fit["budget_macs"] == pytest.approx(none + b * (everything - none))
        assert none <= fit["validation_expected_macs"] <= fit["budget_macs"] < everything
    assert fits[0]["threshold_value"] >= fits[1]["threshold_value"] >= fits[2]["threshold_value"]
    cost = frame[frame.metric == "expected_macs"].set_index("policy").value
    assert len(cost) == 4 and cost["decision_threshold@budget0.25"] < cost["router"]  # test split: scored only


def test_several_seeds_run_one_cell_each_and_a_new_seed_runs_alone(tmp_path):
    entry = {"name": "linear", "train": {"epochs": 1}}
    first = run_suite(suite([entry], seeds=[0, 1]), tmp_path)
    assert first.finished == ["linear__digits8__cpu__seed0", "linear__digits8__cpu__seed1"]
    frame = load_run(tmp_path)
    assert sorted(set(frame.seed)) == [0, 1]
    top1 = frame[frame.metric == "top1"].set_index("seed").value
    losses = frame[frame.metric == "train_loss_cross_entropy"].set_index("seed").value
    assert losses[0] != losses[1]  # two seeds, two trainings (the accuracies may tie on 359 images)
    again = run_suite(suite([entry], seeds=[0, 1, 2]), tmp_path)
    assert again.skipped == first.finished and again.finished == ["linear__digits8__cpu__seed2"]
    assert load_run(tmp_path).query("metric == 'top1'").set_index("seed").value[[0, 1]].tolist() == top1.tolist()
    two = run_suite(suite(["noop", entry], seeds=[0, 1]), tmp_path / "two")  # a whole replicate first
    assert two.finished == ["noop__digits8__cpu__seed0", "linear__digits8__cpu__seed0",
                            "noop__digits8__cpu__seed1", "linear__digits8__cpu__seed1"]
    one = run_suite(suite([entry], seed=2), tmp_path / "single")
    assert one.finished == ["linear__digits8__cpu"]  # one seed: the id has no seed part
    single = load_run(tmp_path / "single")
    assert set(single.seed) == {2}
    seed2 = load_run(tmp_path).query("metric == 'train_loss_cross_entropy' and seed == 2").value.iloc[0]
    assert single[single.metric == "train_loss_cross_entropy"].value.iloc[0] == seed2  # same seed, same training


@pytest.mark.parametrize("extra, message", [
    ({"seeds": [1, 1]}, "field 'seeds': seeds must be distinct, got [1, 1]"),
    ({"seed": 1, "seeds": [2, 3]}, "field 'seeds': give either `seed` or `seeds`, not both"),
    ({"seeds": [0, -1]}, "field 'seeds[1]': must be a whole number >= 0, got -1"),
])
def test_bad_seeds_are_refused(extra, message):
    with pytest.raises(SuiteError, match=message.replace("[", r"\[").replace("`", "`")):
        suite(["linear"], **extra)


def test_remeasure_measures_finished_cells_again_without_retraining(tmp_path):
    entry = {"name": "linear", "train": {"epochs": 2}}
    run_suite(suite([entry]), tmp_path)
    first = load_run(tmp_path)
    again = run_suite(suite([entry]), tmp_path, remeasure=True)
    assert again.finished == ["linear__digits8__cpu"] and again.skipped == []
    second = load_run(tmp_path)
    kept = list((tmp_path / "stale").glob("remeasure-*/cells/linear__digits8__cpu.json"))
    old_rows = json.loads(kept[0].read_text())["rows"] if len(kept) == 1 else []
    assert [(r["metric"], r["value"]) for r in old_rows] == list(zip(first.metric, first.value))
    train = json.loads(second[second.metric == "train_seconds"].detail.iloc[0])
    assert train["resumed_from_epoch"] == 2 and train["covers"] == "every epoch"  # no epoch ran again
    for metric in ("top1", "train_seconds", "train_loss_cross_entropy"):
        assert second[second.metric == metric].value.tolist() == first[first.metric == metric].value.tolist()
    assert (tmp_path / "outcomes" / "linear__digits8__cpu.npz").is_file()


def test_remeasure_of_a_checkpoint_without_epoch_times_keeps_the_first_records_time(tmp_path):
    from fractalbench.harness.checkpoints import read_checkpoint

    entry = {"name": "linear", "train": {"epochs": 1}}
    run_suite(suite([entry]), tmp_path)
    seconds = load_run(tmp_path).query("metric == 'train_seconds'").value.iloc[0]
    path = tmp_path / "artifacts" / "linear__digits8__cpu" / "model.pt"
    state = read_checkpoint(path)
    del state["extra"]["epoch_seconds"]  # as written before epoch times were kept
    torch.save(state, path)
    run_suite(suite([entry]), tmp_path, remeasure=True)
    row = load_run(tmp_path).query("metric == 'train_seconds'").iloc[0]
    assert row.value == seconds and "before it was remeasured" in json.loads(row.detail)["covers"]


def test_each_cell_records_its_wall_time_per_step(tmp_path):
    run_suite(suite(["linear"], metrics=["accuracy", "cost"]), tmp_path)
    frame = load_run(tmp_path)
    (row,) = frame[frame.metric == "cell_seconds"].itertuples()
    steps = json.loads(row.detail)["steps"]
    assert set(steps) == {"parameters", "train", "accuracy", "cost_table", "exit_stats", "cost"}
    assert row.unit == "s" and sum(steps.values()) <= row.value + 1e-3
    (train,) = frame[frame.metric == "train_seconds"].value  # timed inside the train step
    assert 0 < train <= steps["train"] + 1e-3
    # and where it ran: a run resumed over several sessions may change machines between cells
    machine = json.loads((tmp_path / "cells" / "linear__digits8__cpu.json").read_text())["meta"]["machine"]
    env = json.loads((tmp_path / "environment.json").read_text())
    assert machine["cpu"] == env["cpu"] and machine["cpu_capability"] == env["cpu_capability"]
    assert machine["cpu_native_bf16"] in (True, False, None) and machine["torch_threads"] >= 1
