"""Latency: timing primitives, per-exit and per-policy rows, prediction, isolation, bad input.

Timing values are noisy on a shared machine, so these tests check structure, counts, equalities
between two paths (exit fractions of the stream vs the policy simulated on all exits; predicted
latency vs its own inputs) and errors. Speed targets live in benchmarks/.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from fractalbench.harness import contract
from fractalbench.harness.metrics import (
    LatencySettings,
    MeasurementError,
    latency_rows,
    measure_latency,
    overhead_rows,
    summarize,
    time_calls,
    timer_cross_check,
)
from fractalbench.harness.metrics.isolation import run_worker, worker_env
from fractalbench.harness.metrics.settings import StreamPoint, as_stream_point, policy_description, resolve_policy
from fractalbench.harness.policies import ConfidencePolicy, ExitPolicy
from fractalbench.harness.registry import ModelSpec

FAST = dict(warmup=1, repeats=5, stream_samples=20, cross_check=False, energy=False)  # energy: test_energy.py


def by(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def median_policy(model, x):
    with torch.no_grad():
        logits = contract.forward_exits(model, x)[:-1]
    return ConfidencePolicy(thresholds=tuple(torch.softmax(t, -1).amax(-1).quantile(0.5).item() for t in logits))


def test_summarize_matches_numpy_and_p99_needs_100_samples():
    vals = np.random.default_rng(0).exponential(size=120).tolist()
    s = summarize(vals)
    assert s.n == 120 and s.mean == pytest.approx(np.mean(vals))
    assert s.std == pytest.approx(np.std(vals, ddof=1))
    for q, got in ((50, s.p50), (90, s.p90), (99, s.p99)):
        assert got == pytest.approx(np.percentile(vals, q))
    assert summarize(vals[:99]).p99 is None
    assert summarize([2.0]).std == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_time_calls_runs_warmup_then_times_each_call():
    seen = []
    times = time_calls(seen.append, 7, "cpu", warmup=3)
    assert seen == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert len(times) == 7 and all(t >= 0 for t in times)


def test_per_exit_stream_prediction_and_batched_modes(tiny_models):
    torch.manual_seed(0)
    model = tiny_models["tiny_two_exit"]().eval()
    x = torch.randn(40, 2, 4, 4)
    policy = median_policy(model, x)
    point = StreamPoint("confidence@budget0.5", None, policy)  # the key its accuracy and cost rows carry
    settings = LatencySettings(batch_sizes=(1, 8), policies=(point,), isolate=False, threads=1, **FAST)
    rows = measure_latency(model, x, settings, model="tiny", dataset="synthetic")
    forced = by(rows, metric="latency", policy="")
    assert sorted((r["batch_size"], r["exit"]) for r in forced) == [(1, 0), (1, 1), (8, 0), (8, 1)]
    assert all(r["n"] == 5 and r["p99"] is None and r["p50"] > 0 and r["unit"] == "ms" for r in forced)
    assert all(r["model"] == "tiny" and r["device"] == "cpu" for r in rows)
    key = {"policy": "confidence@budget0.5", "threshold": None}
    (stream,) = by(rows, metric="latency", batch_size=1, **key)
    detail = json.loads(stream["detail"])
    assert detail["policy_description"] == policy.describe()
    assert stream["n"] == 20 and detail["threads"] == 1 and detail["mode"] == "compact"
    # two paths to the exit fractions: the timed stream vs the policy simulated on all exits at once
    simulated = policy.simulate(model.forward_exits(x[:20]))
    assert detail["exit_fractions"] == [int((simulated == k).sum()) / 20 for k in range(2)]
    (pred,) = by(rows, metric="latency_predicted", **key)
    pdetail = json.loads(pred["detail"])
    exit_means = [by(forced, batch_size=1, exit=k)[0]["value"] for k in range(2)]
    assert pdetail["exit_latency_ms"] == exit_means
    assert pred["value"] == pytest.approx(sum(p * t for p, t in zip(detail["exit_fractions"], exit_means)))
    (compact,) = by(rows, metric="latency", batch_size=8, **key)
    (masked,) = by(rows, metric="latency_masked", batch_size=8, **key)
    assert json.loads(compact["detail"])["mode"] == "compact" and json.loads(masked["detail"])["mode"] == "mask"


def test_p99_is_reported_with_100_samples(tiny_models):
    model = tiny_models["tiny_gated"]().eval()
    rows = measure_latency(model, torch.randn(10, 2, 4, 4), LatencySettings(
        isolate=False, warmup=0, repeats=3, stream_samples=100, cross_check=False))
    (stream,) = by(rows, metric="latency", policy="default")  # gated: the model's own decisions
    assert stream["n"] == 100 and stream["p99"] is not None and json.loads(stream["detail"])["unique_samples"] == 10
    assert not by(rows, metric="latency_predicted")  # one exit: no prediction


def test_static_model_rows_and_timer_cross_check():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    rows = measure_latency(model, torch.randn(4, 3, 2, 2), LatencySettings(
        isolate=False, warmup=1, repeats=5, cross_check=True, cross_check_rounds=1, energy=False,
        policies=({"name": "confidence", "thresholds": [0.5]},)))
    assert [r["metric"] for r in rows] == ["latency", "latency_timer_ratio"]  # policies do not apply to static models
    ratio = rows[1]
    detail = json.loads(ratio["detail"])
    assert ratio["value"] == pytest.approx(detail["rounds_harness_ms"][0] / detail["rounds_timer_ms"][0])  # one round
    check = timer_cross_check(lambda: model(torch.randn(1, 12)), threads=1, repeats=5, rounds=1, min_run_time=0.01)
    assert check["ratio"] > 0


def test_threads_are_set_recorded_and_restored():
    before = torch.get_num_threads()
    model = nn.Linear(3, 2).eval()
    rows = measure_latency(model, torch.randn(2, 3), LatencySettings(isolate=False, threads=2, **FAST))
    assert json.loads(rows[0]["detail"])["threads"] == 2
    assert torch.get_num_threads() == before


def test_bad_devices_exits_and_settings_raise():
    model = nn.Linear(3, 2)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="allowed: cpu, cuda or cuda:N"):
        measure_latency(model, x, LatencySettings(device="tpu", isolate=False))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            latency_rows(ModelSpec("linear"), None, torch.randn(2, 3, 8, 8), LatencySettings(device="cuda:0"))
    with pytest.raises(ValueError, match="exits 0..0"):
        measure_latency(model, x, LatencySettings(exits=(1,), isolate=False, **FAST))
    with pytest.raises(ValueError, match="'repeats' must be a whole number >= 1"):
        LatencySettings(repeats=0)
    with pytest.raises(ValueError, match="inference mode 'fast'"):
        LatencySettings(modes=("fast",))
    with pytest.raises(ValueError, match="samples"):
        measure_latency(model, torch.randn(3), LatencySettings(isolate=False, **FAST))


def test_policies_travel_to_workers_as_descriptions():
    policy = ConfidencePolicy(thresholds=(0.5, 0.7))
    desc = policy_description(policy)
    assert desc == {"name": "confidence", "thresholds": [0.5, 0.7]}
    label, rebuilt = resolve_policy(desc)
    assert label == policy.describe() and rebuilt == policy
    assert resolve_policy(None) == ("default", None)
    point = StreamPoint("confidence@budget0.25", None, policy)
    sent = policy_description(point)
    assert sent == {"point": {"policy": "confidence@budget0.25", "threshold": None}, "decider": desc}
    assert as_stream_point(sent) == StreamPoint("confidence@budget0.25", None, desc)
    assert resolve_policy(sent) == (policy.describe(), policy)

    class Custom(ExitPolicy):
        def decide(self, k, logits, state):
            return torch.ones(logits.shape[0], dtype=torch.bool), state

    with pytest.raises(ValueError, match="isolate=False"):
        latency_rows(ModelSpec("linear"), None, torch.randn(2, 3, 8, 8),
                     LatencySettings(policies=(Custom(thresholds=(1.0,), name="confidence"),)))


def test_isolated_worker_matches_in_process_structure():
    x = torch.randn(4, 3, 8, 8)
    settings = LatencySettings(batch_sizes=(1, 2), threads=1, **FAST)
    rows = latency_rows(ModelSpec("linear"), None, x, settings, model="linear", run_id="r1")
    assert [(r["metric"], r["batch_size"]) for r in rows] == [("latency", 1), ("latency", 2)]
    for r in rows:
        detail = json.loads(r["detail"])
        assert detail["isolated"] is True and detail["threads"] == 1 and detail["interop_threads"] == 1
        assert r["run_id"] == "r1" and r["error"] == "" and r["value"] > 0


def test_isolated_dynamic_model_via_plugin_and_checkpoint(tiny_registry, tmp_path):
    from fractalbench.harness.checkpoints import save_checkpoint

    spec = ModelSpec("tiny_two_exit", num_classes=4, in_chans=2)
    model = spec.build()
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, model, spec=spec.to_dict())
    x = torch.randn(16, 2, 4, 4)
    policy = median_policy(model.eval(), x)
    settings = LatencySettings(policies=(policy,), plugins=(tiny_registry.plugin,), **{**FAST, "stream_samples": 16})
    rows = latency_rows(spec, ckpt, x, settings, model="tiny_two_exit")
    assert all(r["error"] == "" for r in rows), rows
    expected = policy.simulate(model.forward_exits(x)).bincount(minlength=2).div(16).tolist()
    # a bare policy is keyed by its name and its one threshold, as the sweep's accuracy rows are
    (stream,) = by(rows, metric="latency", policy="confidence", threshold=policy.thresholds[0])
    assert json.loads(stream["detail"])["policy_description"] == policy.describe()
    # the worker loaded the checkpoint's weights: its exits match this process's model
    assert json.loads(stream["detail"])["exit_fractions"] == pytest.approx(expected)
    assert by(rows, metric="latency_predicted")


def test_a_failing_worker_becomes_an_error_row(tmp_path):
    rows = latency_rows(ModelSpec("linear"), tmp_path / "missing.pt", torch.randn(2, 3, 8, 8), LatencySettings(**FAST),
                        model="linear")
    assert len(rows) == 1 and rows[0]["value"] is None
    assert "checkpoint" in rows[0]["error"] and "does not exist" in rows[0]["error"]
    with pytest.raises(MeasurementError, match="timed out"):
        run_worker({"task": "latency", "spec": {"name": "linear"}}, worker_env(1), timeout_s=0.01)


def test_null_model_overhead_rows():
    rows = overhead_rows(LatencySettings(isolate=False, **FAST), (3, 8, 8))
    assert [r["metric"] for r in rows] == ["latency_overhead"] and rows[0]["model"] == "noop"
    assert 0 < rows[0]["value"] < 50  # ms: a generous sanity bound; the real target is in benchmarks/


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_latency_uses_events_and_includes_decisions(tiny_models):
    model = tiny_models["tiny_two_exit"]().eval()
    x = torch.randn(16, 2, 4, 4)
    policy = median_policy(model, x)
    rows = measure_latency(model, x, LatencySettings(device="cuda", policies=(policy,), isolate=False, **FAST))
    assert all(json.loads(r["detail"])["timing"] == "cuda_events" for r in rows if r["metric"] == "latency")
    assert all(r["device"] == "cuda" and (r["value"] or 0) > 0 for r in rows)
