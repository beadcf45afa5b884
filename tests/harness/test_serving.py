"""Serving: the dynamic-batching server answers every request once, with the prediction the model
makes for that sample alone (staged iteration-level batching for stages + heads, batch-level for
the rest), merges samples that reach a stage at different times, and a short LoadGen Server and
SingleStream run gives its rows."""
import json
import time

import pytest
import torch
from staged_nets import median_policy, three_exit_net

from fractalbench.harness import contract
from fractalbench.harness.metrics.serving import (
    BatchingServer,
    ServingSettings,
    _rates,
    parse_summary,
    serving_rows,
)


def serve(server, requests, pause_every=None):
    server.start()
    for i, index in enumerate(requests):
        server.submit(i, index)
        if pause_every and i % pause_every == pause_every - 1:
            time.sleep(0.01)
    deadline = time.time() + 10
    while len(server.answered) < len(requests) and time.time() < deadline:
        time.sleep(0.005)
    server.stop()


@pytest.mark.parametrize("pause_every", [None, 3])
def test_staged_server_answers_each_request_once_with_its_batch_1_prediction(pause_every):
    model = three_exit_net()
    x = torch.randn(24, 2, 6, 6)
    policy = median_policy(model, x)
    answered = []
    server = BatchingServer(model, policy, x, answered.extend, max_batch=4, max_wait_ms=1.0)
    server.answered = answered
    assert server.staged
    serve(server, list(range(24)), pause_every)
    assert sorted(answered) == list(range(24))
    with torch.no_grad():
        alone = [int(contract.dynamic_forward(model, x[i:i + 1], policy).logits.argmax()) for i in range(24)]
        exits = contract.dynamic_forward(model, x, policy).trace.exit_index
    assert server.stats.predictions == dict(enumerate(alone))
    # every sample ran stage 0; stage k ran exactly the samples that did not leave before it
    steps = server.stats.batches
    assert sum(steps[0]) == 24 and all(size <= 4 for sizes in steps.values() for size in sizes)
    for k in (1, 2):
        assert sum(steps.get(k, [])) == int((exits >= k).sum())


def test_batch_level_server_for_a_gated_model(tiny_models):
    model = tiny_models["tiny_gated"]().eval()
    x = torch.randn(10, 2, 4, 4)
    answered = []
    server = BatchingServer(model, None, x, answered.extend, max_batch=4, max_wait_ms=5.0)
    server.answered = answered
    assert not server.staged
    serve(server, [3, 1, 4, 1, 5, 9, 2, 6])
    assert sorted(answered) == list(range(8)) and max(server.stats.batches[0]) <= 4
    with torch.no_grad():
        for i, p in server.stats.predictions.items():
            assert p == int(contract.dynamic_forward(model, x[i:i + 1]).logits.argmax())
    with pytest.raises(TypeError, match="not built as stages \\+ heads"):
        BatchingServer(model, None, x, answered.extend, staged=True)


def test_rate_search_stops_at_the_first_failure_then_bisects():
    settings = ServingSettings(rates=(10, 20, 40, 80), search_steps=2)
    tried = []
    done = _rates(settings, lambda r: tried.append(r) or r <= 30)
    assert done == tried == [10, 20, 40, 28.3, 33.6]
    assert _rates(ServingSettings(rates=(10, 20)), lambda r: True) == [10, 20]
    with pytest.raises(ValueError, match="rates must be positive"):
        ServingSettings(rates=(0,))


def test_loadgen_summary_is_parsed():
    text = ("Completed samples per second    : 93.81\nResult is : INVALID\n  Performance constraints satisfied : Yes\n"
            "  Early stopping satisfied: NO\n * Processed 190 queries.\n50.00 percentile latency (ns)   : 2379643\n"
            "90.00 percentile latency (ns)   : 4553129\n99.00 percentile latency (ns)   : 7296489\n")
    parsed = parse_summary(text)
    assert parsed == {"completed": 93.81, "result": "INVALID", "constraints": True, "early_stopping": False,
                      "queries": 190, "p50_ms": 2.379643, "p90_ms": 4.553129, "p99_ms": 7.296489}


def test_a_short_loadgen_run_gives_the_serving_rows():
    pytest.importorskip("mlperf_loadgen")
    model = three_exit_net()
    x = torch.randn(32, 2, 6, 6)
    policy = median_policy(model, x)
    settings = ServingSettings(rates=(100.0,), bound_ms=200.0, max_batch=8, min_queries=120, min_duration_s=0.5,
                               max_duration_s=5.0, single_stream_queries=50, search_steps=0)
    key = {"policy": "confidence", "threshold": None, "policy_description": policy.describe()}
    rows = serving_rows(model, x, [(key, policy)], settings, model="tiny", device="cpu")
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"serving_latency", "serving_throughput", "serving_max_rate", "serving_single_stream",
                       "serving_outcome_mismatches"}
    latency = by["serving_latency"]
    assert latency["p50"] <= latency["p90"] <= latency["p99"] == latency["value"] and latency["n"] >= 120
    detail = json.loads(latency["detail"])
    assert detail["offered"] == 100.0 and detail["staged"] is True and "0" in detail["server"]
    assert by["serving_outcome_mismatches"]["value"] == 0 and 0 < by["serving_outcome_mismatches"]["n"] <= 32
    assert by["serving_max_rate"]["value"] in (0.0, 100.0)
    assert by["serving_max_rate"]["value"] == (100.0 if detail["passed"] else 0.0)
    assert by["serving_single_stream"]["batch_size"] == 1 and by["serving_single_stream"]["value"] > 0


def test_a_suite_with_the_serving_metric_serves_its_budget_points(tmp_path):
    pytest.importorskip("mlperf_loadgen")
    from fractalbench.harness.results import load_run
    from fractalbench.harness.runner import run_suite
    from fractalbench.harness.suites import parse_suite
    from fractalbench.reports.html import write_report

    suite = parse_suite({
        "name": "serve", "datasets": [{"name": "digits", "image_size": 8}], "models": ["sdn:resnet20", "linear"],
        "train": {"epochs": 1, "max_steps_per_epoch": 3, "batch_size": 64}, "metrics": ["accuracy", "sweep",
                                                                                        "serving"],
        "budgets": [0.5, 0.9], "serving": {"rates": [40], "bound_ms": 500, "min_queries": 60, "min_duration_s": 0.3,
                                           "max_duration_s": 4, "single_stream_queries": 20, "search_steps": 0,
                                           "max_points": 2}}, "serve.yaml")
    summary = run_suite(suite, tmp_path, progress=False)
    assert not summary.failed
    frame = load_run(tmp_path)
    sdn = frame[(frame.model == "sdn:resnet20") & (frame.metric == "serving_max_rate")]
    assert len(sdn) == 2 and set(sdn.policy) <= {p for p in frame.policy if "budget" in str(p)}
    linear = frame[(frame.model == "linear") & (frame.metric == "serving_latency")]
    assert list(linear.policy) == ["default"]
    assert (frame[frame.metric == "serving_outcome_mismatches"].value == 0).all()
    text = write_report([tmp_path]).read_text()
    assert ">Serving under load<" in text
