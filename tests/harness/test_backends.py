"""Backends: an early-exit model run graph by graph (one per stage and head, the decision between them)
through ONNX Runtime and torch.compile keeps eager's outcomes and exits; models whose decisions live
inside their forward are refused with the reason, not exported whole."""
import json

import pytest
import torch
from staged_nets import median_policy, three_exit_net
from torch import nn

from fractalbench.harness import contract
from fractalbench.harness.metrics.backends import BackendRunner, backend_rows, unsupported_reason


def test_the_eager_runner_is_the_models_own_compact_path():
    model = three_exit_net()
    x = torch.randn(40, 2, 6, 6)
    policy = median_policy(model, x)
    with torch.no_grad():
        logits, exits = BackendRunner(model, "eager", x).dynamic(x, policy)
        out = contract.dynamic_forward(model, x, policy)
    assert torch.equal(exits, out.trace.exit_index) and torch.allclose(logits, out.logits)
    assert 0 < int((exits == 0).sum()) < 40  # the median thresholds send samples to several exits


def test_onnx_runtime_per_stage_keeps_outcomes_and_exits():
    pytest.importorskip("onnxruntime")
    model = three_exit_net()
    x = torch.randn(40, 2, 6, 6)
    policy = median_policy(model, x)
    key = {"policy": "confidence", "threshold": None}
    rows = backend_rows(model, x, [(key, policy)], ["onnxruntime"], repeats=3, warmup=1, stream_samples=5,
                        model="tiny")
    mismatches = {json.loads(r["detail"])["backend"]: r for r in rows if r["metric"] == "backend_outcome_mismatches"}
    assert set(mismatches) == {"eager", "onnxruntime"}
    onnx = mismatches["onnxruntime"]
    detail = json.loads(onnx["detail"])
    assert onnx["value"] == 0 and onnx["n"] == 40 and detail["exit_mismatches"] == 0 and detail["near_ties"] == 0
    assert detail["export"] == "per stage" and detail["max_abs_logit_diff"] < 1e-4
    timed = [r for r in rows
             if r["metric"] == "latency_backend" and json.loads(r["detail"])["backend"] == "onnxruntime"]
    assert sorted((-1 if r["exit"] is None else r["exit"], r["policy"]) for r in timed) == [
        (-1, "confidence"), (0, ""), (1, ""), (2, "")]


@pytest.mark.slow
def test_inductor_per_stage_keeps_outcomes():
    model = three_exit_net()
    x = torch.randn(24, 2, 6, 6)
    policy = median_policy(model, x)
    with torch.no_grad():
        ref_logits, ref_exits = BackendRunner(model, "eager", x).dynamic(x, policy)
        logits, exits = BackendRunner(model, "inductor", x).dynamic(x, policy)
    assert torch.equal(exits, ref_exits) and torch.allclose(logits, ref_logits, atol=1e-5)


def test_models_with_decisions_inside_their_forward_are_refused_with_the_reason(tiny_models):
    gated = tiny_models["tiny_gated"]().eval()
    x = torch.randn(4, 2, 4, 4)
    assert "decisions live inside its forward" in unsupported_reason(gated, x)
    rows = backend_rows(gated, x, [({"policy": "default", "threshold": None}, None)], ["onnxruntime"], model="g")
    assert [r["metric"] for r in rows] == ["backend_unsupported"]
    assert "exporting it whole would compute every branch" in json.loads(rows[0]["detail"])["reason"]
    assert unsupported_reason(nn.Sequential(nn.Flatten(), nn.Linear(32, 3)), x) is None  # a static model: whole


def test_a_suite_with_latency_backends_measures_the_stream_points(tmp_path):
    pytest.importorskip("onnxruntime")
    from fractalbench.harness.results import load_run
    from fractalbench.harness.runner import run_suite
    from fractalbench.harness.suites import parse_suite

    suite = parse_suite({
        "name": "backends", "datasets": [{"name": "digits", "image_size": 16}], "models": ["sdn:resnet20", "skipnet38"],
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 64}, "metrics": ["accuracy", "sweep", "cost",
                                                                                               "latency"],
        "budgets": [0.5], "latency": {"batch_sizes": [1], "repeats": 2, "warmup": 0, "stream_samples": 4,
                                      "isolate": False, "cross_check": False, "energy": False,
                                      "backends": ["onnxruntime"]}}, "backends.yaml")
    assert not run_suite(suite, tmp_path, progress=False).failed
    frame = load_run(tmp_path)
    sdn = frame[(frame.model == "sdn:resnet20") & (frame.metric == "backend_outcome_mismatches")]
    backends = {json.loads(d)["backend"] for d in sdn.detail}
    assert backends == {"eager", "onnxruntime"} and (sdn.value == 0).all()
    assert set(sdn.policy) == set(frame[(frame.model == "sdn:resnet20") & (frame.metric == "latency")
                                        & (frame.policy != "")].policy)
    skip = frame[(frame.model == "skipnet38") & frame.metric.str.startswith("backend")]
    assert list(skip.metric) == ["backend_unsupported"]
    from fractalbench.reports import tables

    table = tables.backend_table(tables.combined_rows(tables.load_runs([tmp_path])))
    onnx = table[(table.model == "sdn:resnet20") & (table.backend == "onnxruntime")]
    assert len(onnx) == len(set(sdn.policy)) and (onnx["outcome mismatches"] == 0).all()
    assert onnx["MACs saving"].between(0, 1).all() and onnx["ms (b=1)"].gt(0).all()
    assert table[table.model == "skipnet38"].export.str.startswith("not exported: a gated model").all()
    with pytest.raises(Exception, match="backends"):
        parse_suite({"name": "b", "datasets": ["digits"], "models": ["linear"], "latency": {"backends": ["tvm"]}},
                    "b.yaml")
