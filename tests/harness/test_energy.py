"""Energy: RAPL counters read from a powercap tree in the kernel's on-disk format (packages summed,
a wrap undone), the reasons given where none can be read, and the latency measurement's rows: joules
per sample around exactly the timed calls, or one energy_meter row with the reason."""
import json

import pytest
import torch

from fractalbench.harness.metrics import LatencySettings, measure_latency
from fractalbench.harness.metrics import energy as energy_module
from fractalbench.harness.metrics import latency as latency_module
from fractalbench.harness.metrics.energy import EnergyMeter, energy_detail, energy_meter


def _domain(root, name, label, uj, wrap_uj=262_143_328_850):
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(f"{label}\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{wrap_uj}\n")
    return d


def test_rapl_packages_are_summed_and_a_wrap_is_undone(tmp_path):
    first = _domain(tmp_path, "intel-rapl:0", "package-0", 5_000_000)
    _domain(tmp_path, "intel-rapl:1", "package-1", 2_000_000)
    _domain(tmp_path / "intel-rapl:0", "intel-rapl:0:0", "core", 1)  # a subdomain: not a package
    meter = energy_meter("cpu", tmp_path)
    assert meter.available and meter.domains == ("intel-rapl:0 (package-0)", "intel-rapl:1 (package-1)")
    before = meter.read()
    assert before == [5.0, 2.0]
    (first / "energy_uj").write_text("1000000\n")  # package 0 wrapped: 262,143.33 J range
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("2500000\n")
    after = meter.read()
    assert meter.joules_between(before, after) == pytest.approx((262_143.328850 - 5.0 + 1.0) + 0.5)
    per_sample, detail = energy_detail(meter, [0.0, 0.0], [3.0, 1.0], 2.0, calls=4, samples_per_call=2, idle_w=0.5)
    assert per_sample == 4.0 / 8 and detail["gross_j"] == 4.0
    assert detail["net_j"] == 4.0 - 0.5 * 2.0 and detail["net_j_per_sample"] == 3.0 / 8


def test_meters_say_why_nothing_can_be_read(tmp_path, monkeypatch):
    missing = energy_meter("cpu", tmp_path / "absent")
    assert not missing.available and "does not exist" in missing.reason
    with pytest.raises(RuntimeError, match="no energy counter"):
        missing.read()
    assert "no RAPL package domain" in energy_meter("cpu", tmp_path).reason
    _domain(tmp_path, "intel-rapl:0", "package-0", 1)
    monkeypatch.setattr(energy_module.os, "access", lambda path, mode: False)
    assert "not readable by this user" in energy_meter("cpu", tmp_path).reason
    gpu = energy_meter("cuda:0")
    assert not gpu.available and ("pynvml" in gpu.reason or "NVML" in gpu.reason)


class _Counter:
    """A counter that gains 1 J per read: every measured stretch reads exactly 1 J."""

    def __init__(self):
        self.joules = 0.0

    def __call__(self):
        self.joules += 1.0
        return [self.joules]


def test_latency_rows_carry_joules_per_sample_of_the_timed_calls(tiny_models, monkeypatch):
    meter = EnergyMeter("rapl", ("fake",), _read=_Counter())
    monkeypatch.setattr(latency_module, "energy_meter", lambda device: meter)
    monkeypatch.setattr(latency_module, "idle_watts", lambda m, seconds: 0.25)
    model = tiny_models["tiny_two_exit"]().eval()
    settings = LatencySettings(batch_sizes=(1, 4), isolate=False, threads=1, warmup=1, repeats=5, stream_samples=10,
                               cross_check=False, policies=(None,))
    rows = measure_latency(model, torch.randn(12, 2, 4, 4), settings, model="tiny")
    (meter_row,) = [r for r in rows if r["metric"] == "energy_meter"]
    assert meter_row["value"] == 1 and json.loads(meter_row["detail"])["idle_w"] == 0.25
    energy = {(r["batch_size"], r["exit"], r["policy"]): r for r in rows if r["metric"] == "energy_per_sample"}
    # forced exits: 1 J over 5 calls of batch b; the default stream: 1 J over 10 samples; batch 4 compact: 5 x 4
    assert energy[(1, 0, "")]["value"] == 1 / 5 and energy[(4, 1, "")]["value"] == 1 / 20
    assert energy[(1, None, "default")]["value"] == 1 / 10 and energy[(4, None, "default")]["value"] == 1 / 20
    detail = json.loads(energy[(1, 0, "")]["detail"])
    assert detail["gross_j"] == 1.0 and detail["path"] == "forced" and detail["seconds"] > 0
    assert detail["net_j"] == pytest.approx(1.0 - 0.25 * detail["seconds"])


def test_without_a_counter_one_row_states_the_skip(tiny_models, monkeypatch):
    monkeypatch.setattr(latency_module, "energy_meter", lambda device: EnergyMeter("rapl", reason="no RAPL here"))
    model = tiny_models["tiny_two_exit"]().eval()
    settings = LatencySettings(batch_sizes=(1,), isolate=False, threads=1, warmup=0, repeats=2, stream_samples=2,
                               cross_check=False)
    rows = measure_latency(model, torch.randn(4, 2, 4, 4), settings, model="tiny")
    skipped = [r for r in rows if r["metric"].startswith("energy")]
    assert len(skipped) == 1 and skipped[0]["value"] == 0
    assert json.loads(skipped[0]["detail"])["reason"] == "no RAPL here"
    off = measure_latency(model, torch.randn(4, 2, 4, 4), LatencySettings(
        batch_sizes=(1,), isolate=False, threads=1, warmup=0, repeats=2, cross_check=False, energy=False))
    assert not [r for r in off if r["metric"].startswith("energy")]
