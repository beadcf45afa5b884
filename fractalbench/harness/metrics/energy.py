"""Energy: joules per sample of each timed path, read from the machine's own counters, or a stated skip.

Counters
--------
- CPU: RAPL through Linux powercap (``/sys/class/powercap/intel-rapl:N/energy_uj``, the package
  domains; AMD's RAPL appears there too). Each domain's counter is in microjoules and wraps at its
  ``max_energy_range_uj``; a read sums the packages, a difference undoes at most one wrap per
  domain. The counters measure the whole package: every process on it, not only the model.
- CUDA: NVML's total energy since the driver loaded (``nvmlDeviceGetTotalEnergyConsumption``,
  millijoules, Volta and newer) through ``pynvml`` (package ``nvidia-ml-py``) when it is installed.

Where no counter can be read (no powercap directory, a counter only root can read, as on most
VMs and containers; no pynvml) the meter says why and the latency step writes one
``energy_meter`` row with value 0 and that reason: never an estimate.

Measurement: around exactly the timed calls of a latency measurement (the counter read before the
first and after the last timed call), ``energy_per_sample`` = (joules read) / (calls x samples per
call). ``detail``: the gross joules, the seconds, the package's idle power measured just before
(a sleep of ``idle_s`` seconds, no work) and the joules net of it (gross - idle W x seconds), the
domains read. Short measurements are coarse (RAPL updates about every millisecond); ``detail.seconds``
says how long each one was.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POWERCAP = Path("/sys/class/powercap")


@dataclass
class EnergyMeter:
    """Reads joules from the machine's counters (:func:`energy_meter`). ``available`` False: ``reason``
    says why nothing can be read; ``read()`` raises then."""

    source: str
    domains: tuple[str, ...] = ()
    reason: str = ""
    _read: Callable[[], list[float]] | None = field(default=None, repr=False)
    _wrap: tuple[float, ...] = ()

    @property
    def available(self) -> bool:
        return self._read is not None

    def read(self) -> list[float]:
        """Joules per domain, as the counters hold them (monotonic up to a wrap)."""
        if self._read is None:
            raise RuntimeError(f"no energy counter: {self.reason}")
        return self._read()

    def joules_between(self, before: Sequence[float], after: Sequence[float]) -> float:
        """Joules spent between two reads, summed over domains (one wrap per domain undone)."""
        total = 0.0
        for b, a, wrap in zip(before, after, self._wrap or [0.0] * len(before)):
            delta = a - b
            if delta < 0 and wrap:
                delta += wrap
            total += delta
        return total


def _rapl_meter(root: Path) -> EnergyMeter:
    if not root.is_dir():
        return EnergyMeter("rapl", reason=f"no RAPL counters: {root} does not exist (a VM or container without "
                                          "powercap, or not Linux)")
    domains = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
    if not domains:
        return EnergyMeter("rapl", reason=f"no RAPL package domain under {root}")
    names, files, wraps = [], [], []
    for d in domains:
        energy = d / "energy_uj"
        if not os.access(energy, os.R_OK):
            return EnergyMeter("rapl", reason=f"{energy} is not readable by this user (RAPL counters are root-only "
                                              "on most kernels since 2020); run as root or make it readable")
        name = (d / "name").read_text().strip() if (d / "name").exists() else d.name
        wrap_file = d / "max_energy_range_uj"
        wraps.append(float(wrap_file.read_text()) / 1e6 if wrap_file.exists() else 0.0)
        names.append(f"{d.name} ({name})")
        files.append(energy)

    def read() -> list[float]:
        return [float(f.read_text()) / 1e6 for f in files]

    try:
        read()
    except (OSError, ValueError) as exc:
        return EnergyMeter("rapl", reason=f"RAPL counters could not be read: {exc}")
    return EnergyMeter("rapl", tuple(names), _read=read, _wrap=tuple(wraps))


def _nvml_meter(device: str) -> EnergyMeter:
    try:
        import pynvml
    except ImportError:
        return EnergyMeter("nvml", reason="pynvml is not installed (pip install nvidia-ml-py) for the GPU's energy "
                                          "counter")
    try:
        pynvml.nvmlInit()
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)

        def read() -> list[float]:
            return [pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3]

        read()
    except Exception as exc:  # NVML raises its own error types; any of them means no counter
        return EnergyMeter("nvml", reason=f"NVML energy counter unavailable: {exc}")
    return EnergyMeter("nvml", (f"gpu {index}",), _read=read)


def energy_meter(device: str = "cpu", powercap: Path | str | None = None) -> EnergyMeter:
    """The meter for ``device``: RAPL packages for cpu, NVML for cuda (``powercap``: another root,
    for tests)."""
    if device.startswith("cuda"):
        return _nvml_meter(device)
    return _rapl_meter(Path(powercap) if powercap is not None else POWERCAP)


def idle_watts(meter: EnergyMeter, seconds: float) -> float:
    """The counters' power while this process sleeps ``seconds`` (what the package spends without the model)."""
    before, start = meter.read(), time.perf_counter()
    time.sleep(seconds)
    after, elapsed = meter.read(), time.perf_counter() - start
    return meter.joules_between(before, after) / elapsed if elapsed > 0 else 0.0


def energy_detail(meter: EnergyMeter, before: Sequence[float], after: Sequence[float], seconds: float,
                  calls: int, samples_per_call: int, idle_w: float | None) -> tuple[float, dict[str, Any]]:
    """(joules per sample, detail) of one measured stretch."""
    gross = meter.joules_between(before, after)
    per_sample = gross / max(1, calls * samples_per_call)
    detail: dict[str, Any] = {"source": meter.source, "domains": list(meter.domains), "gross_j": gross,
                              "seconds": seconds, "calls": calls, "samples_per_call": samples_per_call,
                              "scope": "the whole package (every process on it)" if meter.source == "rapl"
                              else "the whole GPU"}
    if idle_w is not None:
        net = gross - idle_w * seconds
        detail.update(idle_w=idle_w, net_j=net, net_j_per_sample=net / max(1, calls * samples_per_call))
    return per_sample, detail
