"""fractalbench.harness.api.benchmark: a model object benchmarked without registering it.

The early-exit test runs the README's "Python API" snippet as written (in a temporary folder), so
the README stays runnable; its model is TwoStageNet, whose MACs by hand at 8x8 input are:
exit 0 = conv 1->4 (3x3) 1*4*9*64 = 2304 + linear 4->10 = 40 -> 2344;
exit 1 = 2344 + conv 4->8 4*8*9*64 = 18432 + linear 8->10 = 80 -> 20856
(average pooling and ReLU cost no MACs).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fractalbench.harness as harness
from fractalbench.harness import api
from fractalbench.harness.calibration import default_grid
from fractalbench.harness.checkpoints import load_checkpoint
from fractalbench.harness.data import DatasetConfig, load_dataset, stratified_split
from fractalbench.harness.evaluate import collect_exit_logits, topk_accuracy
from fractalbench.harness.results import ROW_FIELDS, detail_of, load_run, rows_for
from fractalbench.harness.stats import accuracy_interval

README = Path(__file__).resolve().parents[2] / "README.md"
EXIT_MACS = (1 * 4 * 9 * 64 + 4 * 10, 1 * 4 * 9 * 64 + 4 * 10 + 4 * 8 * 9 * 64 + 8 * 10)
FAST_LATENCY = {"latency": {"repeats": 3, "warmup": 1, "stream_samples": 4, "cross_check": False}}


def readme_snippet() -> str:
    """The first Python block of the README's "Python API" section."""
    section = README.read_text(encoding="utf-8").split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """(the snippet's namespace, its run directory), the snippet run in a fresh folder."""
    folder = tmp_path_factory.mktemp("readme")
    before = os.getcwd()
    os.chdir(folder)
    try:
        namespace: dict = {"__name__": "readme_snippet"}
        exec(compile(readme_snippet(), str(README), "exec"), namespace)
    finally:
        os.chdir(before)
    return namespace, folder / "runs" / "notebook"


def value(rows, metric, **match):
    found = rows_for(rows, metric=metric, **match)
    assert len(found) == 1, (metric, match, found)
    return found[0]["value"]


def test_readme_model_per_exit_accuracy_matches_its_checkpoint(readme_run):
    namespace, run = readme_run
    rows = namespace["rows"]
    assert {r["model"] for r in rows} == {"TwoStageNet"} and {r["variant"] for r in rows} == {"object:TwoStageNet"}
    splits = load_dataset(DatasetConfig("digits", image_size=8))
    model = namespace["TwoStageNet"]()
    load_checkpoint(run / "artifacts" / "TwoStageNet__digits8__cpu" / "model.pt", model)
    logits, labels = collect_exit_logits(model, splits.test, 256, "cpu")
    for k in (0, 1):
        (row,) = rows_for(rows, metric="top1", exit=k)
        assert row["n"] == len(splits.test) == 359
        assert row["value"] == pytest.approx(topk_accuracy(logits[k], labels, 1))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(accuracy_interval(row["value"], row["n"]))
        assert row["ci_low"] < row["value"] < row["ci_high"]
    assert value(rows, "train_seconds") > 0 and value(rows, "params") == sum(p.numel() for p in model.parameters())


def test_readme_model_macs_and_sweep_points(readme_run):
    rows = readme_run[0]["rows"]
    assert [value(rows, "macs", exit=k) for k in (0, 1)] == list(EXIT_MACS)
    points = rows_for(rows, metric="policy_top1", policy="confidence")
    assert [p["threshold"] for p in points] == default_grid("confidence", 2, 10) == [i / 10 for i in range(11)]
    # threshold 0: every sample leaves at exit 0; threshold 1: none does (a softmax never reaches 1 here)
    assert value(rows, "policy_top1", policy="confidence", threshold=0.0) == value(rows, "top1", exit=0)
    assert value(rows, "expected_macs", policy="confidence", threshold=0.0) == EXIT_MACS[0]
    assert value(rows, "policy_top1", policy="confidence", threshold=1.0) == value(rows, "top1", exit=1)
    assert value(rows, "expected_macs", policy="confidence", threshold=1.0) == EXIT_MACS[1]
    for p in points:
        macs = value(rows, "expected_macs", policy="confidence", threshold=p["threshold"])
        assert EXIT_MACS[0] <= macs <= EXIT_MACS[1] and p["n"] == 359
    assert value(rows, "sweep_path_mismatches") == 0


def test_readme_model_latency_is_measured_in_process_and_labelled(readme_run):
    rows = rows_for(readme_run[0]["rows"], metric="latency")
    forced = [r for r in rows if r["exit"] is not None]
    assert sorted(r["exit"] for r in forced) == [0, 1] and all(r["n"] == 30 for r in forced)  # default repeats
    assert rows_for(rows, policy="confidence", threshold=0.5)[0]["n"] == 100  # the middle grid point, streamed
    for row in rows:
        detail = detail_of(row["detail"])
        assert row["value"] > 0 and detail["isolated"] is False and detail["why"] == api.NOT_REBUILDABLE


def test_readme_run_directory_reads_back_and_reports(readme_run):
    namespace, run = readme_run
    frame = load_run(run)
    pd.testing.assert_frame_equal(frame, pd.DataFrame(namespace["rows"], columns=list(ROW_FIELDS)))
    assert len(frame) == len(namespace["rows"]) > 100
    for name in ("suite.json", "environment.json", "results.csv", "results.json",
                 "outcomes/TwoStageNet__digits8__cpu.npz"):
        assert (run / name).is_file(), name
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "TwoStageNet" in page and "digits8" in page


def tensor_data(n: int = 200, classes: int = 10) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % classes)


def test_static_sequential_on_a_tensor_dataset(tmp_path):
    data = tensor_data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    rows = api.benchmark(model, data, ("accuracy", "cost", "memory"), out=tmp_path / "run",
                         settings={"memory": {"repeats": 1}})
    _, test = stratified_split(data.tensors[1].numpy(), 0.2)
    with torch.no_grad():
        expected = 100.0 * (model(data.tensors[0][test]).argmax(1) == data.tensors[1][test]).float().mean().item()
    (top1,) = rows_for(rows, metric="top1", exit=0)
    assert top1["n"] == len(test) == 40 and top1["dataset"] == "tensordataset"
    assert top1["value"] == pytest.approx(expected)
    assert value(rows, "macs", exit=0) == 64 * 10 and value(rows, "params") == 650
    memory = [r for r in rows if r["metric"].startswith("memory_")]
    assert {r["metric"] for r in memory} >= {"memory_weights", "memory_peak_activations"}
    assert value(rows, "memory_weights") == pytest.approx(650 * 4 / 2**20)
    assert all(detail_of(r["detail"]) | {"isolated": False, "why": api.NOT_REBUILDABLE} == detail_of(r["detail"])
               for r in memory)
    info = load_run(tmp_path / "run")
    assert set(info.metric) == {r["metric"] for r in rows}


def test_a_triple_of_datasets_trains_a_copy(tmp_path):
    data = tensor_data()
    train, val, test = (TensorDataset(*(t[s] for t in data.tensors)) for s in (slice(0, 120), slice(120, 150),
                                                                               slice(150, 200)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frame = api.benchmark(model, (train, val, test), "accuracy", train={"epochs": 1, "batch_size": 16},
                          dataset_name="mine", as_frame=True)
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(ROW_FIELDS)
    top1 = frame[frame.metric == "top1"].iloc[0]
    assert top1.n == 50 and top1.dataset == "mine"
    assert frame[frame.metric == "train_loss_cross_entropy"].value.iloc[0] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training


def test_a_registered_name_is_measured_in_a_worker():
    rows = api.benchmark("linear", tensor_data(), "latency", settings=FAST_LATENCY)
    (row,) = rows_for(rows, metric="latency")
    detail = detail_of(row["detail"])
    assert row["model"] == row["variant"] == "linear" and row["n"] == 3 and row["value"] > 0
    assert detail["isolated"] is True and "why" not in detail


def test_out_must_be_new_or_the_same_call(tmp_path):
    model, data = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tensor_data()
    first = api.benchmark(model, data, "accuracy", out=tmp_path / "run")
    again = api.benchmark(model, data, "accuracy", out=tmp_path / "run")  # the same call: replaced
    def same(rows):  # the wall-clock rows differ between two calls
        return [(r["metric"], r["value"]) for r in rows if r["metric"] not in ("train_seconds", "cell_seconds")]
    assert same(again) == same(first) and [r["metric"] for r in again] == [r["metric"] for r in first]
    assert len(list((tmp_path / "run" / "cells").iterdir())) == 1
    with pytest.raises(ValueError, match="holds another run"):
        api.benchmark(model, data, "cost", out=tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no fractalbench run"):
        api.benchmark(model, data, "accuracy", out=tmp_path / "other")


LINEAR = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
BAD_INPUT = [
    (lambda: api.benchmark(torch.relu, tensor_data()), "model must be a torch nn.Module .*, got builtin_function"),
    (lambda: api.benchmark(nn.Linear, tensor_data()), r"model is the class Linear; give an instance, e.g. Linear\("),
    (lambda: api.benchmark(LINEAR, tensor_data(), ("accuracy", "speed")), "unknown metric 'speed'; allowed: accuracy"),
    (lambda: api.benchmark(LINEAR, TensorDataset(torch.randn(50, 64), torch.arange(50) % 10)),
     r"sample 0 of the dataset: the image must be a float tensor \[channels, height, width\], got a torch.float32 "
     r"tensor of shape \[64\]"),
    (lambda: api.benchmark(LINEAR, TensorDataset(torch.randn(50, 1, 8, 4), torch.arange(50) % 10)), "must be square"),
    (lambda: api.benchmark(LINEAR, TensorDataset(torch.randn(50, 1, 8, 8), torch.rand(50))),
     "labels of the dataset must be integer class indices"),
    (lambda: api.benchmark(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), tensor_data()),
     r"exit 0 gives logits of shape \[1, 3\] on one sample, but the data has 10 classes"),
    (lambda: api.benchmark(LINEAR, tensor_data(50)), "50 samples are too few to split: the val split would be empty"),
    (lambda: api.benchmark(LINEAR, tensor_data(), out=None, report=True), "give out="),
    (lambda: api.benchmark(LINEAR, [1, 2, 3]), "data must be a dataset name"),
    (lambda: api.benchmark(LINEAR, tensor_data(), settings={"train": {}}), "give it as benchmark"),
    (lambda: api.benchmark(LINEAR, tensor_data(), kwargs={"pooled": 4}), "kwargs are builder options"),
]


@pytest.mark.parametrize("call, message", BAD_INPUT)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_model_that_cannot_run_on_the_data_is_refused():
    images = TensorDataset(torch.randn(100, 1, 16, 16), torch.arange(100) % 10)
    with pytest.raises(ValueError, match=r"cannot run on the data's samples \(shape \[1, 1, 16, 16\]\).*mat1"):
        api.benchmark(LINEAR, images)
    with pytest.raises(ValueError, match=r"field 'datasets\[0\]\.name': 'digitz' is not allowed"):
        api.benchmark(LINEAR, "digitz")


def test_harness_exports_benchmark():
    assert harness.benchmark is api.benchmark
    assert api.in_process_reason(api.ModelSpec("linear")) is None
    assert api.in_process_reason(api.ModelSpec("object:Mine")) == api.NOT_REBUILDABLE
